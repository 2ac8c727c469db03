"""Variable-length attention in Triton: public entry points, tile configurations, work scheduling.

The kernels are in ``attention_fwd.py`` (forward) and ``attention_bwd.py`` (deterministic backward).
Semantics are those of ``vdit.ops.reference.varlen_attention``: query head h uses key/value head
h // (Hq / Hk); causal masks align to the bottom-right corner (query i sees keys j <= i + Lk - Lq); a
query that sees no key gets output 0 and lse -inf (and zero gradients); empty sequences are allowed.

Work scheduling. Packed batches of videos are very uneven (one 30k-token video next to 200-token
clips), so a (batch, max_seqlen / BLOCK_M) grid would leave most programs idle. Instead the launcher
builds a flat list of (sequence, tile) work items with a few torch ops on the tensors' device (no
host synchronisation: its length is the upper bound ``sum ceil(L_i / B) <= (total + B*(BLOCK-1)) / BLOCK``
and unused slots hold sequence -1, which programs skip at once), sorted by decreasing cost (the
number of tiles on the other side that the item visits) so the heaviest items start first and the
tail of the launch is made of short items. Grid: (items, heads); consecutive programs are tiles of
the same sequence and head, which share their keys and values in L2.

Head dims: any multiple of 8 up to 256; the kernels pad to the next power of two (at least 16) with
masked loads. fp16 and bf16 use tensor cores with fp32 accumulation; fp32 inputs use exact fp32
dot products (``input_precision="ieee"``, no tf32).
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import triton

from vdit._memory import new_output
from vdit.kernels.triton.attention_bwd import launch_dkdv, launch_dq, launch_preprocess
from vdit.kernels.triton.attention_fwd import launch_forward

__all__ = ["varlen_attention_forward", "varlen_attention_backward", "supports_head_dim", "Config",
           "CONFIGS", "FP32_CONFIGS", "candidate_configs", "select_config", "work_items", "block_d_of"]

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile configuration of one kernel. For the forward and dq kernels BLOCK_M is the query tile of a
    program and BLOCK_N the key tile of the inner loop; for dk/dv BLOCK_N is the program's key tile
    and BLOCK_M the query tile of the inner loop."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# CONFIGS[kernel][arch][block_d]: fp16/bf16 tile configurations, best first (the launcher uses the
# first; further entries are tuning candidates). arch 90: Hopper (sm_90, wgmma; also sm_100), 227 KB
# of shared memory; 80: A100 (sm_80), 163 KB; 86: sm_86/89/12x, 99 KB (the sm_80 entries where they
# fit). block_d 16 and 32 use the 64 entries. Every entry is compiled ahead of time for its
# architecture by tests/test_triton_attention_aot.py and must spill nothing and fit in shared memory;
# entries that spilled (e.g. dk/dv with 128-key tiles at head dim 128 on sm_90, or 64-row query tiles
# at 256) were pruned, and so were sm_90 entries for which ptxas serializes the wgmma (C7515).
CONFIGS: dict[str, dict[int, dict[int, list[Config]]]] = {
    "fwd": {
        90: {64: [Config(128, 64, 4, 3)], 128: [Config(128, 64, 8, 3)],
             256: [Config(128, 64, 8, 2), Config(64, 64, 8, 2)]},
        80: {64: [Config(128, 64, 4, 3)], 128: [Config(128, 64, 8, 3), Config(64, 64, 4, 3)],
             256: [Config(64, 32, 8, 2), Config(64, 64, 8, 2)]},
        86: {64: [Config(128, 64, 4, 3)], 128: [Config(64, 64, 4, 3)], 256: [Config(64, 32, 8, 2)]},
    },
    "bwd_dkdv": {
        90: {64: [Config(64, 128, 8, 2)], 128: [Config(32, 128, 8, 2)], 256: [Config(16, 64, 8, 2)]},
        80: {64: [Config(32, 128, 8, 2)], 128: [Config(64, 64, 8, 2)], 256: [Config(32, 64, 8, 1)]},
        86: {64: [Config(32, 128, 8, 2)], 128: [Config(64, 64, 8, 2)], 256: [Config(16, 64, 8, 1)]},
    },
    "bwd_dq": {
        90: {64: [Config(128, 64, 8, 2)], 128: [Config(128, 64, 8, 2)],
             256: [Config(128, 32, 8, 2), Config(64, 32, 8, 1)]},
        80: {64: [Config(128, 64, 8, 2)], 128: [Config(64, 64, 4, 2)], 256: [Config(64, 32, 8, 1)]},
        86: {64: [Config(128, 64, 8, 2)], 128: [Config(64, 64, 4, 2)], 256: [Config(64, 32, 8, 1)]},
    },
}

# fp32 inputs run exact fp32 dot products on the FMA units (no tensor cores, no tf32), which need far
# more registers per tile: small tiles, the same on every architecture (AOT-checked; all fit in 99 KB).
FP32_CONFIGS: dict[str, dict[int, list[Config]]] = {
    "fwd": {64: [Config(32, 32, 8, 1)], 128: [Config(16, 16, 4, 1)], 256: [Config(16, 16, 4, 1)]},
    "bwd_dkdv": {64: [Config(16, 16, 8, 1)], 128: [Config(32, 32, 8, 1)], 256: [Config(16, 16, 8, 1)]},
    "bwd_dq": {64: [Config(16, 32, 4, 1)], 128: [Config(16, 16, 4, 1)], 256: [Config(16, 16, 4, 1)]},
}

# Under TRITON_INTERPRET=1 (CPU tensors) the tiles only need to be correct; small tiles exercise the
# multi-tile and masked paths on the small shapes the tests use. (Two, so the tuner can be tested.)
INTERPRETER_CONFIGS = [Config(32, 32, 4, 1), Config(16, 32, 4, 1)]

# Opt-in tuning: with VDIT_TRITON_AUTOTUNE=1 the first call for each (kernel, device kind, block_d,
# dtype, causal) times every candidate of its list on that call's inputs and keeps the fastest.
AUTOTUNE_ENV = "VDIT_TRITON_AUTOTUNE"
_TUNED: dict[tuple, Config] = {}


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernels handle this head dim (a multiple of 8 in [8, 256])."""
    return 0 < head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def block_d_of(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tl.dot inner dimension)."""
    return max(16, triton.next_power_of_2(head_dim))


def _arch_of(device: torch.device) -> int | None:
    """Key of CONFIGS for a device (None: CPU tensors, the interpreter). Ampere or newer."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):  # Hopper, datacenter Blackwell: 227 KB of shared memory per block
        return 90
    if (major, minor) in ((8, 0), (8, 7)):  # A100, Orin: 163 KB
        return 80
    return 86  # sm_86, sm_89, sm_12x: 99 KB


