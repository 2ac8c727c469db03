"""benchmarks/autoencoder_quality.py: its SSIM, its held-out videos, and a whole (shrunk) run on a tiny randomly
initialized autoencoder writing the report, the JSON and the contact sheet."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image

from benchmarks import autoencoder_quality as bench
from vdit.demo.autoencoder import AutoencoderConfig, CausalVideoAutoencoder
from vdit.demo.cli import train_autoencoder as trainer

TINY = AutoencoderConfig(spatial_stride=8, width=8, blocks=1, latent_channels=4, refine=4, expand=0)


def sheet_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def random_video(seed: int, shape=(3, 5, 24, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ssim_of_identical_videos_is_one():
    video = random_video(0)
    assert bench.ssim(video, video) == pytest.approx(1.0, abs=1e-12)
    shapes = bench.sized_videos(1, 16, 24, 5, 1)[0]
    assert bench.ssim(shapes, shapes) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise_and_is_symmetric():
    video = bench.sized_videos(0, 24, 32, 5, 1)[0]
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(1))
    scores = [bench.ssim((video + s * noise).clamp(-1, 1), video) for s in (0.02, 0.1, 0.4)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
    a, b = random_video(2), random_video(3)
    assert bench.ssim(a, b) == pytest.approx(bench.ssim(b, a), abs=1e-12)
    assert bench.ssim(a, b) < 0.1  # independent noise: no structure in common


def test_ssim_of_constant_frames_by_hand():
    """Constant frames have zero variance, so SSIM = (2 x y + C1) / (x^2 + y^2 + C1) with x, y on [0, 1]."""
    target = torch.zeros(3, 1, 12, 12)           # 0 in [-1, 1]: 0.5 on [0, 1]
    reconstruction = torch.full_like(target, 0.5)  # 0.75 on [0, 1]
    expected = (2 * 0.75 * 0.5 + 0.01 ** 2) / (0.75 ** 2 + 0.5 ** 2 + 0.01 ** 2)  # 0.92309...
    assert bench.ssim(reconstruction, target) == pytest.approx(expected, rel=1e-9)
    assert bench.ssim(torch.full_like(target, 3.0), target) == pytest.approx(  # clamped to 1 -> 1.0 on [0, 1]
        (2 * 1.0 * 0.5 + 0.01 ** 2) / (1.0 + 0.25 + 0.01 ** 2), rel=1e-9)


def test_ssim_rejects_mismatched_or_small_frames():
    with pytest.raises(ValueError, match="same shape"):
        bench.ssim(torch.zeros(3, 1, 16, 16), torch.zeros(3, 1, 16, 24))
    with pytest.raises(ValueError, match="11x11"):
        bench.ssim(torch.zeros(3, 1, 8, 16), torch.zeros(3, 1, 8, 16))


def test_training_size_videos_are_the_trainers_held_out_videos():
    args = argparse.Namespace(seed=0, eval_videos=3)
    theirs = trainer.held_out_videos(args, AutoencoderConfig())
    ours = bench.training_size_videos(trainer.HELD_OUT_SEED_OFFSET, bench.SIDES, bench.FRAMES, 3)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_unseen_sizes_and_images_have_their_sizes():
    videos = bench.sized_videos(5, 16, 32, 9, 2)
    assert [tuple(v.shape) for v in videos] == [(3, 9, 16, 32)] * 2
    assert not torch.equal(videos[0], videos[1]) and torch.equal(videos[0], bench.sized_videos(5, 16, 32, 9, 1)[0])
    assert videos[0].min() >= -1 and videos[0].max() <= 1
    images = bench.image_videos(5, (16, 24), 3)
    assert all(v.shape[:2] == (3, 1) and v.shape[2] in (16, 24) and v.shape[3] in (16, 24) for v in images)
    assert bench.aspect(48, 96) == "2:1" and bench.aspect(128, 64) == "1:2"


def test_main_on_a_tiny_autoencoder(tmp_path):
    torch.manual_seed(0)
    CausalVideoAutoencoder(TINY).save(str(tmp_path / "ae"))
    out = tmp_path / "report" / "ae.md"
    argv = ["--autoencoder", str(tmp_path / "ae"), "--out", str(out), "--videos", "2", "--unseen-videos", "1",
            "--sides", "16,24", "--frames", "5,9", "--unseen-sizes", "16x32,32x16", "--unseen-frames", "5",
            "--timing-sizes", "5x16x16", "--timing-runs", "1", "--shape-sizes", "32x48", "--shape-videos", "3"]
    result = bench.main(argv)

    saved = json.loads((tmp_path / "report" / "ae.json").read_text())
    assert saved == json.loads(json.dumps(result))
    names = [g["name"] for g in saved["groups"]]
    assert names == ["training sizes", "unseen 16x32 (2:1)", "unseen 32x16 (1:2)", "images (training sizes)"]
    for g in saved["groups"]:
        s = g["summary"]
        assert s["videos"] == len(g["rows"]) == (1 if g["kind"] == "unseen" else 2)
        for key in ("psnr", "ssim", "worst_psnr", "psnr_first"):
            assert math.isfinite(s[key])
        assert s["worst_psnr"] == min(r["psnr"] for r in g["rows"]) <= s["psnr"]
        assert -1 <= s["ssim"] <= 1
        assert (s["psnr_later"] is None) == (g["kind"] == "images")
    images = saved["groups"][-1]
    assert all(r["frames"] == 1 for r in images["rows"]) and images["target_db"] is None
    assert {r["frames"] for r in saved["groups"][1]["rows"]} == {5}
    by = saved["groups"][0]["summary"]["by_frames"]
    assert sum(v["videos"] for v in by.values()) == 2 and set(by) <= {"5", "9"}
    for t, v in by.items():
        mine = [r["psnr"] for r in saved["groups"][0]["rows"] if r["frames"] == int(t)]
        assert v["psnr"] == pytest.approx(sum(mine) / len(mine))

    # the verdicts are computed from the numbers: a random autoencoder is far below 30 / 28 dB
    verdicts = {v["group"]: v for v in saved["targets"]}
    assert set(verdicts) == set(names[:3])
    assert verdicts["training sizes"]["threshold_db"] == 30.0 and verdicts["unseen 16x32 (2:1)"]["threshold_db"] == 28
    for g in saved["groups"][:3]:
        assert verdicts[g["name"]]["met"] == (g["summary"]["psnr"] >= g["target_db"]) is False
    assert saved["all_targets_met"] is False

    (shapes,) = saved["shapes"]
    assert (shapes["height"], shapes["width"], shapes["frames"], shapes["videos"]) == (32, 48, 5, 3)
    assert shapes["originals"] == 1.0  # the classifier reads the dataset's own shapes (3 of 3 here)
    assert shapes["reconstructions"] in (0, 1 / 3, 2 / 3, 1)
    assert "| 32x48 | 5 | 3 | 100% |" in out.read_text()
    c = saved["compression"]
    assert c["latent_shape"] == [4, 5, 8, 8] and c["ratio"] == pytest.approx(3 * 17 * 64 * 64 / (4 * 5 * 8 * 8))
    assert c["nominal_ratio"] == pytest.approx(3 * 4 * 8 * 8 / 4)
    (t,) = saved["timing"]
    assert t["latent_shape"] == [4, 2, 2, 2] and t["encode_s"] > 0 and t["decode_s"] > 0
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and saved["threads"] == 1

    text = out.read_text()
    assert text.splitlines()[3] == saved["command"] and "--timing-runs 1" in saved["command"]
    assert "All targets met: **no**" in text and "| training sizes | >= 30 dB |" in text
    assert f"{saved['groups'][0]['summary']['psnr']:.2f}" in text
    assert "![originals and reconstructions](ae-sheet.png)" in text
    assert "from 16, 24 (the trainer's `--sides`" in text and "trainer's own held-out videos" not in text

    # per group its median-PSNR video: original and reconstruction rows, 2x upscaled, a 14 px label, a 2 px gap
    examples = []
    for g in saved["groups"]:
        ranked = sorted(g["rows"], key=lambda r: r["psnr"])
        assert g["rows"][g["sheet_video"]] == ranked[(len(ranked) - 1) // 2]
        examples.append(g["rows"][g["sheet_video"]])
    assert sheet_size(tmp_path / "report" / "ae-sheet.png") == (
        max(2 * r["width"] * min(4, r["frames"]) + 2 * (min(4, r["frames"]) - 1) for r in examples),
        sum(2 * (2 * r["height"] + 14 + 2) for r in examples))

    # the verdict follows the threshold it is given
    lenient = bench.main(argv + ["--target-training", "-100", "--target-unseen", "-100"])
    assert all(v["met"] for v in lenient["targets"]) and lenient["all_targets_met"] is True
    assert "All targets met: **yes**" in out.read_text()


def test_main_rejects_sizes_the_model_cannot_code_or_that_were_trained(tmp_path):
    torch.manual_seed(0)
    CausalVideoAutoencoder(TINY).save(str(tmp_path / "ae"))
    base = ["--autoencoder", str(tmp_path / "ae"), "--out", str(tmp_path / "r.md"), "--sides", "16,24"]
    with pytest.raises(SystemExit, match="multiples of 8"):
        bench.main(base + ["--unseen-sizes", "20x40"])
    with pytest.raises(SystemExit, match="frame count"):
        bench.main(base + ["--frames", "6"])
    with pytest.raises(SystemExit, match="16x24 are training sizes"):
        bench.main(base + ["--unseen-sizes", "16x24,32x64"])
    assert not (tmp_path / "r.md").exists()
