"""VideoDiT: a diffusion transformer over packed spacetime patches, built from vdit modules.

Videos of different (T, H, W) are patch-embedded into one packed sequence; every block runs
self-attention over all spacetime tokens of the same video (3D RoPE), cross-attention to that
sample's text tokens, and an MLP, each modulated per sample by adaLN from the timestep and the
pooled prompt. The model predicts the flow-matching velocity.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdit.distributed import SequenceParallel, gather_packed, local_offsets, shard_bounds, shard_packed
from vdit.models.shard import ShardedVelocity, embed_shard, final_tokens, plan_shard
from vdit.nn import (
    AdaLNModulation,
    PatchEmbed3d,
    PatchUnembed3d,
    RotaryEmbedding3d,
    TileSparseAttention,
    VarlenCrossAttention,
    VarlenSelfAttention,
)
from vdit.ops import SparsePattern, adaln_modulate, gated_residual, unpatchify_3d
from vdit.ops.sparse_pattern import MODES
from vdit.packing import grid_fractions, grid_positions, segment_ids, tile_permutation


@dataclasses.dataclass
class VideoDiTConfig:
    """Hyper-parameters of :class:`VideoDiT`."""

    in_channels: int = 3
    out_channels: int | None = None  # default: in_channels
    patch_size: tuple[int, int, int] = (1, 8, 8)
    hidden_size: int = 256
    depth: int = 6
    heads: int = 4
    kv_heads: int | None = None
    mlp_ratio: float = 4.0
    context_dim: int = 128
    rope_dims: tuple[int, int, int] | None = None  # default: a near-even split of the head dim
    rope_theta: float = 10000.0
    qk_norm: str | None = "rms"
    fractional_positions: bool = False  # add FractionalPositionEmbedding to the tokens (see there)
    prompt_velocity: bool = False  # shift those positions by a velocity read from the prompt (PromptVelocity)
    # Self-attention: "dense", or spacetime block-sparse over tiles of `tile` tokens (vdit.nn.TileSparseAttention):
    # "sliding_tile" (a window of `window` tiles) or "topk_tile" (the `topk` best tiles plus a gated coarse pass),
    # validated and used as one vdit.ops.SparsePattern (sparse_pattern()).
    attention: str = "dense"
    # 64 tokens: a GPU's 64-row MMA blocks are then full (32-token tiles leave half of every block idle; see
    # docs/sparse-gpu-cost-model.md), and the sparse demo model (vdit/demo/assets/demo-sta) was trained at 4x4x4.
    tile: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (3, 3, 3)
    topk: int = 8

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.prompt_velocity and not self.fractional_positions:
            raise ValueError("prompt_velocity moves the fractional positions: it needs fractional_positions=True")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by heads {self.heads}")
        patch_features = self.in_channels * math.prod(self.patch_size)
        if patch_features > self.hidden_size:
            # A token narrower than its patch cannot carry the noise of every pixel: the predicted velocity
            # misses those directions and samples keep that noise (seen with 2x8x8 RGB patches, width 256).
            warnings.warn(f"VideoDiTConfig: a patch has {patch_features} features but tokens only {self.hidden_size} "
                          "dimensions; the model cannot represent every pixel's noise (use smaller patches or a "
                          "wider model)", stacklevel=3)
        if self.rope_dims is None:
            self.rope_dims = RotaryEmbedding3d.even_split(self.head_dim)
        self.rope_dims = tuple(self.rope_dims)
        if self.attention not in ("dense", *MODES):
            raise ValueError(f"attention must be one of {('dense', *MODES)}, got {self.attention!r}")
        self.tile, self.window = tuple(self.tile), tuple(self.window)
        self.sparse_pattern()  # validates tile and window or topk of a block-sparse attention

    def sparse_pattern(self) -> SparsePattern | None:
        """The self-attention's :class:`~vdit.ops.SparsePattern` (None for dense attention); each mode reads
        its own fields (``window`` or ``topk``) and ignores the other's. Errors name the config field."""
        if self.attention == "dense":
            return None
        try:
            return SparsePattern.of(self.attention, self.tile, window=self.window, topk=self.topk)
        except (TypeError, ValueError) as exc:
            raise type(exc)(str(exc).replace("SparsePattern.", "VideoDiTConfig.")) from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @classmethod
    def preset(cls, name: str, **overrides) -> VideoDiTConfig:
        """``tiny`` (tests), ``small`` (CPU benchmarks, demo size class) or ``xl`` (~1.0B parameters, the
        size class of Open-Sora / Latte XL, for GPU benchmarks), on 16-channel latents for small/xl."""
        presets = {
            "tiny": dict(in_channels=3, patch_size=(1, 4, 4), hidden_size=64, depth=2, heads=4, context_dim=32),
            "small": dict(in_channels=16, patch_size=(1, 2, 2), hidden_size=384, depth=12, heads=6, context_dim=512),
            "xl": dict(in_channels=16, patch_size=(1, 2, 2), hidden_size=1152, depth=28, heads=16, context_dim=4096),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps t (B,) in [0, 1] (scaled by 1000 as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FractionalPositionEmbedding(nn.Module):
    """Learned embedding of where a token lies in its clip (NaViT's fractional positions, per axis).

    3D RoPE tells attention only the offset between two tokens. A caption such as "moves to the left"
    pins absolute places (on the right in the first frames, on the left in the last), which a model without
    this embedding must infer indirectly, from which offsets a token finds occupied at the clip's edges.
    Fractions rather than indices keep the meaning the same at every size and duration.

    ``forward(fractions)``: (n, 3) float, in (0, 1) as :func:`vdit.packing.grid_fractions` gives them (a
    :class:`PromptVelocity` moves them outside at times) -> (n, dim). The
    projection starts at zero, so adding the embedding to a trained model leaves its function unchanged.
    """

    def __init__(self, dim: int, frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.empty(frequencies, dtype=torch.float32), persistent=False)
        self.reset_buffers()
        self.proj = nn.Linear(6 * frequencies, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def reset_buffers(self) -> None:
        """Fill the frequency table (not saved with the weights): at construction, and after ``to_empty``."""
        n = self.freqs.numel()
        self.freqs.copy_(math.pi * torch.arange(1, n + 1, dtype=torch.float32, device=self.freqs.device))

    def forward(self, fractions: torch.Tensor) -> torch.Tensor:
        angles = (fractions.float()[:, :, None] * self.freqs).flatten(1)  # (n, 3 * frequencies)
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype))  # computed in float32, projected in the model's dtype


class PromptVelocity(nn.Module):
    """A velocity per prompt that moves the frame in which the fractional (h, w) positions are measured.

    Where a prompt names a motion ("moves to the left"), where an object is depends on a product of its
    position, the time and the motion word. Attention and MLPs can represent that product only through
    features that all start near zero (position features and a difference between motion words), so its
    gradient is second order and training may not find it. This module makes it first order: it reads a
    velocity v = tanh(W pooled) from the pooled prompt, in fractions of the frame per clip (at most one
    frame height / width), and measures each token's (h, w) in a frame moving with it,
    (h, w) - v (t - 1/2). The layout the model already places from the fractions then follows the prompt.
    There is one velocity per clip: it moves one object, or a whole scene like a camera pan; objects that
    move apart still rely on attention. The map starts at zero (no shift), so adding the module to a trained
    model leaves its function unchanged.

    ``forward(fractions, pooled, tokens_per_sample)``:
        fractions: (n, 3) float (t, h, w) of the packed tokens, in (0, 1) (:func:`vdit.packing.grid_fractions`),
        pooled: (B, C) pooled prompt embeddings (C = context_dim),
        tokens_per_sample: (B,) int64 token count of each clip (sums to n),
        returns (n, 3) float32: t unchanged, (h, w) - v (t - 1/2) with the v of the token's clip.
    """

    def __init__(self, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(context_dim, 2)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, fractions: torch.Tensor, pooled: torch.Tensor, tokens_per_sample: torch.Tensor) -> torch.Tensor:
        # tanh: at most one frame height / width per clip. Unbounded, the velocities of a probe run grew to
        # tens of frames per clip, a text-dependent phase of the sin/cos position features rather than a motion.
        velocity = torch.tanh(self.proj(pooled.to(self.proj.weight.dtype)).float())
        velocity = torch.repeat_interleave(velocity, tokens_per_sample, dim=0,
                                           output_size=fractions.shape[0])  # (n, 2): (h, w) per clip, in fractions
        t = fractions[:, :1].float()
        return torch.cat([t, fractions[:, 1:].float() - velocity * (t - 0.5)], dim=1)


@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """What every :class:`DiTBlock` of one forward reads besides its tokens x (the same for all blocks).

    Attributes:
        c: (B, hidden) adaLN conditioning per sample.
        cu: int32 (B + 1,) offsets of the whole packed batch (self-attention); max_len: its longest video.
        positions: (n, 3) (t, h, w) grid positions of x's tokens; rope: the model's RotaryEmbedding3d.
        context: (total_ctx, context_dim) packed text; cu_ctx: int32 (B + 1,) its offsets; max_ctx: the
            longest prompt.
        sequence_parallel: the :class:`vdit.distributed.SequenceParallel` x is sharded over, or None.
        cu_local: int32 (B + 1,) offsets of this rank's shard (per-sample adaLN, cross-attention); None: ``cu``.
        grids: int (B, 3) the videos' token grids when the attention is tile-sparse (x in tile order), else None.
    """

    c: torch.Tensor
    cu: torch.Tensor
    max_len: int
    positions: torch.Tensor
    rope: nn.Module
    context: torch.Tensor
    cu_ctx: torch.Tensor
    max_ctx: int
    sequence_parallel: SequenceParallel | None = None
    cu_local: torch.Tensor | None = None
    grids: torch.Tensor | None = None

    @property
    def cu_tokens(self) -> torch.Tensor:
        """Offsets of the tokens x holds: the shard's with sequence parallelism, else the batch's."""
        return self.cu if self.cu_local is None else self.cu_local


class DiTBlock(nn.Module):
    """adaLN -> self-attention (3D RoPE) -> gated residual -> cross-attention -> adaLN -> MLP -> gated residual."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.modulation = AdaLNModulation(d, d, chunks=6)
        if cfg.attention == "dense":
            self.attn = VarlenSelfAttention(d, cfg.heads, kv_heads=cfg.kv_heads, qk_norm=cfg.qk_norm)
        else:
            self.attn = TileSparseAttention(d, cfg.heads, pattern=cfg.sparse_pattern(), kv_heads=cfg.kv_heads,
                                            qk_norm=cfg.qk_norm)
        self.cross_norm = nn.LayerNorm(d, eps=1e-6)
        self.cross = VarlenCrossAttention(d, cfg.context_dim, cfg.heads, qk_norm=cfg.qk_norm)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.keep_attention = False  # selective activation checkpointing (VideoDiT.enable_activation_checkpointing)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """x (n, hidden) packed tokens -> (n, hidden); ``inputs``: what every block of the forward reads
        (:class:`BlockInputs`). With sequence parallelism x is this rank's shard; with tile-sparse attention
        x is in tile order."""
        mod = self.modulation(inputs.c)  # six (B, hidden) tensors: small, kept in either case
        if self.keep_attention and torch.is_grad_enabled():
            # Selective activation checkpointing: the parts before and after self-attention are recomputed in
            # the backward, self-attention is not (its autograd keeps q, k, v, the output and the log-sum-exp),
            # so the backward runs no attention forward and repeats no sequence-parallel collective.
            h, q, k, v = checkpoint(self.before_attention, x, mod, inputs, use_reentrant=False)
            out, extra = self.attention(q, k, v, inputs)
            return checkpoint(self.after_attention, x, mod, h, out, extra, inputs, use_reentrant=False)
        h, q, k, v = self.before_attention(x, mod, inputs)
        return self.after_attention(x, mod, h, *self.attention(q, k, v, inputs), inputs)

    def before_attention(self, x: torch.Tensor, mod, inputs: BlockInputs):
        """(h, q, k, v): the attention's input h (n, hidden) (adaLN of x by the first two of the six (B, hidden)
        modulations ``mod``) and its projections q (n, heads, head_dim), k, v (n, kv_heads, head_dim)."""
        h = adaln_modulate(x, mod[0], mod[1], inputs.cu_tokens)
        return (h, *self.attn.project(h, inputs.positions, inputs.rope))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: BlockInputs):
        """The self-attention core (every sequence-parallel collective of the block): (out, extra or None)."""
        return self.attn.attend(q, k, v, inputs.cu, inputs.max_len, grids=inputs.grids,
                                sequence_parallel=inputs.sequence_parallel)

    def after_attention(self, x: torch.Tensor, mod, h: torch.Tensor, out: torch.Tensor, extra, inputs: BlockInputs):
        """The rest of the block from the attention's ``out`` (and ``extra``): (n, hidden)."""
        cu_local = inputs.cu_tokens
        _, _, gate1, shift2, scale2, gate2 = mod
        x = gated_residual(x, self.attn.output(h, out, extra), gate1, cu_local)
        x = x + self.cross(self.cross_norm(x), cu_local, inputs.context, inputs.cu_ctx, inputs.max_len, inputs.max_ctx)
        h = self.mlp(adaln_modulate(x, shift2, scale2, cu_local))
        return gated_residual(x, h, gate2, cu_local)


