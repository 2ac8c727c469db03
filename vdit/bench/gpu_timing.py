"""GPU timing for the benchmark scripts: CUDA-event times after a warm-up, their median and percentiles, and
the file-name slug of a GPU."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

WARMUP = 3
REPS = 20  # timed runs per measurement: the median of at least 20


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolated linearly between the closest ranks
    (numpy's default): 50 is the median."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """{"median", "p10", "p90", "runs"} of a list of times."""
    return dict(median=percentile(times, 50), p10=percentile(times, 10), p90=percentile(times, 90),
                runs=len(times))


def cuda_times(step: Callable[[], object], warmup: int = WARMUP, reps: int = REPS) -> list[float]:
    """Milliseconds of ``reps`` runs of ``step`` after ``warmup`` untimed ones, each between two CUDA events on
    the current stream (so host-side work inside ``step`` counts only where it delays the GPU)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def slug(name: str) -> str:
    """A GPU name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def training_step(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], backward: bool) -> Callable:
    """A step that runs ``fn()`` (forward) or ``fn()`` and its gradients in ``inputs`` (forward + backward)
    with a fixed random output gradient."""
    grad = []

    def step():
        with torch.set_grad_enabled(backward):  # a forward alone saves nothing for a backward
            out = fn()
        if backward:
            if not grad:
                grad.append(torch.randn_like(out))
            torch.autograd.grad(out, inputs, grad[0])
        return out

    return step
