"""benchmarks/latent_comparison.py end to end on two tiny models (a pixel and a latent one): every video measured
once, resumable, tokens per video from each model's patches, and the models compared on the same videos."""
from __future__ import annotations

import json
import statistics

import torch

from benchmarks import latent_comparison as bench
from vdit.demo.autoencoder import AutoencoderConfig, CausalVideoAutoencoder
from vdit.demo.data import vocabulary
from vdit.demo.latent import LatentSpace
from vdit.demo.pipeline import TextEncoderConfig, TextToVideo
from vdit.models import VideoDiTConfig


def tiny(channels: int, patch, latent=None) -> TextToVideo:
    torch.manual_seed(0)
    cfg = VideoDiTConfig(in_channels=channels, out_channels=channels, patch_size=patch, hidden_size=64, depth=1,
                         heads=2, context_dim=16)
    return TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=16, depth=1, heads=2), latent=latent)


def test_two_models_side_by_side(tmp_path, capsys):
    ae = CausalVideoAutoencoder(AutoencoderConfig(spatial_stride=4, width=8, latent_channels=4, refine=0, expand=0))
    tiny(3, (1, 4, 4)).save(str(tmp_path / "pixel"))
    tiny(4, (1, 2, 2), LatentSpace(ae, [0.0] * 4, [1.0] * 4)).save(str(tmp_path / "latent"))
    args = ["--prompts", "2", "--seeds", "0", "--sizes", "16x24", "--raw", str(tmp_path / "raw.jsonl"),
            "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "report.md"),
            "--model", f"pixel={tmp_path / 'pixel' / 'model.safetensors'}",
            "--model", f"latent={tmp_path / 'latent' / 'model.safetensors'}"]
    bench.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "raw.jsonl")]
    assert len(rows) == 4 and {r["model"] for r in rows} == {"pixel", "latent"}
    tokens = {r["model"]: r["tokens"] for r in rows}
    assert tokens == {"pixel": 16 * 4 * 6, "latent": 5 * 2 * 3}  # 16 frames of 1x4x4; 5 latent frames of 1x8x8 px
    assert all(r["seen_shape"] in (None, "circle", "square", "triangle") and 0 <= r["mask_iou"] <= 1 for r in rows)
    bench.main(args)  # resumes: nothing left to generate
    assert len(open(tmp_path / "raw.jsonl").readlines()) == 4
    summary = json.load(open(tmp_path / "report.json"))["16x24"]
    assert set(summary) == {"pixel", "latent"} and summary["latent"]["videos"] == 2
    text = open(tmp_path / "report.md").read()
    assert "| 16x16x24 | pixel | 2 |" in text and "| 16x16x24 | latent | 2 |" in text
    bench.main([*args, "--timing-rounds", "1", "--timing-sizes", "5x16x24", "--timing-max-tokens", "50"])
    timed = json.load(open(tmp_path / "report-timing.json"))
    assert timed["tokens"] == {"pixel": {"5x16x24": 5 * 4 * 6}, "latent": {"5x16x24": 2 * 2 * 3}}
    assert list(timed["seconds"]) == ["latent"] and timed["seconds"]["latent"]["5x16x24"] > 0
    assert "| 5x16x24 | not run (120) |" in open(tmp_path / "report.md").read()
    (tmp_path / "report-notes.md").write_text("## What ran\n\nby hand\n")
    bench.main([*args, "--report-only"])
    text = open(tmp_path / "report.md").read()
    assert "| 5x16x24 | not run (120) |" in text and text.endswith("## What ran\n\nby hand\n")


def test_models_are_compared_on_the_pairs_both_ran():
    def row(model, index, colour_right):
        return {"model": model, "height": 8, "width": 8, "seed": 0, "index": index, "colour": "red",
                "seen_colour": "red" if colour_right else "blue", "motion": "moves up", "seen_motion": "moves up",
                "shape": "circle", "seen_shape": "circle", "persistent": True, "mask_iou": 1.0, "frame_diff": 0.1,
                "seconds": 1.0, "tokens": 10}

    rows = [row("pixel", 0, True), row("pixel", 1, False), row("latent", 0, False)]
    summary = bench.summarise(rows)[(8, 8)]
    assert summary["pixel"]["videos"] == summary["latent"]["videos"] == 1
    assert summary["pixel"]["colour"] == 1.0 and summary["latent"]["colour"] == 0.0


def test_paired_differences_and_model_order():
    def row(model, size, index, shape_right):
        return {"model": model, "height": size, "width": size, "seed": 0, "index": index, "colour": "red",
                "seen_colour": "red", "motion": "moves up", "seen_motion": "moves up", "shape": "circle",
                "seen_shape": "circle" if shape_right else "square", "persistent": True, "mask_iou": 1.0,
                "frame_diff": 0.1, "seconds": 1.0, "tokens": 10}

    # pixel right on shapes 0-2, latent on shape 3 only: differences -1, -1, -1, +1 (mean -50 points)
    rows = [row("pixel", 8, i, i != 3) for i in range(4)] + [row("latent", 8, i, i == 3) for i in range(4)]
    rows += [row("latent", 16, i, True) for i in range(2)] + [row("pixel", 16, i, True) for i in range(2)]
    (small, large) = bench.paired_differences(rows)
    diffs = [-1, -1, -1, 1]
    se = statistics.stdev(diffs) / 2
    assert small.startswith("- 16x8x8, latent - pixel on 4 paired videos")
    assert small.endswith(f"colour +0.0 +- 0.0, motion +0.0 +- 0.0, shape -50.0 +- {100 * se:.1f}")
    assert large.startswith("- 16x16x16, latent - pixel on 2 paired videos")  # one order at every size
    assert list(bench.summarise(rows)[(16, 16)]) == ["pixel", "latent"]
