"""Step caching for packed samplers: reuse the transformer's last residual for the videos whose step changes little.

First-Block Cache: every model call runs the first block on the whole packed batch and measures, per video, the
relative L1 change of the first block's residual r1 (its output minus its input) against the last full evaluation
of that video, ``sum |r1 - r1_prev| / sum |r1_prev|``. Below ``threshold`` the remaining blocks are skipped for
that video and the residual of its last full evaluation (last block's output minus first block's output) is added
to the new first block output instead; the videos still computing go on as one packed batch through the remaining
blocks. The decision is per video (each CFG branch is a video of its own in the packed forward, with its own
residual), or per batch (``per="batch"``, the usual decision of caching methods: the relative change of the whole
batch; all videos skip together).

Under sequence parallelism each rank holds a part of each video's tokens: the per-video sums are added over the
group (:func:`reduce_change`) before deciding, so every rank decides the same.

A model takes part by implementing :class:`StepCacheModel` (vdit.models.VideoDiT does).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

METHODS = ("none", "first_block")
DEFAULT_THRESHOLD = 0.3  # benchmarks/results/cpu-step-cache.md: 1.9x on the demo model, accuracy kept


class StepCacheModel(Protocol):
    """A packed model in three stages (see :class:`vdit.models.dit.FirstBlockState` for the state's fields).

    ``first_block(videos, timesteps, context, cu_seqlens_context)`` -> a state with ``hidden`` (n_local, d),
    ``cu_tokens`` int32 (B + 1,) offsets in it, ``group`` (process group or None), ``num_blocks`` and
    ``full_hidden()`` (n, d) on every token. ``remaining_blocks(state, keep)`` -> (n_keep, d) the last block's
    output on the videos ``keep``. ``final_layer(state, hidden (n, d))`` -> list of B outputs.
    """

    def first_block(self, videos, timesteps, context, cu_seqlens_context): ...

    def remaining_blocks(self, state, keep: Sequence[int]) -> torch.Tensor: ...

    def final_layer(self, state, hidden: torch.Tensor) -> list: ...


class BoundStepModel:
    """A :class:`StepCacheModel` whose ``first_block`` always gets the keywords ``options`` (e.g.
    ``sequence_parallel=``), as a sampler calls it with the four positional arguments only."""

    def __init__(self, model, **options):
        self.model, self.options = model, options

    def first_block(self, videos, timesteps, context, cu_seqlens_context):
        return self.model.first_block(videos, timesteps, context, cu_seqlens_context, **self.options)

    def remaining_blocks(self, state, keep):
        return self.model.remaining_blocks(state, keep)

    def final_layer(self, state, hidden):
        return self.model.final_layer(state, hidden)


@dataclasses.dataclass(frozen=True)
class StepCache:
    """Options of step caching (validated; errors name the field).

    Attributes:
        method: ``"none"`` (every step computed) or ``"first_block"``.
        threshold: skip a video's remaining blocks while its first-block change is below this (>= 0).
        max_skips: at most this many consecutive skipped evaluations per video (>= 0).
        first_steps, last_steps: the first / last sampler steps always computed (>= 1 each).
        per: ``"video"`` (each video of the packed batch decides alone) or ``"batch"`` (one decision for all).
    """

    method: str = "first_block"
    threshold: float = DEFAULT_THRESHOLD
    max_skips: int = 3
    first_steps: int = 1
    last_steps: int = 1
    per: str = "video"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"StepCache.method must be one of {METHODS}, got {self.method!r}")
        if not self.threshold >= 0:
            raise ValueError(f"StepCache.threshold must be >= 0, got {self.threshold}")
        if self.max_skips < 0:
            raise ValueError(f"StepCache.max_skips must be >= 0, got {self.max_skips}")
        if self.first_steps < 1 or self.last_steps < 1:
            raise ValueError(f"StepCache.first_steps and last_steps must be >= 1, got {self.first_steps} and "
                             f"{self.last_steps}")
        if self.per not in ("video", "batch"):
            raise ValueError(f"StepCache.per must be 'video' or 'batch', got {self.per!r}")

    @classmethod
    def of(cls, cache: StepCache | str | None, threshold: float | None = None) -> StepCache | None:
        """A StepCache from a method name (``threshold``: None for the default), a StepCache or None; None when off."""
        if cache is None or isinstance(cache, StepCache):
            return None if cache is None or cache.method == "none" else cache
        if not isinstance(cache, str):
            raise TypeError(f"cache must be a method name, a StepCache or None, got {type(cache).__name__}")
        made = cls(method=cache, threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
        return None if made.method == "none" else made


def per_video_sums(values: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """(B,) float64 sum of ``values`` (n, ...) over each video's rows; ``cu`` int32 (B + 1,) offsets."""
    lengths = (cu[1:] - cu[:-1]).long()
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths,
                                       output_size=values.shape[0])
    rows = values.double().flatten(1).sum(1)
    return torch.zeros(len(lengths), dtype=torch.float64, device=values.device).index_add(0, segments, rows)


