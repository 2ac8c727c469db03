"""A procedural dataset of captioned videos of moving shapes, at mixed sizes and durations.

Each sample shows one or two objects (circle, square or triangle, in one of several colours and sizes)
on a plain or two-colour background, each moving in one of eight directions or staying still, and
optionally growing or shrinking. Every sample has its own frame count, height and width (landscape,
portrait and square), as native-size video training data does. Samples are generated on the fly and
are a pure function of (seed, index).

Videos are float32 (3, T, H, W) in [-1, 1]; captions are lower-case English, e.g.
"a red circle moves to the left on a black background".
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch

COLORS = {  # name -> RGB in [0, 1]
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "white": (0.97, 0.97, 0.97), "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "cyan": (0.1, 0.85, 0.9),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.45, 0.45, 0.45), "navy": (0.05, 0.05, 0.3),
               "white": (0.97, 0.97, 0.97)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "medium": 0.2, "large": 0.28}  # object radius as a fraction of min(H, W)
# direction name -> unit motion (dx, dy) in image coordinates (y grows downwards)
MOTIONS = {
    "moves to the left": (-1, 0), "moves to the right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
    "moves up and to the left": (-1, -1), "moves up and to the right": (1, -1),
    "moves down and to the left": (-1, 1), "moves down and to the right": (1, 1), "stays still": (0, 0),
}
SCALINGS = {"": 1.0, "grows": 1.6, "shrinks": 0.6}  # final size / initial size
FRAME_COUNTS = (8, 10, 12, 14, 16)


def _held_out_combinations() -> frozenset[tuple[str, str, str]]:
    """(colour, shape, motion) triples never drawn for training: every 6th of the sorted product.

    Each colour, shape and motion still appears in training, only not these combinations, so the demo
    evaluation can test generalization to captions the model has never seen.
    """
    combos = sorted((c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS)
    return frozenset(combos[::6])


HELD_OUT = _held_out_combinations()
SIDES = (32, 40, 48, 56, 64)


@dataclasses.dataclass
class ObjectSpec:
    shape: str
    color: str
    size: str
    motion: str
    scaling: str = ""


@dataclasses.dataclass
class VideoSpec:
    """Everything that determines one sample (the labels used to check generated videos)."""

    frames: int
    height: int
    width: int
    background: str
    background2: str | None  # second colour of a two-colour (top / bottom) background
    objects: list[ObjectSpec]

    def caption(self) -> str:
        parts = [_object_phrase(o) for o in self.objects]
        bg = self.background if self.background2 is None else f"{self.background} and {self.background2}"
        return f"{' and '.join(parts)} on a {bg} background"


def _object_phrase(o: ObjectSpec) -> str:
    size = "" if o.size == "medium" else f"{o.size} "
    phrase = f"a {size}{o.color} {o.shape} {o.motion}"
    return f"{phrase} and {o.scaling}" if o.scaling else phrase


def vocabulary() -> list[str]:
    """Every word a caption of this dataset can contain, sorted."""
    words = {"a", "on", "background", "and"}
    for group in (COLORS, BACKGROUNDS, SHAPES, SIZES, MOTIONS, SCALINGS):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


def random_spec(rng: random.Random, *, frames=None, height=None, width=None, max_objects: int = 2,
                sides: tuple[int, ...] = SIDES, frame_counts: tuple[int, ...] = FRAME_COUNTS) -> VideoSpec:
    """Draw a sample description; sizes are drawn (height and width from ``sides``, frames from
    ``frame_counts``) unless given."""
    n_objects = 1 if max_objects == 1 or rng.random() < 0.7 else 2
    background = rng.choice(list(BACKGROUNDS))
    background2 = None
    if rng.random() < 0.2:
        background2 = rng.choice([b for b in BACKGROUNDS if b != background])
    colors = rng.sample([c for c in COLORS if c not in (background, background2)], n_objects)
    objects = []
    for color in colors:
        shape, motion = rng.choice(SHAPES), rng.choice(list(MOTIONS))
        while (color, shape, motion) in HELD_OUT:
            shape, motion = rng.choice(SHAPES), rng.choice(list(MOTIONS))
        objects.append(ObjectSpec(shape, color, rng.choice(list(SIZES)), motion,
                                  rng.choice(["", "", "", "grows", "shrinks"])))
    return VideoSpec(frames or rng.choice(frame_counts), height or rng.choice(sides), width or rng.choice(sides),
                     background, background2, objects)


def _start_and_end(rng: random.Random, spec: VideoSpec,
                   o: ObjectSpec) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre at the first and last frame, in pixels, keeping the object mostly in view."""
    dx, dy = MOTIONS[o.motion]
    H, W = spec.height, spec.width
    travel = 0.45 * min(H, W)
    margin = SIZES[o.size] * min(H, W) * 0.8 * max(1.0, 1 / math.sqrt(SCALINGS[o.scaling]))

    def coordinate(extent, d):
        if d == 0:
            c = rng.uniform(margin, extent - margin)
            return c, c
        start = rng.uniform(margin, max(margin, extent - margin - travel))
        return (start, start + travel) if d > 0 else (extent - start, extent - start - travel)

    (x0, x1), (y0, y1) = coordinate(W, dx), coordinate(H, dy)
    return (x0, y0), (x1, y1)


