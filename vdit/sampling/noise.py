"""The sampler's initial noise: independent per video, or one seed's canvas shared by videos of several sizes.

A sampler starts each video from i.i.d. N(0, 1) noise. With ``"independent"`` noise (the default) every
video draws its own tensor of its own shape, so the same seed at two sizes gives unrelated noise and, often,
a different subject. The shared modes draw one canvas per seed and derive every size from it:

- ``"shared"``: a crop of the canvas, centre-aligned in height and width and starting at the canvas's first
  frame (a shorter video is the beginning of a longer one). Two sizes see the same noise where their crops
  overlap, at the same pixel offset from the centre. A crop of i.i.d. values is i.i.d.
- ``"resampled"``: the canvas scaled to the size, so two sizes see the same noise at the same *fractional*
  position in the frame. Each axis of the canvas (N samples) is cut into n contiguous, disjoint groups
  (canvas index k goes to group floor(k n / N)); an output value is the sum of its block of canvas values
  divided by the square root of the block's count. A sum of m independent N(0, 1) values is N(0, m), so
  each output is N(0, 1), and disjoint blocks keep the outputs independent: the result is i.i.d. N(0, 1)
  exactly, while each output still carries the canvas's noise of its region (the coarse layout the model
  turns into the subject). This needs the canvas at least as large as the size on every axis.

The canvas is ``canvas`` (frames, height, width) when given, else the bounding box of the batch's sizes.
A fixed canvas makes a size's noise independent of which other sizes share its batch; see
:data:`DEFAULT_CANVAS_HW` for the one the demo CLI uses.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch

MODES = ("independent", "shared", "resampled")
DEFAULT_CANVAS_HW = (128, 128)  # the demo CLI's canvas (height, width): sizes up to 128x128 fit in it


def _draw(shape: Sequence[int], seed: int) -> torch.Tensor:
    """float32 N(0, 1) of ``shape`` from a CPU generator seeded with ``seed`` (device independent)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def crop(canvas: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The (C, T, H, W) ``size`` crop of ``canvas`` (C, T', H', W'): frames from the first, H and W centred.

    The offset on a spatial axis is (H' - H) // 2, so sizes of the same parity share their centre pixel exactly.
    """
    _, t, h, w = size
    _, _, ch, cw = canvas.shape
    top, left = (ch - h) // 2, (cw - w) // 2
    return canvas[:, :t, top:top + h, left:left + w]


def _block_sum(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """``x`` with axis ``dim`` (N) cut into n contiguous disjoint blocks, each summed and divided by sqrt(count)."""
    big = x.shape[dim]
    if n == big:
        return x
    groups = torch.arange(big) * n // big  # non-decreasing, every group 0..n-1 non-empty since n <= N
    counts = torch.bincount(groups, minlength=n).to(x.dtype)
    shape = list(x.shape)
    shape[dim] = n
    summed = torch.zeros(shape, dtype=x.dtype).index_add_(dim, groups, x)
    view = [1] * x.dim()
    view[dim] = n
    return summed / counts.sqrt().view(view)


def resample(canvas: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``canvas`` (C, T', H', W') scaled down to ``size`` (C, T, H, W) by renormalised block sums (module doc):
    i.i.d. N(0, 1) when the canvas is. Every axis of ``size`` must be <= the canvas's."""
    out = canvas
    for dim in (1, 2, 3):
        out = _block_sum(out, dim, size[dim])
    return out


@dataclasses.dataclass(frozen=True)
class InitialNoise:
    """How the sampler draws each video's starting noise (module doc).

    Args:
        mode: ``"independent"`` (each video its own draw of its own shape; the default), ``"shared"`` (a crop
            of the seed's canvas) or ``"resampled"`` (the canvas scaled to the size).
        canvas: (frames, height, width) of the canvas of the shared modes; None: the bounding box of the
            sizes in the batch. Every size must fit inside it.
    """

    mode: str = "independent"
    canvas: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"noise mode must be one of {MODES}, got {self.mode!r}")
        if self.canvas is not None:
            canvas = tuple(int(s) for s in self.canvas)
            if len(canvas) != 3 or min(canvas) < 1:
                raise ValueError(f"noise canvas must be three positive sizes (frames, height, width), "
                                 f"got {self.canvas}")
            object.__setattr__(self, "canvas", canvas)

    @classmethod
    def of(cls, noise: InitialNoise | str | None) -> InitialNoise:
        """An InitialNoise from a mode name, an InitialNoise or None (independent)."""
        if noise is None:
            return cls()
        if isinstance(noise, InitialNoise):
            return noise
        if not isinstance(noise, str):
            raise TypeError(f"noise must be a mode name, an InitialNoise or None, got {type(noise).__name__}")
        return cls(mode=noise)

    def canvas_for(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
        """(frames, height, width) of the canvas for a batch of ``shapes`` (C, T, H, W); a ValueError naming
        ``canvas`` when one does not fit."""
        if self.canvas is None:
            return tuple(max(s[d] for s in shapes) for d in (1, 2, 3))
        for s in shapes:
            if any(a > b for a, b in zip(s[1:], self.canvas)):
                raise ValueError(f"noise canvas {'x'.join(map(str, self.canvas))} (frames x height x width) does "
                                 f"not contain the size {'x'.join(map(str, s[1:]))}")
        return self.canvas

    def draw(self, shapes: Sequence[Sequence[int]], seeds: Sequence[int]) -> list[torch.Tensor]:
        """float32 CPU noise per shape: list of (C, T, H, W), video i from seed ``seeds[i]``.

        Independent noise is ``torch.randn(shape)`` from a generator seeded with the video's seed; the shared
        modes draw the (C, *canvas) tensor from that generator and crop or resample it.
        """
        if len(seeds) != len(shapes):
            raise ValueError(f"seeds must give one seed per shape: {len(seeds)} seeds for {len(shapes)} shapes")
        if self.mode == "independent":
            return [_draw(shape, seed) for shape, seed in zip(shapes, seeds)]
        canvas = self.canvas_for(shapes)
        derive = crop if self.mode == "shared" else resample
        canvases: dict[tuple[int, int], torch.Tensor] = {}  # (channels, seed) -> canvas, drawn once per batch
        out = []
        for shape, seed in zip(shapes, seeds):
            key = (shape[0], seed)
            if key not in canvases:
                canvases[key] = _draw((shape[0], *canvas), seed)
            out.append(derive(canvases[key], shape).contiguous())
        return out


def seeds_of(seed: int | Sequence[int], count: int) -> list[int]:
    """Per-video seeds: ``seed + i`` for the i-th of ``count`` videos, or the ``count`` seeds given."""
    try:
        base = operator.index(seed)  # an int of any kind (Python, NumPy, a 0-d integer tensor)
    except TypeError:
        seeds = [operator.index(s) for s in seed]
    else:
        return [base + i for i in range(count)]
    if len(seeds) != count:
        raise ValueError(f"seed must be an int or one seed per video: got {len(seeds)} seeds for {count} videos")
    return seeds

