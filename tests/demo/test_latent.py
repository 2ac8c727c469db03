"""Latent demo models (vdit/demo/latent.py and the latent paths of pipeline.py, growth.py and vdit-train): the
autoencoder as the first and last stage, normalized latents, frame counts cut after decoding, save / load,
one-line errors for sizes, corrupted files and mismatched channels, and a few training steps that resume."""
import json
import os

import pytest
import torch

from vdit.demo.autoencoder import AutoencoderConfig, CausalVideoAutoencoder
from vdit.demo.checkpoint import CheckpointError
from vdit.demo.cli import train
from vdit.demo.cli.common import UsageError
from vdit.demo.data import vocabulary
from vdit.demo.growth import with_latent_space
from vdit.demo.latent import LatentSpace, latent_statistics
from vdit.demo.pipeline import TextEncoderConfig, TextToVideo, generate
from vdit.models import VideoDiTConfig

AE = AutoencoderConfig(spatial_stride=4, width=8, latent_channels=4, refine=0, expand=0)
PROMPT = "a red circle moves to the left on a black background"


def autoencoder(seed=0) -> CausalVideoAutoencoder:
    torch.manual_seed(seed)
    return CausalVideoAutoencoder(AE).eval()


def space(seed=0) -> LatentSpace:
    return LatentSpace(autoencoder(seed), [0.1, -0.2, 0.0, 0.3], [0.5, 2.0, 1.0, 1.5])


def latent_model(patch=(1, 2, 2), latent=None) -> TextToVideo:
    torch.manual_seed(1)
    latent = latent or space()
    cfg = VideoDiTConfig(in_channels=4, out_channels=4, patch_size=patch, hidden_size=32, depth=1, heads=2,
                         context_dim=16)
    return TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=16, depth=1, heads=2), latent=latent).eval()


def test_latents_are_normalized_per_channel_and_decoded_back():
    s = space()
    video = torch.rand(3, 9, 16, 24) * 2 - 1
    z, = s.encode([video])
    raw = s.autoencoder.encode(video[None])[0]
    assert z.shape == (4, 3, 4, 6)
    torch.testing.assert_close(z * s.std + s.mean, raw)
    torch.testing.assert_close(s.decode([z])[0], s.autoencoder.decode(raw[None])[0])


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (8, 3), (16, 5), (17, 5), (32, 9)])
def test_any_frame_count_is_the_next_coded_one_cut_after_decoding(frames, latent_frames):
    s = space()
    assert s.video_shape(frames, 16, 8) == (4, latent_frames, 4, 2)
    z = torch.randn(s.video_shape(frames, 16, 8))
    assert s.decode([z], frames)[0].shape == (3, frames, 16, 8)
    assert s.decode([z])[0].shape[1] == 1 + 4 * (latent_frames - 1)


def test_latent_statistics_whiten_the_training_latents():
    ae = autoencoder()
    videos = [torch.rand(3, 5, 16, 16) * 2 - 1 for _ in range(4)]
    mean, std = latent_statistics(ae, videos)
    z = torch.cat([l.flatten(1) for l in LatentSpace(ae, mean, std).encode(videos)], dim=1)
    torch.testing.assert_close(z.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(4), atol=1e-4, rtol=0)


def test_bad_statistics_and_channels_are_named():
    with pytest.raises(ValueError, match="latent mean must hold 4"):
        LatentSpace(autoencoder(), [0.0] * 3, [1.0] * 4)
    with pytest.raises(ValueError, match="latent std must be positive"):
        LatentSpace(autoencoder(), [0.0] * 4, [1.0, 0.0, 1.0, 1.0])
    cfg = VideoDiTConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, heads=2, context_dim=16)
    with pytest.raises(ValueError, match=r"in_channels / out_channels \(3 / 3\) must equal the autoencoder's 4"):
        TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=16, depth=1, heads=2), latent=space())


def test_the_autoencoder_is_frozen_and_stays_in_eval_mode():
    model = latent_model().train()
    assert not any(p.requires_grad for p in model.latent.parameters())
    assert model.latent.autoencoder.training is False and model.dit.training


def test_generate_decodes_to_the_asked_size_and_rejects_sizes_the_strides_do_not_divide():
    model = latent_model()
    videos = generate(model, [PROMPT, PROMPT], frames=16, sizes=[(16, 24), (24, 16)], steps=2, progress=False)
    assert [v.shape for v in videos] == [(3, 16, 16, 24), (3, 16, 24, 16)]
    assert all(v.abs().max() <= 1 for v in videos)
    shared = generate(model, [PROMPT], frames=16, height=16, width=24, steps=2, progress=False, noise="resampled")
    assert shared[0].shape == (3, 16, 16, 24)
    with pytest.raises(ValueError, match=r"16x20x24: .* multiples of 8x8 \(autoencoder stride 4 x patch 2x2\)"):
        generate(model, [PROMPT], frames=16, height=20, width=24, steps=1, progress=False)
    temporal = latent_model(patch=(2, 2, 2))
    with pytest.raises(ValueError, match="frames = 16 gives 5 latent frames, not a multiple of the patch's 2"):
        generate(temporal, [PROMPT], frames=16, height=16, width=16, steps=1, progress=False)