@dataclasses.dataclass
class FirstBlockState:
    """One forward of :class:`VideoDiT` stopped after its first block (the step-cache interface, vdit.sampling.cache).

    Attributes:
        hidden: (n_local, hidden) the first block's output on this rank's tokens (all tokens without sequence
            parallelism), in the blocks' token order.
        first_residual: (n_local, hidden) what the first block added to its input (``hidden`` minus the input).
        cu_tokens: int32 (B + 1,) offsets of each video's tokens in ``hidden``.
        cu: int32 (B + 1,) offsets of the whole packed batch (:meth:`full_hidden`'s rows).
        group: the sequence-parallel process group the per-video statistics of ``hidden`` are summed over, or None.
        num_blocks: the model's depth (blocks per full forward).
    The rest is the forward's own state (conditioning, grids, sharding), read by the model's later stages.
    """

    hidden: torch.Tensor
    first_residual: torch.Tensor
    cu_tokens: torch.Tensor
    cu: torch.Tensor
    group: object
    num_blocks: int
    inputs: BlockInputs
    grids: torch.Tensor
    perm: torch.Tensor | None
    bounds: list[int] | None
    _full: torch.Tensor | None = None

    def full_hidden(self) -> torch.Tensor:
        """(n, hidden) the first block's output on every token of the batch (gathered over the group once)."""
        if self._full is None:
            sp = self.inputs.sequence_parallel
            self._full = self.hidden if sp is None else gather_packed(self.hidden, int(self.cu[-1]), sp.group,
                                                                      self.bounds)
        return self._full