def render(spec: VideoSpec, rng: random.Random) -> torch.Tensor:
    """Draw the video of ``spec``: float32 (3, T, H, W) in [-1, 1]."""
    T, H, W = spec.frames, spec.height, spec.width
    video = torch.empty(T, H, W, 3)
    video[:] = torch.tensor(BACKGROUNDS[spec.background])
    if spec.background2 is not None:
        video[:, H // 2:] = torch.tensor(BACKGROUNDS[spec.background2])
    ys = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    for o in spec.objects:
        (x0, y0), (x1, y1) = _start_and_end(rng, spec, o)
        # Radius goes from base / sqrt(s) to base * sqrt(s), so the final / initial ratio is s.
        r0 = SIZES[o.size] * min(H, W) / math.sqrt(SCALINGS[o.scaling])
        color = torch.tensor(COLORS[o.color])
        for t in range(T):
            a = t / (T - 1)
            cx, cy = x0 + a * (x1 - x0), y0 + a * (y1 - y0)
            r = r0 * (1 + a * (SCALINGS[o.scaling] - 1))
            u, v = xs - cx, ys - cy
            if o.shape == "circle":
                mask = u * u + v * v <= r * r
            elif o.shape == "square":
                mask = (u.abs() <= r * 0.85) & (v.abs() <= r * 0.85)
            else:  # upward triangle inscribed in the circle of radius r
                mask = (v <= r * 0.5) & (v >= -r + 1.5 * u.abs() * 1.15)
            video[t][mask] = color
    return video.permute(3, 0, 1, 2).mul(2).sub(1).contiguous()


class ShapesDataset:
    """Deterministic infinite-style dataset: ``dataset[i]`` -> (video (3, T, H, W), caption, spec).

    Args:
        seed: dataset seed; sample i depends only on (seed, i).
        length: nominal length (for iteration and samplers).
        max_objects: 1 or 2.
        sides: the heights and widths (pixels) drawn from; the default is what the demo model trained on.
        frame_counts: the frame counts drawn from.
        square_crops: return the centre square crop (side min(H, W)) of each video instead of the video at its
            native size: the usual practice Sora's report argues against (a crop can cut the subject out of
            frame), for comparing the two. Caption and labels stay the native video's.
    """

    def __init__(self, seed: int = 0, length: int = 1_000_000, max_objects: int = 2,
                 sides: tuple[int, ...] = SIDES, frame_counts: tuple[int, ...] = FRAME_COUNTS,
                 square_crops: bool = False):
        if not sides or not frame_counts or min(sides) < 1 or min(frame_counts) < 1:
            raise ValueError(f"sides and frame_counts must be non-empty and positive, got {sides}, {frame_counts}")
        self.seed, self.length, self.max_objects = seed, length, max_objects
        self.sides, self.frame_counts = tuple(sides), tuple(frame_counts)
        self.square_crops = square_crops

    def __len__(self) -> int:
        return self.length

    def native_spec(self, index: int) -> tuple[VideoSpec, random.Random]:
        """Sample ``index``'s description at its native size, and the generator that renders it."""
        rng = random.Random(f"shapes/{self.seed}/{index}")
        return random_spec(rng, max_objects=self.max_objects, sides=self.sides, frame_counts=self.frame_counts), rng

    def spec(self, index: int) -> tuple[VideoSpec, random.Random]:
        """Sample ``index``'s description at the size ``dataset[index]`` has (square with ``square_crops``)."""
        spec, rng = self.native_spec(index)
        return self._as_returned(spec), rng

    def _as_returned(self, native: VideoSpec) -> VideoSpec:
        """``native`` at the size this dataset returns its video."""
        if not self.square_crops:
            return native
        side = min(native.height, native.width)
        return dataclasses.replace(native, height=side, width=side)

    def __getitem__(self, index: int):
        native, rng = self.native_spec(index)
        video, spec = render(native, rng), self._as_returned(native)
        if self.square_crops:  # the centre square
            top, left = (native.height - spec.height) // 2, (native.width - spec.width) // 2
            video = video[:, :, top:top + spec.height, left:left + spec.width].contiguous()
        return video, native.caption(), spec