def reduce_change(diff: torch.Tensor, norm: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video sums ``diff``, ``norm`` (B,) of this rank's tokens, added over the sequence-parallel ``group``
    (None: unchanged), so that every rank of the group sees the same numbers and decides the same."""
    if group is None:
        return diff, norm
    import torch.distributed as dist

    both = torch.stack([diff, norm])
    dist.all_reduce(both, group=group)
    return both[0], both[1]


@dataclasses.dataclass
class CacheStats:
    """What a cached sampling run skipped: ``evaluations`` video evaluations (videos x model calls, CFG branches
    counted apart), ``skipped`` of them reused the residual; ``num_blocks`` blocks per full evaluation."""

    evaluations: int = 0
    skipped: int = 0
    num_blocks: int = 1
    changes: list = dataclasses.field(default_factory=list)  # the measured relative changes, per call and video
    decisions: list = dataclasses.field(default_factory=list)  # per model call: skipped, per video

    @property
    def skipped_share(self) -> float:
        """Share of video evaluations whose remaining blocks were skipped."""
        return self.skipped / max(self.evaluations, 1)

    @property
    def block_share(self) -> float:
        """Share of block evaluations skipped (a skipped evaluation still runs its first block)."""
        return self.skipped_share * (self.num_blocks - 1) / self.num_blocks

    def describe(self) -> str:
        return (f"step cache skipped {self.skipped}/{self.evaluations} video evaluations "
                f"({self.block_share:.0%} of block evaluations)")


class CacheRun:
    """The cache of one sampling run: per video the previous first-block output, the last residual and the count of
    consecutive skips. Dropped (and its tensors freed) when the run ends."""

    def __init__(self, cache: StepCache, steps: int):
        self.cache, self.steps = cache, steps
        self.prev: torch.Tensor | None = None  # (n_local, d) first-block residual of each video's last full evaluation
        self.residuals: list[torch.Tensor | None] = []
        self.skips: list[int] = []
        self.stats = CacheStats()
        self.changes, self.decisions = self.stats.changes, self.stats.decisions

    def change(self, state) -> torch.Tensor:
        """(B,) float64 relative L1 change of each video's first-block output (per="batch": the batch's, repeated)."""
        diff = per_video_sums((state.first_residual - self.prev).abs(), state.cu_tokens)
        norm = per_video_sums(self.prev.abs(), state.cu_tokens)
        diff, norm = reduce_change(diff, norm, state.group)
        if self.cache.per == "batch":
            diff, norm = diff.sum().expand_as(diff), norm.sum().expand_as(norm)
        return diff / norm.clamp_min(1e-12)

    def decide(self, state, step: int) -> list[bool]:
        """Per video: reuse the residual at sampler step ``step``?"""
        batch = len(state.cu_tokens) - 1
        if len(self.residuals) != batch:
            self.residuals, self.skips = [None] * batch, [0] * batch
        always = step < self.cache.first_steps or step >= self.steps - self.cache.last_steps
        if always or self.prev is None or self.prev.shape != state.first_residual.shape:
            return [False] * batch
        change = self.change(state).tolist()
        self.changes.append(change)
        skip = [c < self.cache.threshold and self.residuals[i] is not None and self.skips[i] < self.cache.max_skips
                for i, c in enumerate(change)]
        if self.cache.per == "batch" and not all(skip):
            skip = [False] * batch
        return skip

    def __call__(self, model: StepCacheModel, step: int, videos, timesteps, context, cu_context) -> list:
        """One cached model call: ``model``'s outputs for the packed batch (arguments as a plain model call)."""
        state = model.first_block(videos, timesteps, context, cu_context)
        skip = self.decide(state, step)
        self.record(state, skip)
        full = state.full_hidden()
        cu = state.cu.tolist()
        keep = [i for i, s in enumerate(skip) if not s]
        computed = model.remaining_blocks(state, keep) if keep else None
        parts, offset = [], 0
        for i, skipped in enumerate(skip):
            first = full[cu[i]:cu[i + 1]]
            if skipped:
                parts.append(first + self.residuals[i])
                self.skips[i] += 1
                continue
            out = computed[offset:offset + len(first)]
            offset += len(first)
            self.residuals[i], self.skips[i] = out - first, 0
            parts.append(out)
        return model.final_layer(state, torch.cat(parts))

    def record(self, state, skip: list[bool]) -> None:
        """Keep this call's first-block residual as the reference of the videos computed (a skipped video keeps
        comparing against its last full evaluation, so a slow drift adds up until it is computed again)."""
        new = state.first_residual
        if self.prev is None or self.prev.shape != new.shape or not any(skip):
            self.prev = new
        else:
            cu = state.cu_tokens.tolist()
            computed = [torch.arange(cu[i], cu[i + 1], device=new.device) for i, s in enumerate(skip) if not s]
            self.prev = self.prev.clone()
            if computed:
                rows = torch.cat(computed)
                self.prev[rows] = new[rows]
        self.stats.num_blocks = state.num_blocks
        self.stats.evaluations += len(skip)
        self.stats.skipped += sum(skip)
        self.decisions.append(list(skip))