def candidate_configs(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> list[Config]:
    """Configurations of ``kernel`` ("fwd", "bwd_dkdv", "bwd_dq") for this device, head dim and dtype,
    best first."""
    arch = _arch_of(device)
    if arch is None:
        return INTERPRETER_CONFIGS
    block_d = max(64, block_d_of(head_dim))
    if dtype == torch.float32:
        return FP32_CONFIGS[kernel][block_d]
    return CONFIGS[kernel][arch][block_d]


def select_config(kernel: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Config:
    """The configuration ``kernel`` uses without tuning: the first candidate."""
    return candidate_configs(kernel, device, head_dim, dtype)[0]


def _seconds(run, config: Config, device: torch.device, reps: int = 3) -> float:
    run(config)  # compiles, warms up
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(config)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run(config)
    return (time.perf_counter() - t0) / reps


def _choose(kernel: str, q: torch.Tensor, causal: bool, override: Config | None, run) -> Config:
    """``override``, else the tuned configuration (VDIT_TRITON_AUTOTUNE=1), else the first candidate.
    ``run(config)`` launches the kernel with a configuration (it must be safe to repeat)."""
    if override is not None:
        return override
    candidates = candidate_configs(kernel, q.device, q.shape[2], q.dtype)
    if len(candidates) == 1 or os.environ.get(AUTOTUNE_ENV, "0") in ("", "0"):
        return candidates[0]
    key = (kernel, q.device.type, _arch_of(q.device), block_d_of(q.shape[2]), q.dtype, bool(causal))
    if key not in _TUNED:
        times = [_seconds(run, c, q.device) for c in candidates]
        _TUNED[key] = candidates[times.index(min(times))]
    return _TUNED[key]


def work_items(cu_rows: torch.Tensor, cu_cols: torch.Tensor, total_rows: int, max_seqlen_rows: int | None,
               block_rows: int, block_cols: int, causal: bool, rows_are_queries: bool) -> torch.Tensor:
    """Flat, cost-sorted list of (sequence, row tile) work items.

    Args:
        cu_rows: int32 (B + 1,) offsets of the side tiled by the programs (queries for the forward and
            dq kernels, keys for dk/dv); cu_cols: offsets of the side each program loops over.
        total_rows, max_seqlen_rows: cu_rows[-1] and the longest row sequence (host ints, used only
            for an upper bound of the item count, so no device synchronisation is needed).
        block_rows / block_cols: tile sizes along rows / cols.
        causal, rows_are_queries: define an item's cost (visible column tiles under the bottom-right
            causal mask).
    Returns:
        int32 (n, 2) on cu_rows' device: (sequence, tile) per item, heaviest first, then unused
        slots (sequence -1). n is an upper bound of the real item count.
    """
    device = cu_rows.device
    batch = cu_rows.numel() - 1
    n = (total_rows + batch * (block_rows - 1)) // block_rows
    if max_seqlen_rows is not None:  # validated by vdit.ops to be >= every length
        n = min(n, batch * triton.cdiv(max(max_seqlen_rows, 0), block_rows))
    if n <= 0:
        return torch.empty((0, 2), dtype=torch.int32, device=device)
    cu_r, cu_c = cu_rows.long(), cu_cols.long()
    len_r, len_c = cu_r[1:] - cu_r[:-1], cu_c[1:] - cu_c[:-1]
    tiles = (len_r + block_rows - 1) // block_rows
    ends = tiles.cumsum(0)
    idx = torch.arange(n, device=device, dtype=torch.long)
    seq = torch.searchsorted(ends, idx, right=True)
    valid = seq < batch
    seq = seq.clamp_max(batch - 1)
    tile = idx - (ends[seq] - tiles[seq])
    rows, cols = len_r[seq], len_c[seq]
    if not causal:
        span = cols
    elif rows_are_queries:  # keys visible to some query of the tile: j < min(Lk, (tile+1)*B + Lk - Lq)
        span = torch.minimum(cols, ((tile + 1) * block_rows + (cols - rows)).clamp_min(0))
    else:  # queries that see some key of the tile: i >= tile*B - (Lk - Lq)
        span = (cols - (tile * block_rows - (rows - cols)).clamp_min(0)).clamp_min(0)
    cost = torch.where(valid, (span + block_cols - 1) // block_cols, -1)
    order = torch.argsort(cost, descending=True, stable=True)
    items = torch.stack([torch.where(valid, seq, -1), tile], dim=1)[order]
    return items.to(torch.int32).contiguous()


def _check_head_dim(head_dim: int) -> None:
    if not supports_head_dim(head_dim):
        raise ValueError(f"the triton attention kernels need a head dim that is a multiple of 8 in "
                         f"[8, {MAX_HEAD_DIM}], got {head_dim}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # The kernels index contiguous rows and promise the compiler 16-byte aligned rows (vectorized
    # loads); a contiguous view into a larger buffer can start anywhere, so such inputs are copied.
    # (Inputs are validated as contiguous, but autograd may hand the backward an expanded dout.)
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16


def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                             softmax_scale: float, causal: bool, *, config: Config | None = None):
    """Forward of packed variable-length attention (inputs validated by ``vdit.ops``).

    Args:
        q: (total_q, Hq, D) fp16/bf16/fp32 contiguous; k, v: (total_k, Hk, D), Hq % Hk == 0, same dtype.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets on the same device.
        max_seqlen_q, max_seqlen_k: longest query / key sequence (host ints).
        softmax_scale: multiplier of q k^T. causal: bottom-right aligned causal mask.
        config: override of the tile configuration (tests and tuning).
    Returns:
        out (total_q, Hq, D) like q; lse (Hq, total_q) float32 natural log (-inf where a query sees no key).
    """
    del max_seqlen_k
    total_q, num_heads_q, head_dim = q.shape
    _check_head_dim(head_dim)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    block_d, precision = block_d_of(head_dim), _precision(q.dtype)

    def run(cfg: Config) -> None:
        work = work_items(cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, cfg.block_m, cfg.block_n,
                          causal, rows_are_queries=True)
        if work.shape[0] and num_heads_q:
            launch_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal,
                           cfg, block_d, precision)

    run(_choose("fwd", q, causal, config, run))
    return out, lse


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                              softmax_scale: float, causal: bool, *, dkdv_config: Config | None = None,
                              dq_config: Config | None = None):
    """Backward of :func:`varlen_attention_forward`; deterministic (no atomics).

    Args:
        dout: (total_q, Hq, D) like q, contiguous; out, lse: the forward's outputs; the rest as in the
            forward. dkdv_config / dq_config: tile configuration overrides.
    Returns:
        dq (total_q, Hq, D), dk, dv (total_k, Hk, D) in the dtypes of q, k, v.
    """
    total_q, num_heads_q, head_dim = q.shape
    total_k = k.shape[0]
    _check_head_dim(head_dim)
    dout, q, k, v, out = (_aligned(t) for t in (dout.to(q.dtype), q, k, v, out))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    delta = new_output((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    block_d, precision = block_d_of(head_dim), _precision(q.dtype)
    launch_preprocess(dout, out, delta, block_d)

    def run_dkdv(cfg: Config) -> None:
        work = work_items(cu_seqlens_k, cu_seqlens_q, total_k, max_seqlen_k, cfg.block_n, cfg.block_m,
                          causal, rows_are_queries=False)
        launch_dkdv(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, work, softmax_scale,
                    causal, cfg, block_d, precision)

    def run_dq(cfg: Config) -> None:
        work = work_items(cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, cfg.block_m, cfg.block_n,
                          causal, rows_are_queries=True)
        launch_dq(dout, q, k, v, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal,
                  cfg, block_d, precision)

    run_dkdv(_choose("bwd_dkdv", q, causal, dkdv_config, run_dkdv))
    run_dq(_choose("bwd_dq", q, causal, dq_config, run_dq))
    return dq, dk, dv


def aot_specs() -> list:
    """Every shipped configuration (kernel x arch x head dim x dtype), for the static GPU check."""
    from vdit.kernels.triton import attention_bwd, attention_fwd
    from vdit.kernels.triton.aot import KernelSpec

    kernels = {"fwd": attention_fwd.attn_fwd_kernel, "bwd_dkdv": attention_bwd.attn_bwd_dkdv_kernel,
               "bwd_dq": attention_bwd.attn_bwd_dq_kernel}
    tensors = {"fwd": "Q K V O", "bwd_dkdv": "Q K V DO DK DV", "bwd_dq": "Q K V DO DQ"}
    specs = []
    for name, fn in kernels.items():
        for dtype in ("fp16", "bf16", "fp32"):
            types = {t: "*" + dtype for t in tensors[name].split()}
            types.update(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", WORK="*i32", total_q="i32",
                         num_heads_q="i32", num_heads_k="i32", softmax_scale="fp32")
            sig = {arg: types[arg] for arg in _jit_fn(fn).arg_names if arg in types}
            for arch in (80, 90):
                for head_dim in (64, 128, 256):
                    table = FP32_CONFIGS[name] if dtype == "fp32" else CONFIGS[name][arch]
                    for cfg in table[head_dim]:
                        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d_of(head_dim), "BLOCK_M": cfg.block_m,
                                      "BLOCK_N": cfg.block_n, "CAUSAL": True,
                                      "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
                        label = f"{name} d{head_dim} {dtype} {cfg.block_m}x{cfg.block_n}"
                        specs.append(KernelSpec(fn, sig, constexprs, cfg.num_warps, cfg.num_stages, label,
                                                matmul=dtype != "fp32", archs=(arch,)))
    return specs


def _jit_fn(fn):
    from vdit.kernels.triton.aot import _jit_function

    return _jit_function(fn)
