"""Rectified-flow samplers (Euler, Heun) with time shift and classifier-free guidance.

Convention (vdit.training): x_t = (1 - t) x_0 + t * noise and the model predicts v = noise - x_0, so a
sampler integrates dx/dt = v from t = 1 (noise) to t = 0 (data). Every sample of a batch has its own
(T, H, W); the conditional and unconditional passes of guidance run as one packed forward.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from vdit.sampling.cache import CacheRun, CacheStats, StepCache
from vdit.sampling.noise import InitialNoise, seeds_of

ModelFn = Callable[[list, torch.Tensor, torch.Tensor, torch.Tensor], list]


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Open-Sora time shift ``shift * t / (1 + (shift - 1) * t)``: shift > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """Resolution-dependent shift: grows with sqrt(tokens / base_tokens) (larger videos need more noise)."""
    return base_shift * math.sqrt(max(num_tokens, 1) / base_tokens)


def sample_timesteps_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) float64 times from 1 down to 0, shifted."""
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _concat_packed(a: torch.Tensor, cu_a: torch.Tensor, b: torch.Tensor, cu_b: torch.Tensor):
    """Two packed batches -> one (tokens of a, then of b) with merged offsets."""
    return torch.cat([a, b]), torch.cat([cu_a, cu_b[1:] + cu_a[-1]])


class FlowSampler:
    """Sample videos from a velocity model.

    Args:
        model: ``model(videos, t (B,), context, cu_seqlens_context) -> list of velocities``.
        steps: number of integration steps; method: ``"euler"`` or ``"heun"`` (2 model calls per step).
        shift: time shift (1.0 = none); None picks :func:`resolution_shift` of the largest sample.
        guidance: classifier-free guidance scale (1.0 = off).
        cache: step caching (vdit.sampling.cache): None / ``"none"`` (off), ``"first_block"`` or a
            :class:`~vdit.sampling.cache.StepCache`; on, ``model`` must implement
            :class:`~vdit.sampling.cache.StepCacheModel` (VideoDiT does). ``cache_stats`` then holds what the last
            call skipped (:class:`~vdit.sampling.cache.CacheStats`).
        noise: the initial noise (vdit.sampling.noise): ``"independent"`` (the default: each video its own
            draw), ``"shared"`` (crops of one canvas per seed, so sizes overlap in noise), ``"resampled"`` (the
            canvas scaled to each size) or an :class:`~vdit.sampling.noise.InitialNoise` with a fixed canvas.
    """

    def __init__(self, model: ModelFn, *, steps: int = 30, method: str = "euler", shift: float | None = 3.0,
                 guidance: float = 4.0, progress: bool = True, cache: StepCache | str | None = None,
                 noise: InitialNoise | str | None = None):
        if method not in ("euler", "heun"):
            raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.cache = StepCache.of(cache)
        self.noise = InitialNoise.of(noise)
        if self.cache is not None and not all(hasattr(model, n) for n in ("first_block", "remaining_blocks",
                                                                           "final_layer")):
            raise TypeError("cache needs a model with first_block, remaining_blocks and final_layer "
                            f"(vdit.sampling.cache.StepCacheModel); got {type(model).__name__}")
        self.model, self.steps, self.method, self.shift = model, steps, method, shift
        self.guidance, self.progress = guidance, progress
        self.cache_stats: CacheStats | None = None
        self._run: CacheRun | None = None  # the cache of the sampling run in progress
        self._step = 0

    def _call_model(self, videos: list, t: torch.Tensor, context, cu_ctx) -> list:
        if self._run is None:
            return self.model(videos, t, context, cu_ctx)
        return self._run(self.model, self._step, videos, t, context, cu_ctx)

    def velocity(self, x: list, t: float, context, cu_ctx, uncond, cu_uncond) -> list:
        B = len(x)
        if self.guidance == 1.0 or uncond is None:
            return self._call_model(x, torch.full((B,), t, device=x[0].device), context, cu_ctx)
        both, cu_both = _concat_packed(context, cu_ctx, uncond, cu_uncond)
        v = self._call_model(x + x, torch.full((2 * B,), t, device=x[0].device), both, cu_both)
        return [u + self.guidance * (c - u) for c, u in zip(v[:B], v[B:])]

    @torch.no_grad()
    def __call__(self, shapes: Sequence[Sequence[int]], context: torch.Tensor, cu_seqlens_context: torch.Tensor, *,
                 uncond_context: torch.Tensor | None = None, uncond_cu_seqlens: torch.Tensor | None = None,
                 seed: int | Sequence[int] = 0, device=None, dtype=torch.float32,
                 patch_size=(1, 1, 1)) -> list[torch.Tensor]:
        """Generate one video per shape.

        Args:
            shapes: B shapes (C, T, H, W).
            context, cu_seqlens_context: packed prompt embeddings of the B samples.
            uncond_context, uncond_cu_seqlens: packed unconditional embeddings (B prompts) for guidance.
            seed: sample i starts from noise drawn with seed + i, so it does not depend on the batch; or a
                sequence of B seeds, one per sample (the same seed at several sizes: one subject, with shared
                noise).
            patch_size: used only for the resolution-dependent shift.
        Returns:
            list of B tensors (C, T, H, W).
        """
        device = device or context.device
        noise = self.noise.draw(shapes, seeds_of(seed, len(shapes)))
        x = [n.to(device=device, dtype=dtype) for n in noise]
        shift = self.shift
        if shift is None:
            shift = resolution_shift(max(math.prod(s // p for s, p in zip(sh[1:], patch_size)) for sh in shapes))
        ts = sample_timesteps_schedule(self.steps, shift).tolist()
        args = (context, cu_seqlens_context, uncond_context, uncond_cu_seqlens)
        self._run = None if self.cache is None else CacheRun(self.cache, self.steps)
        try:
            x = self._integrate(x, ts, args)
        finally:
            # The cache's tensors (residuals, references) live only as long as the run.
            self.cache_stats = None if self._run is None else self._run.stats
            self._run = None
        return x

    def _integrate(self, x: list, ts: list[float], args: tuple) -> list:
        bar = tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not self.progress, leave=False)
        for step, (t, t_next) in enumerate(bar):
            self._step = step
            v = self.velocity(x, t, *args)
            if self.method == "heun" and t_next > 0:
                x_pred = [xi + (t_next - t) * vi for xi, vi in zip(x, v)]
                v_next = self.velocity(x_pred, t_next, *args)
                v = [(a + b) / 2 for a, b in zip(v, v_next)]
            x = [xi + (t_next - t) * vi for xi, vi in zip(x, v)]
            if self._run is not None:
                bar.set_postfix_str(f"skipped {self._run.stats.skipped}/{self._run.stats.evaluations}", refresh=False)
        return x
