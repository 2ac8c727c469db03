"""Functional API of vdit: validated, differentiable, backend-dispatched ops.

Each op's contract (shapes, orders, semantics) is in its docstring and in :mod:`vdit.ops.reference`;
docs/architecture.md maps the layers. Every op takes ``backend="auto"`` (see :mod:`vdit.backends`).
"""
from vdit.ops import reference
from vdit.ops._registry import plan
from vdit.ops.adaln import adaln_modulate, gated_residual
from vdit.ops.attention import varlen_attention
from vdit.ops.patch_embed import patch_embed_3d, patch_embed_3d_varlen, patch_unembed_3d, patch_unembed_3d_varlen
from vdit.ops.patchify import patchify_3d, unpatchify_3d
from vdit.ops.rope import rope_3d, rope_3d_qk
from vdit.ops.sparse_attention import block_sparse_attention, sliding_tile_attention, topk_tiles
from vdit.ops.sparse_pattern import SparsePattern

__all__ = [
    "reference", "patchify_3d", "unpatchify_3d", "patch_embed_3d", "patch_embed_3d_varlen", "patch_unembed_3d",
    "patch_unembed_3d_varlen", "varlen_attention", "rope_3d", "rope_3d_qk", "adaln_modulate", "gated_residual",
    "sliding_tile_attention", "block_sparse_attention", "topk_tiles", "SparsePattern", "plan",
]
