"""Every ``vdit::`` operator schema, in one place.

This table is the contract between the kernels and the ops layer. Each schema is defined twice:

* ``vdit::<name>``: the compiled kernels of ``vdit._C``. ``csrc/<op>/cpu.cpp`` and ``csrc/<op>/cuda.cu``
  only register implementations (``TORCH_LIBRARY_IMPL(vdit, CPU|CUDA, m)``); the dispatcher accepts an
  implementation before its schema, so the extension may load before or after this module.
* ``vdit::<name>_triton``: the same signature, implemented in Python by the Triton kernels
  (:mod:`vdit.ops` registers them with :func:`torch.library.register_kernel`).

Fake (meta) implementations and autograd formulas are registered by the op that owns each schema
(``vdit/ops/<op>.py``) through :mod:`vdit.ops._registry`.

Conventions shared by all schemas:

* Packed tensors are ``(total, ...)`` with ``cu_seqlens`` int32 ``(B + 1,)`` offsets.
* A backward returns one gradient per differentiable input. A gradient the caller did not ask for
  (``output_mask`` false) is an empty tensor, because schemas cannot return ``Tensor?`` inside lists.
* ``inverse`` (RoPE) rotates by minus the angle, which is the backward of a plain rotation.
"""
from __future__ import annotations

import torch

TRITON_SUFFIX = "_triton"

