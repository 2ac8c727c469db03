"""Variable-length attention in Triton: the entry points the ops layer calls.

Files, by role (as FlashAttention 3 names them):

* ``forward.py``  the forward kernel: main loop over key tiles with an online softmax (K/V through
  per-sequence TMA descriptors on sm_90), epilogue writing out and lse.
* ``backward.py`` the deterministic backward: preprocess (delta), dk/dv and dq kernels.
* ``common.py``   the prologue every program shares (work item, sequence geometry, tile offsets,
  visible key range) and the score mask.
* ``scheduler.py`` the flat, cost-sorted (sequence, tile) work list built on the device.
* ``configs.py``  tile configurations per (kernel, arch, head dim, dtype) and the opt-in autotuner.

Semantics are those of ``vdit.ops.reference.varlen_attention``: query head h uses key/value head
h // (Hq / Hk); causal masks align to the bottom-right corner (query i sees keys j <= i + Lk - Lq); a
query that sees no key gets output 0 and lse -inf (and zero gradients); empty sequences are allowed.

Head dims: any up to 256. The kernels take multiples of 8 (each head row then starts 16-byte aligned)
and pad those to the next power of two (at least 16) with masked loads; other head dims are padded
with zeros to the next multiple of 8 here (a copy, as FlashAttention's wrapper does), which changes no
score, and the outputs are cut back. fp16 and bf16 use tensor cores with fp32 accumulation; fp32
inputs use exact fp32 dot products (``input_precision="ieee"``, no tf32). Which tiles run depends on
shapes and ``cu_seqlens`` only, never on the ``max_seqlen`` hints.
"""
from __future__ import annotations

import torch

from vdit._memory import new_output
from vdit.kernels.triton._launch import aligned, pad_head_dim
from vdit.kernels.triton.attention import backward, forward
from vdit.kernels.triton.attention.configs import (
    AUTOTUNE_ENV,
    CONFIGS,
    FP32_CONFIGS,
    INTERPRETER_CONFIGS,
    MAX_HEAD_DIM,
    Config,
    block_d_of,
    candidate_configs,
    choose_config,
    precision_of,
    select_config,
    supports_head_dim,
)
from vdit.kernels.triton.attention.scheduler import cached_work_items, work_items

# What only a GPU can verify (the static report quotes this; the static check covers compilation,
# registers, spills, shared memory and wgmma pipelining of every shipped configuration).
GPU_ONLY = ("speed against torch-varlen and flash-attn (benchmarks/gpu_attention.py); bf16 tl.dot numerics "
            "(the interpreter's bf16 dot is wrong, so bf16 is tested on GPUs only); the autotuner's choices. "
            "Race-freedom is by construction: each output row (out, lse, dq) belongs to one (query tile, "
            "head) program and each dk/dv row to one (key tile, kv head) program, and no kernel writes "
            "memory another program reads.")

__all__ = ["varlen_attention_forward", "varlen_attention_backward", "supports_head_dim", "Config", "CONFIGS",
           "FP32_CONFIGS", "INTERPRETER_CONFIGS", "AUTOTUNE_ENV", "MAX_HEAD_DIM", "candidate_configs",
           "select_config", "work_items", "block_d_of", "aot_specs"]


def _check_head_dim(head_dim: int) -> None:
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the triton attention kernels take head dims in [1, {MAX_HEAD_DIM}], got {head_dim}")




def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                             softmax_scale: float, causal: bool, *, config: Config | None = None):
    """Forward of packed variable-length attention (inputs validated by ``vdit.ops``).

    Args:
        q: (total_q, Hq, D) fp16/bf16/fp32 contiguous; k, v: (total_k, Hk, D), Hq % Hk == 0, same dtype.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets on the same device.
        max_seqlen_q, max_seqlen_k: schema parity with the other kernels; unused (see module docstring).
        softmax_scale: multiplier of q k^T. causal: bottom-right aligned causal mask.
        config: override of the tile configuration (tests and tuning).
    Returns:
        out (total_q, Hq, D) like q; lse (Hq, total_q) float32 natural log (-inf where a query sees no key).
    """
    del max_seqlen_q, max_seqlen_k
    _check_head_dim(q.shape[2])
    if not supports_head_dim(q.shape[2]):
        q8, k8, v8 = (pad_head_dim(t) for t in (q, k, v))
        out, lse = varlen_attention_forward(q8, k8, v8, cu_seqlens_q, cu_seqlens_k, 0, 0, softmax_scale, causal,
                                            config=config)
        return out[..., :q.shape[2]].contiguous(), lse
    total_q, num_heads_q, head_dim = q.shape
    q, k, v = aligned(q), aligned(k), aligned(v)
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    block_d, precision = block_d_of(head_dim), precision_of(q.dtype)

    def run(cfg: Config) -> None:
        work = cached_work_items(cu_seqlens_q, cu_seqlens_k, total_q, cfg.block_m, cfg.block_n, causal,
                                 rows_are_queries=True)
        forward.launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal, cfg, block_d,
                       precision)

    run(choose_config("fwd", q, causal, config, run))
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
    del max_seqlen_q, max_seqlen_k
    _check_head_dim(q.shape[2])
    if not supports_head_dim(q.shape[2]):
        padded = (pad_head_dim(t) for t in (dout, q, k, v, out))
        grads = varlen_attention_backward(*padded, lse, cu_seqlens_q, cu_seqlens_k, 0, 0, softmax_scale, causal,
                                          dkdv_config=dkdv_config, dq_config=dq_config)
        return tuple(g[..., :q.shape[2]].contiguous() for g in grads)
    total_q, num_heads_q, head_dim = q.shape
    total_k = k.shape[0]
    dout, q, k, v, out = (aligned(t) for t in (dout.to(q.dtype), q, k, v, out))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    delta = new_output((num_heads_q, total_q), dtype=torch.float32, device=q.device)
    block_d, precision = block_d_of(head_dim), precision_of(q.dtype)
    backward.launch_preprocess(dout, out, delta, block_d)

    def run_dkdv(cfg: Config) -> None:
        work = cached_work_items(cu_seqlens_k, cu_seqlens_q, total_k, cfg.block_n, cfg.block_m, causal,
                                 rows_are_queries=False)
        backward.launch_dkdv(dout, q, k, v, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, work, softmax_scale,
                             causal, cfg, block_d, precision)

    def run_dq(cfg: Config) -> None:
        work = cached_work_items(cu_seqlens_q, cu_seqlens_k, total_q, cfg.block_m, cfg.block_n, causal,
                                 rows_are_queries=True)
        backward.launch_dq(dout, q, k, v, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, work, softmax_scale, causal,
                           cfg, block_d, precision)

    run_dkdv(choose_config("bwd_dkdv", q, causal, dkdv_config, run_dkdv))
    run_dq(choose_config("bwd_dq", q, causal, dq_config, run_dq))
    return dq, dk, dv


def aot_specs() -> list:
    """Every shipped configuration of the four kernels, for the static GPU check."""
    return forward.aot_specs() + backward.aot_specs()