def test_save_load_round_trip(tmp_path):
    model = latent_model()
    model.save(str(tmp_path))
    loaded = TextToVideo.load(str(tmp_path / "model.safetensors"))
    assert loaded.config_dict() == model.config_dict()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = [torch.randn(4, 2, 4, 4)]
    t = torch.tensor([0.5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, [PROMPT])[0], loaded(x, t, [PROMPT])[0])


def test_mismatched_channels_and_corrupted_files_raise_one_line_errors(tmp_path):
    model = latent_model()
    model.save(str(tmp_path))
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["latent"]["autoencoder"]["latent_channels"] = 8
    config["latent"]["mean"], config["latent"]["std"] = [0.0] * 8, [1.0] * 8
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: invalid configuration: dit in_channels / out_channels"):
        TextToVideo.load(str(tmp_path / "model.safetensors"))
    model.save(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TextToVideo.load(str(weights))


def test_a_pixel_model_moves_onto_latents_keeping_its_blocks():
    torch.manual_seed(2)
    cfg = VideoDiTConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=64, depth=1, heads=2, context_dim=16)
    pixel = TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=16, depth=1, heads=2))
    moved, fresh = with_latent_space(pixel, space(), (1, 2, 2))
    assert sorted(fresh) == ["dit.patch_embed.weight", "dit.unembed.bias", "dit.unembed.weight"]
    assert moved.dit.config.patch_size == (1, 2, 2) and moved.dit.config.in_channels == 4
    before, after = pixel.state_dict(), moved.state_dict()
    kept = [k for k in before if k not in fresh and not k.startswith("dit.patch_embed.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)


TRAIN_ARGS = ["--patch-size", "1x2x2", "--hidden-size", "32", "--depth", "1", "--heads", "2", "--tokens-per-batch",
              "96", "--sides", "16,24", "--frame-counts", "5,9", "--warmup", "1", "--device", "cpu"]


def test_training_a_latent_model_and_resuming_takes_the_same_steps(tmp_path):
    autoencoder().save(str(tmp_path / "ae"))
    args = ["--autoencoder", str(tmp_path / "ae"), *TRAIN_ARGS]
    train.main(["--out", str(tmp_path / "whole"), "--steps", "4", "--save-every", "4", *args])
    train.main(["--out", str(tmp_path / "split"), "--steps", "2", "--save-every", "2", *args])
    train.main(["--out", str(tmp_path / "split"), "--steps", "4", "--save-every", "4", *args])
    whole = TextToVideo.load(str(tmp_path / "whole" / "model.safetensors"))
    split = TextToVideo.load(str(tmp_path / "split" / "model.safetensors"))
    assert whole.latent is not None and whole.dit.config.in_channels == 4
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = latent_model(latent=whole.latent)
    assert not torch.equal(whole.dit.unembed.weight, fresh.dit.unembed.weight)  # it trained
    with open(tmp_path / "whole" / "config.json") as f:
        assert len(json.load(f)["latent"]["mean"]) == 4


def test_training_options_that_do_not_fit_the_autoencoder_are_named(tmp_path):
    autoencoder().save(str(tmp_path / "ae"))
    base = ["--out", str(tmp_path / "run"), "--steps", "1", "--autoencoder", str(tmp_path / "ae")]
    with pytest.raises(UsageError, match=r"--frame-counts must be 1 \+ 4k"):
        train.main([*base, *TRAIN_ARGS, "--frame-counts", "8"])
    with pytest.raises(UsageError, match="--sides must be multiples of 8"):
        train.main([*base, *TRAIN_ARGS, "--sides", "12"])
    with pytest.raises(UsageError, match="--fsdp"):
        train.main([*base, *TRAIN_ARGS, "--fsdp"])
    os.remove(tmp_path / "ae" / "autoencoder.safetensors")
    with pytest.raises(UsageError, match="--autoencoder: .*autoencoder.safetensors"):
        train.main([*base, *TRAIN_ARGS])


def test_generate_and_eval_clis_run_a_latent_model(tmp_path, capsys):
    from vdit.demo.cli import eval as eval_cli
    from vdit.demo.cli import generate as generate_cli

    latent_model().save(str(tmp_path / "m"))
    weights = str(tmp_path / "m" / "model.safetensors")
    generate_cli.main(["--prompt", PROMPT, "--weights", weights, "--size", "16x24", "--frames", "6", "--steps", "2",
                       "--noise", "resampled", "--out", str(tmp_path / "frames")])
    assert len([f for f in os.listdir(tmp_path / "frames") if f.endswith(".png")]) == 6  # 9 decoded, 6 kept
    with pytest.raises(UsageError, match=r"multiples of 8x8 \(autoencoder stride 4 x patch 2x2\)"):
        generate_cli.main(["--prompt", PROMPT, "--weights", weights, "--size", "12x24", "--out",
                           str(tmp_path / "bad.gif")])
    eval_cli.main(["--weights", weights, "--prompts", "2", "--steps", "2", "--size", "16x24", "--seed", "1"])
    assert "2 held-out videos" in capsys.readouterr().out