class VideoDiT(nn.Module):
    """Text-conditioned video diffusion transformer over packed variable-size videos.

    ``forward(videos, timesteps, context, cu_seqlens_context, sequence_parallel=None)``:
        videos: list of B tensors (C_in, Ti, Hi, Wi) (noisy inputs; sizes divisible by the patch size),
        timesteps: (B,) float in [0, 1] (flow-matching time, 1 = pure noise),
        context: (total_ctx, context_dim) packed text embeddings, cu_seqlens_context int32 (B + 1,),
        sequence_parallel: a :class:`vdit.distributed.SequenceParallel`; every rank passes the same inputs,
            the patch embedding, the blocks and the final layer run on this rank's token shard, and the
            velocity tokens are gathered into the videos at the end (:meth:`forward_shard` stops before that,
            for a loss on the shard). Gradients of the replicated parameters are partial per rank: average them
            over the group (DDP over the group does this).
        Returns a list of B tensors (C_out, Ti, Hi, Wi): the predicted velocity (noise - data).

    ``enable_activation_checkpointing()`` recomputes each block in the backward (sequence-parallel runs too);
    ``keep_attention=True`` recomputes all but self-attention (no collective runs twice).

    torch.compile: every block traces into one graph (``fullgraph=True``; tests/models/test_dit.py). CUDA graphs:
    the forward reads the batch's packing on the host (grid positions, max_seqlen, per-sample lengths), so
    capture compiled blocks for a fixed packing rather than the whole forward (in eager mode the ops'
    input validation also reads ``cu_seqlens`` on the host; under torch.compile it is skipped).
    """

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed3d(cfg.in_channels, d, cfg.patch_size)
        self.position_embed = FractionalPositionEmbedding(d) if cfg.fractional_positions else None
        self.prompt_velocity = PromptVelocity(cfg.context_dim) if cfg.prompt_velocity else None
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_text = nn.Sequential(nn.Linear(cfg.context_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.rope = RotaryEmbedding3d(cfg.head_dim, cfg.rope_dims, cfg.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_modulation = AdaLNModulation(d, d, chunks=2)
        self.unembed = PatchUnembed3d(d, cfg.out_channels, cfg.patch_size)
        nn.init.zeros_(self.unembed.weight)  # start by predicting zero velocity
        nn.init.zeros_(self.unembed.bias)
        self.activation_checkpointing = False  # see enable_activation_checkpointing

    def enable_activation_checkpointing(self, enabled: bool = True, *, keep_attention: bool = False) -> VideoDiT:
        """Keep only each block's inputs in the forward and recompute the block in the backward (memory for
        time: activations of one block instead of all); outputs and gradients are unchanged. Returns self.

        With ``keep_attention`` (selective checkpointing) each block keeps its self-attention's inputs, output
        and log-sum-exp too and recomputes only the rest: the backward runs no attention forward and, with
        sequence parallelism, no collective twice, for q, k, v and the output of every block kept in memory."""
        self.activation_checkpointing = bool(enabled) and not keep_attention  # whole blocks, in forward
        for block in self.blocks:
            block.keep_attention = bool(enabled) and keep_attention
        return self

    @staticmethod
    def pooled_context(context: torch.Tensor, cu_ctx: torch.Tensor) -> torch.Tensor:
        """(B, context_dim) mean of each sample's text tokens."""
        lengths = (cu_ctx[1:] - cu_ctx[:-1]).clamp_min(1).to(context.dtype)
        seg = segment_ids(cu_ctx, context.shape[0])
        pooled = torch.zeros(len(lengths), context.shape[1], dtype=context.dtype, device=context.device)
        return pooled.index_add(0, seg, context) / lengths[:, None]

    def conditioning(self, timesteps: torch.Tensor, context: torch.Tensor, cu_ctx: torch.Tensor,
                     pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(B, hidden) adaLN input: timestep embedding + pooled (mean) text embedding per sample (``pooled``:
        :meth:`pooled_context` of the same context, if the caller has it already)."""
        pooled = self.pooled_context(context, cu_ctx) if pooled is None else pooled
        return self.time_mlp(timestep_embedding(timesteps, 256).to(context.dtype)) + self.pooled_text(pooled)

    @staticmethod
    def _check_counts(videos, timesteps, cu_ctx) -> None:
        if len(videos) != timesteps.shape[0] or cu_ctx.shape[0] != len(videos) + 1:
            raise ValueError(f"got {len(videos)} videos, {timesteps.shape[0]} timesteps and "
                             f"{cu_ctx.shape[0] - 1} prompts; they must match")

    def _embed(self, videos, timesteps, context, cu_ctx):
        """Check the batch, patch-embed it and condition it: (x (total, D) in raster order, cu_seqlens, grids,
        positions (total, 3), c (B, D)); arguments as :meth:`forward`."""
        self._check_counts(videos, timesteps, cu_ctx)
        x, cu, grids = self.patch_embed(list(videos))
        positions = grid_positions(grids)
        pooled = self.pooled_context(context, cu_ctx)
        if self.position_embed is not None:
            fractions = grid_fractions(grids, positions)
            if self.prompt_velocity is not None:
                fractions = self.prompt_velocity(fractions, pooled, grids.prod(1).to(fractions.device))
            x = x + self.position_embed(fractions).to(x.dtype)
        return x, cu, grids, positions, self.conditioning(timesteps, context, cu_ctx, pooled)

    def forward(self, videos: Sequence[torch.Tensor], timesteps: torch.Tensor, context: torch.Tensor,
                cu_seqlens_context: torch.Tensor,
                sequence_parallel: SequenceParallel | None = None) -> list[torch.Tensor]:
        if sequence_parallel is not None:
            shard = self.forward_shard(videos, timesteps, context, cu_seqlens_context, sequence_parallel)
            return self.gather_velocity(shard, sequence_parallel)
        x, cu, grids, positions, c = self._embed(videos, timesteps, context, cu_seqlens_context)
        perm = None
        if self.config.attention != "dense":
            # Tile order for the blocks, once; per-sample ops (adaLN, cross-attention) are order-free.
            perm = tile_permutation(grids, self.config.tile)
            x, positions = x[perm], positions[perm]
        inputs, x, _ = self._block_inputs(x, cu, grids, positions, c, context, cu_seqlens_context, None)
        x = self._run_blocks(x, inputs)
        if perm is not None:
            x = x[perm.argsort()]  # back to raster order for unpatchify
        shift, scale = self.final_modulation(c)
        return self.unembed(adaln_modulate(x, shift, scale, cu), cu_seqlens=cu, grids=grids)

    def _run_blocks(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Recomputed in the backward, collectives of sequence parallelism included: every rank
                # recomputes its blocks in the same (reverse) order, so they pair up again.
                x = torch.utils.checkpoint.checkpoint(block, x, inputs, use_reentrant=False)
            else:
                x = block(x, inputs)
        return x

    def forward_shard(self, videos: Sequence[torch.Tensor], timesteps: torch.Tensor, context: torch.Tensor,
                      cu_seqlens_context: torch.Tensor, sequence_parallel: SequenceParallel) -> ShardedVelocity:
        """The forward on this rank's tokens only (arguments as :meth:`forward`, the same on every rank of
        ``sequence_parallel``): patch embedding, blocks and final layer all run on the rank's range of the
        packed tokens (:mod:`vdit.models.shard`). Returns its :class:`ShardedVelocity`: (n_r, C * pt * ph * pw)
        velocity tokens and which patches they are, for a loss on the shard (:func:`vdit.training.
        flow_matching_loss` reduces one scalar) or :meth:`gather_velocity`."""
        cfg = self.config
        self._check_counts(videos, timesteps, cu_seqlens_context)
        tile = cfg.tile if cfg.attention != "dense" else None
        plan = plan_shard(videos, cfg.in_channels, cfg.patch_size, tile, sequence_parallel)
        pooled = self.pooled_context(context, cu_seqlens_context)
        x, positions = embed_shard(self, videos, plan, pooled)
        c = self.conditioning(timesteps, context, cu_seqlens_context, pooled)
        max_len = max((b - a for a, b in zip(plan.cu_host, plan.cu_host[1:])), default=0)
        max_ctx = int((cu_seqlens_context[1:] - cu_seqlens_context[:-1]).max())
        inputs = BlockInputs(c, plan.cu, max_len, positions, self.rope, context, cu_seqlens_context, max_ctx,
                             sequence_parallel=sequence_parallel, cu_local=plan.cu_local,
                             grids=plan.grids if tile is not None else None)
        x = self._run_blocks(x, inputs)
        return ShardedVelocity(final_tokens(self, x, c, plan), plan, tuple(cfg.patch_size))

    def gather_velocity(self, shard: ShardedVelocity, sequence_parallel: SequenceParallel) -> list[torch.Tensor]:
        """Every rank's velocity tokens gathered into the B videos (C_out, Ti, Hi, Wi) :meth:`forward` returns
        (differentiable: each rank's tokens get the gradient summed over ranks)."""
        plan = shard.plan
        tokens = gather_packed(shard.tokens, plan.total, sequence_parallel.group, plan.bounds)
        if plan.perm is not None:
            tokens = tokens[plan.perm.argsort()]  # back to raster order for unpatchify
        return [unpatchify_3d(tokens[a:b][None], grid, shard.patch_size)[0]
                for a, b, grid in zip(plan.cu_host, plan.cu_host[1:], plan.grid_host)]

    # The step-cache interface (vdit.sampling.cache.StepCacheModel): the forward above in three stages, so that
    # a sampler can run the remaining blocks on only the videos whose step it does not reuse.
    def first_block(self, videos: Sequence[torch.Tensor], timesteps: torch.Tensor, context: torch.Tensor,
                    cu_seqlens_context: torch.Tensor, sequence_parallel: SequenceParallel | None = None
                    ) -> FirstBlockState:
        """Embed the batch (arguments as :meth:`forward`) and run the first block: a :class:`FirstBlockState`."""
        x, cu, grids, positions, c = self._embed(videos, timesteps, context, cu_seqlens_context)
        perm = None
        if self.config.attention != "dense":
            perm = tile_permutation(grids, self.config.tile)  # within each video: its offsets stay
            x, positions = x[perm], positions[perm]
        inputs, x, bounds = self._block_inputs(x, cu, grids, positions, c, context, cu_seqlens_context,
                                               sequence_parallel)
        h = self.blocks[0](x, inputs)
        group = None if sequence_parallel is None else sequence_parallel.group
        return FirstBlockState(h, h - x, inputs.cu_tokens, cu, group, len(self.blocks), inputs, grids, perm, bounds)

    def _block_inputs(self, x, cu, grids, positions, c, context, cu_ctx, sequence_parallel):
        """BlockInputs of a packed batch (all tokens ``x`` in block order), this rank's shard of x and the bounds."""
        max_len = int((cu[1:] - cu[:-1]).max())
        max_ctx = int((cu_ctx[1:] - cu_ctx[:-1]).max())
        cu_local = bounds = None
        if sequence_parallel is not None:
            cu_host = cu.tolist()
            bounds = shard_bounds(cu_host, sequence_parallel.size, sequence_parallel.layout)
            start, end = bounds[sequence_parallel.rank], bounds[sequence_parallel.rank + 1]
            x, positions = shard_packed(x, sequence_parallel.group, bounds), positions[start:end]
            cu_local = local_offsets(cu_host, start, end, cu.device)
        sparse = self.config.attention != "dense"
        inputs = BlockInputs(c, cu, max_len, positions, self.rope, context, cu_ctx, max_ctx,
                             sequence_parallel=sequence_parallel, cu_local=cu_local, grids=grids if sparse else None)
        return inputs, x, bounds

    def remaining_blocks(self, state: FirstBlockState, keep: Sequence[int]) -> torch.Tensor:
        """Blocks 2..depth on the videos ``keep`` (indices into the batch, ascending) as one packed batch.

        Returns (sum of their token counts, hidden): the last block's output on every token of those videos, in
        block order, videos one after another (with sequence parallelism: gathered, the same on every rank).
        """
        keep = list(keep)
        full, inputs = state.full_hidden(), state.inputs
        cu_host, ctx_host = state.cu.tolist(), inputs.cu_ctx.tolist()
        rows = torch.cat([torch.arange(cu_host[i], cu_host[i + 1], device=full.device) for i in keep])
        ctx_rows = torch.cat([torch.arange(ctx_host[i], ctx_host[i + 1], device=full.device) for i in keep])
        lengths = torch.tensor([cu_host[i + 1] - cu_host[i] for i in keep], device=state.cu.device)
        ctx_lengths = torch.tensor([ctx_host[i + 1] - ctx_host[i] for i in keep], device=state.cu.device)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        cu_ctx = torch.nn.functional.pad(ctx_lengths.cumsum(0), (1, 0)).to(torch.int32)
        index = torch.tensor(keep, device=state.cu.device)
        positions = (grid_positions(state.grids) if state.perm is None else grid_positions(state.grids)[state.perm])
        sp = inputs.sequence_parallel
        sub, x, bounds = self._block_inputs(full[rows], cu, state.grids[index.to(state.grids.device)],
                                            positions[rows], inputs.c[index], inputs.context[ctx_rows], cu_ctx, sp)
        for block in self.blocks[1:]:
            x = block(x, sub)
        return x if sp is None else gather_packed(x, int(cu[-1]), sp.group, bounds)

    def final_layer(self, state: FirstBlockState, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The velocities (as :meth:`forward` returns them) from ``hidden`` (n, hidden): the last block's output on
        every token of the batch, in block order (gathered)."""
        if state.perm is not None:
            hidden = hidden[state.perm.argsort()]  # back to raster order for unpatchify
        shift, scale = self.final_modulation(state.inputs.c)
        return self.unembed(adaln_modulate(hidden, shift, scale, state.cu), cu_seqlens=state.cu, grids=state.grids)
