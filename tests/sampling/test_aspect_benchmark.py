"""The measures of benchmarks/aspect_consistency.py: the shape classifier on the dataset's own frames, the
in-frame and scale measures, and the cross-size agreement of a group of videos."""
from __future__ import annotations

import random

import pytest
import torch

from benchmarks.aspect_consistency import (
    SIZES,
    agree,
    classifier_accuracy,
    comparisons,
    groups_of,
    measure,
    shape_class,
    summarise,
)
from vdit.demo.data import ObjectSpec, VideoSpec, render


def video_of(shape: str, size=(48, 48), motion="stays still", colour="red", seed=0) -> torch.Tensor:
    spec = VideoSpec(8, *size, "black", None, [ObjectSpec(shape, colour, "medium", motion)])
    return render(spec, random.Random(seed))


def test_shape_classifier_is_right_on_the_dataset():
    accuracy, checked = classifier_accuracy(count=40)
    assert checked >= 30 and accuracy >= 0.95


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size", [(32, 64), (72, 40)])
def test_shape_classifier_at_the_benchmark_sizes(shape, size):
    masks = (video_of(shape, size) + 1).amax(0) > 0.6
    assert shape_class(masks) == shape


def test_measure_sees_colour_motion_scale_and_frame():
    got = measure(video_of("square", (48, 64), "moves to the right", "green", seed=1))
    assert (got["colour"], got["shape"], got["motion"]) == ("green", "square", "moves to the right")
    # a medium square: half side 0.85 * 0.2 * 48 px, so sqrt(area) / 48 = 2 * 0.17 = 0.34
    assert got["scale"] == pytest.approx(0.34, abs=0.04)
    assert 0 <= got["frames_in_frame"] <= 1 and got["in_frame"] == (got["frames_in_frame"] == 1)
    x, y = got["start"]  # moving right: it starts in the left part of the frame
    assert 0 < x < 0.5 and 0 < y < 1
    empty = measure(-torch.ones(3, 4, 16, 16))
    assert (empty["shape"], empty["in_frame"], empty["scale"], empty["start"]) == (None, False, 0.0, None)


def test_agreement_needs_the_same_recognised_class_at_every_size():
    group = [{"m_colour": "red", "m_shape": "circle", "m_motion": "moves up", "m_scale": 0.2, "m_in_frame": True,
              "m_frames_in_frame": 1.0, "m_start": (0.5, 0.7), "colour": "red", "shape": "circle",
              "motion": "moves up"} for _ in SIZES]
    assert agree(group, "m_shape")
    split = [dict(r) for r in group]
    split[2]["m_shape"] = "square"
    unseen = [dict(r, m_colour=None) for r in group]
    assert not agree(split, "m_shape") and not agree(unseen, "m_colour")
    result = summarise({("shared", 0, 0): group, ("shared", 1, 0): split}, "shared")
    assert (result["groups"], result["agree_all"], result["agree_shape"], result["agree_colour"]) == (2, 0.5, 0.5, 1)
    assert result["scale_spread"] == 0 and result["start_spread"] == 0 and result["in_frame"] == 1
    moved = [dict(r, m_start=(0.5, 0.7) if i % 2 else (0.5, 0.2)) for i, r in enumerate(group)]
    assert summarise({("shared", 0, 0): moved}, "shared")["start_spread"] > 0.2


def test_modes_are_compared_on_the_pairs_they_share():
    def rows(mode, index, seed, sizes=SIZES):
        return [{"mode": mode, "index": index, "seed": seed, "height": h, "width": w} for h, w in sizes]

    ran = (rows("independent", 0, 0) + rows("shared", 0, 0) + rows("resampled", 0, 0)
           + rows("independent", 0, 1) + rows("resampled", 0, 1)  # seed 1 without "shared"
           + rows("independent", 1, 1) + rows("resampled", 1, 1, SIZES[:2]))  # a group cut short
    every = groups_of(ran)
    assert set(every) == {("independent", 0, 0), ("shared", 0, 0), ("resampled", 0, 0)}
    two = groups_of(ran, ("independent", "resampled"))
    assert set(two) == {(m, 0, s) for m in ("independent", "resampled") for s in (0, 1)}
    tables = comparisons(ran)
    assert [(modes, len(g)) for modes, g in tables] == [(("independent", "shared", "resampled"), 3),
                                                       (("independent", "resampled"), 4)]