SCHEMAS: dict[str, str] = {
    # patchify_3d: x (B, C, T, H, W) -> tokens (B, N, C*pt*ph*pw); unpatchify_3d is its inverse.
    "patchify_3d": "(Tensor x, int[3] patch_size) -> Tensor",
    "unpatchify_3d": "(Tensor tokens, int[3] grid, int[3] patch_size) -> Tensor",
    # patch_embed_3d: Conv3d with stride == kernel; weight (D, C, pt, ph, pw). patch_unembed_3d: the
    # final Linear(D, C*pt*ph*pw) + unpatchify; weight (C*pt*ph*pw, D). Packed forms take `grids` as a
    # flat int list (Tp0, Hp0, Wp0, Tp1, ...) so that output shapes are known on the host.
    "patch_embed_3d": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "patch_embed_3d_backward":
        "(Tensor grad, Tensor x, Tensor weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "patch_embed_3d_varlen": "(Tensor[] videos, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)",
    "patch_embed_3d_varlen_backward":
        "(Tensor grad, Tensor[] videos, Tensor weight, bool[3] output_mask) -> (Tensor[], Tensor, Tensor)",
    "patch_unembed_3d": "(Tensor tokens, Tensor weight, Tensor? bias, int[3] grid, int[3] patch_size) -> Tensor",
    "patch_unembed_3d_backward": "(Tensor grad, Tensor tokens, Tensor weight, int[3] grid, int[3] patch_size, "
                                 "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "patch_unembed_3d_varlen":
        "(Tensor tokens, Tensor weight, Tensor? bias, int[] grids, int[3] patch_size) -> Tensor[]",
    "patch_unembed_3d_varlen_backward": "(Tensor[] grads, Tensor tokens, Tensor weight, int[] grids, "
                                        "int[3] patch_size, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    # varlen_attention: q (total_q, Hq, D), k/v (total_k, Hk, D) -> (out like q, lse (Hq, total_q)).
    # lse is float32 (float64 for float64 inputs on the C++ kernel).
    "varlen_attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                            "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)",
    "varlen_attention_bwd": "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                            "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
                            "float softmax_scale, bool causal) -> (Tensor, Tensor, Tensor)",
    # block_sparse_attention: q (total, Hq, D), k / v (total, Hk, D) in tile order; tile_offsets int32
    # (num_tiles + 1,) token offset of each tile; kv_tiles int32 (num_tiles, Hq, K) global key tiles of each
    # query tile and head, -1 unused; q_tiles int32 1-D the transposed lists for dk / dv in CSR form
    # (num_tiles * Hk + 1 offsets into q_tiles itself, then the entries query_tile * Hq + query_head of each
    # (key tile, kv head) list, ascending: vdit.ops.tiles.query_lists); max_tile the largest tile's tokens.
    "block_sparse_attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor tile_offsets, Tensor kv_tiles, int max_tile, "
                                  "float softmax_scale) -> (Tensor, Tensor)",
    "block_sparse_attention_bwd": "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                  "Tensor tile_offsets, Tensor kv_tiles, Tensor q_tiles, int max_tile, "
                                  "float softmax_scale) -> (Tensor, Tensor, Tensor)",
    # rope_3d: x (total, H, D) or (B, L, H, D), unit stride along D; positions (L, 3) or (B, L, 3).
    # With a weight each head is RMS-normalized (times the weight) before rotating. The backward ops
    # return (grad_x, grad_weight) per tensor; grad_weight is empty when the weight is None.
    "rope_3d": "(Tensor x, Tensor positions, int[3] dims, float theta, bool interleaved, bool inverse, "
               "Tensor? weight, float eps) -> Tensor",
    "rope_3d_qk": "(Tensor q, Tensor k, Tensor positions, int[3] dims, float theta, bool interleaved, "
                  "bool inverse, Tensor? q_weight, Tensor? k_weight, float eps) -> (Tensor, Tensor)",
    "rope_3d_qk_": "(Tensor(a!) q, Tensor(b!) k, Tensor positions, int[3] dims, float theta, bool interleaved, "
                   "Tensor? q_weight, Tensor? k_weight, float eps) -> ()",
    "rope_3d_backward": "(Tensor grad, Tensor x, Tensor positions, int[3] dims, float theta, bool interleaved, "
                        "Tensor? weight, float eps) -> (Tensor, Tensor)",
    "rope_3d_qk_backward": "(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor positions, int[3] dims, "
                           "float theta, bool interleaved, Tensor? q_weight, Tensor? k_weight, float eps) "
                           "-> (Tensor, Tensor, Tensor, Tensor)",
    # adaln: x (total, C) packed with cu_seqlens, or (B, N, C) with cu_seqlens None; shift, scale,
    # gate (B, C). mean and rstd are row statistics (float32, float64 for float64 x) for the backward.
    "adaln_modulate": "(Tensor x, Tensor shift, Tensor scale, Tensor? cu_seqlens, float eps) "
                      "-> (Tensor out, Tensor mean, Tensor rstd)",
    "adaln_modulate_backward": "(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
                               "Tensor? cu_seqlens) -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)",
    "gated_residual": "(Tensor x, Tensor y, Tensor gate, Tensor? cu_seqlens) -> Tensor",
    "gated_residual_backward": "(Tensor grad_out, Tensor y, Tensor gate, Tensor? cu_seqlens) "
                               "-> (Tensor grad_y, Tensor grad_gate)",
}

# Schemas that also have a Triton implementation (vdit::<name>_triton).
TRITON_SCHEMAS: tuple[str, ...] = (
    "patchify_3d", "unpatchify_3d",
    "patch_embed_3d", "patch_embed_3d_backward", "patch_embed_3d_varlen", "patch_embed_3d_varlen_backward",
    "patch_unembed_3d", "patch_unembed_3d_backward", "patch_unembed_3d_varlen", "patch_unembed_3d_varlen_backward",
    "varlen_attention_fwd", "varlen_attention_bwd", "block_sparse_attention_fwd", "block_sparse_attention_bwd",
    "rope_3d", "rope_3d_qk", "rope_3d_qk_", "rope_3d_backward", "rope_3d_qk_backward",
)


def triton_name(name: str) -> str:
    """The Triton twin of a compiled operator name (``rope_3d`` -> ``rope_3d_triton``)."""
    return name + TRITON_SUFFIX


LIBRARY = torch.library.Library("vdit", "DEF")
for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)
    if _name in TRITON_SCHEMAS:
        LIBRARY.define(triton_name(_name) + _schema)
del _name, _schema
