"""The summary of benchmarks/native_training.py: per-model shares over the prompt/seed pairs both models have,
the paired native-minus-square difference, and the --model argument."""
from __future__ import annotations

import argparse

import pytest

from benchmarks.common import model_argument
from benchmarks.native_training import SIZES, score, summarise


def rows_of(model: str, index: int, in_frame: list[bool], motion_right: bool = True) -> list[dict]:
    return [{"model": model, "index": index, "seed": 0, "colour": "red", "shape": "circle", "motion": "moves left",
             "in_frame": f, "frames_in_frame": 1.0 if f else 0.5, "seen_colour": "red", "seen_shape": "circle",
             "seen_motion": "moves left" if motion_right else "moves up"} for f in in_frame]


def test_shares_and_paired_difference():
    n = len(SIZES)
    rows = (rows_of("native", 0, [True] * n) + rows_of("square", 0, [True] + [False] * (n - 1), False)
            + rows_of("native", 1, [True] * (n - 1) + [False]) + rows_of("square", 1, [False] * n)
            + rows_of("native", 2, [True] * n))  # prompt 2 has no square run: left out of both
    means, diffs = summarise(rows, ["native", "square"])
    assert means["native"]["pairs"] == means["square"]["pairs"] == 2
    assert means["native"]["in_frame"] == pytest.approx((2 * n - 1) / (2 * n))
    assert means["square"]["in_frame"] == pytest.approx(1 / (2 * n))
    assert means["square"]["motion"] == pytest.approx(0.5)
    assert means["native"]["colour"] == means["square"]["colour"] == 1.0
    mean, stderr = diffs["in_frame"]
    assert mean == pytest.approx(((n - 1) / n + (n - 1) / n) / 2)
    assert stderr == pytest.approx(0.0, abs=1e-7)
    assert diffs["motion"][0] == pytest.approx(0.5)


def test_score_reads_booleans_and_classes():
    row = rows_of("native", 0, [False], motion_right=False)[0]
    assert score(row, "in_frame") == 0.0 and score(row, "frames_in_frame") == 0.5
    assert score(row, "motion") == 0.0 and score(row, "colour") == 1.0


def test_model_argument():
    assert model_argument("native=runs/a/model.safetensors") == ("native", "runs/a/model.safetensors")
    for bad in ("runs/a/model.safetensors", "=x", "name="):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=WEIGHTS"):
            model_argument(bad)


def test_training_data_reference_reads_its_own_attributes():
    """The training-data rows render each prompt's attributes at every size and the measures read them back."""
    from benchmarks.native_training import dataset_reference

    rows = dataset_reference([0], prompts=3)
    assert len(rows) == 3 * len(SIZES) and {r["model"] for r in rows} == {"training data"}
    assert all(score(r, "colour") == 1.0 and score(r, "motion") == 1.0 for r in rows)
    assert rows == dataset_reference([0], prompts=3)  # seeded
