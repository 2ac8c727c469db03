"""Route ``F.scaled_dot_product_attention`` calls to vdit's varlen attention.

Mechanism: while a swapped model's ``forward`` runs, a :class:`torch.overrides.TorchFunctionMode`
(:class:`VditAttentionMode`) is active; it sees every ``F.scaled_dot_product_attention`` call made
inside the model (diffusers' "native" attention backend and processors that call SDPA directly
included), converts it to :func:`vdit.ops.varlen_attention` when it can, and runs the original SDPA
call otherwise. Nothing outside the model's forward is affected.

Conversion rules (:func:`sdpa_as_varlen`):
- q (B, Hq, Lq, Dh), k/v (B, Hk, Lk, Dh) with Hq == Hk (or Hq % Hk == 0 with ``enable_gqa``), no dropout,
  ``is_causal`` only when Lq == Lk (SDPA aligns causal masks top-left, vdit bottom-right; equal when square).
- ``attn_mask`` must be a key-padding mask: bool (True = attend) or additive float whose entries are 0
  (keep) or <= -1e4 (drop; such a bias makes the softmax weight underflow to exactly 0 in fp32),
  identical for every head and query row. The valid keys of each sample become one varlen
  sequence (``cu_seqlens_k``): padded keys cost no FLOPs. Samples with no valid key run SDPA (its
  semantics there are NaN or uniform weights, which a varlen kernel does not reproduce).
- Padded queries (Lq == Lk, same padding) are skipped only when the caller says the attention is
  self-attention over one padded sequence (``skip_padded_queries``); their outputs are then 0. Left
  on by default they would silently drop real queries of a cross-attention whose lengths happen to match.
- Unmasked calls ("dense") go to vdit only if ``dense`` is True, because without padding to skip the
  win depends on vdit having a faster kernel for the device than torch's SDPA.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vdit.ops import plan, varlen_attention
from vdit.swap.masks import key_padding
from vdit.swap.sparse import SparseRouting, sparse_sdpa

_SDPA = F.scaled_dot_product_attention


def vdit_attention_kernel(device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None,
                          **features) -> str:
    """The kernel vdit's varlen attention runs on for such a call ("torch" = the reference); ``features``
    as :func:`vdit.plan` takes them (``causal``, ``gqa``)."""
    features.setdefault("deterministic", torch.are_deterministic_algorithms_enabled())
    return plan("varlen_attention", device=device, dtype=dtype, head_dim=head_dim, **features)[0]


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """Why an SDPA call cannot become one varlen call (shape, dtype, dropout, causal layout), or None."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "non-tensor inputs"
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        return "not (B, H, L, D) q/k/v with k.shape == v.shape"
    if not query.is_floating_point() or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    B, Hq, Lq, Dh = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    if key.shape[0] != B or key.shape[3] != Dh:
        return "q/k shapes"
    if Hq != Hk and not (enable_gqa and Hk and Hq % Hk == 0):
        return "head counts"
    if dropout_p:
        return "dropout"
    if is_causal and (Lq != Lk or attn_mask is not None):
        return "causal with Lq != Lk"
    if B == 0 or Lq == 0 or Lk == 0:
        return "empty"
    return None


def _pack(x: torch.Tensor, keep: torch.Tensor | None):
    """(B, L, H, D) -> packed (total, H, D), int32 cu_seqlens and max_seqlen; ``keep`` (B, L) drops padding."""
    B, L = x.shape[:2]
    if keep is None:
        return x.reshape(B * L, *x.shape[2:]), torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=x.device), L
    lengths = keep.sum(1)
    return x[keep], F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())


def sdpa_as_varlen(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, *, dense: bool = False, skip_padded_queries: bool = False):
    """Compute one SDPA call with :func:`vdit.ops.varlen_attention`.

    Args:
        query: (B, Hq, Lq, Dh); key, value: (B, Hk, Lk, Dh); the other arguments as
            ``F.scaled_dot_product_attention``.
        dense: also take unmasked calls.
        skip_padded_queries: with Lq == Lk, treat the key padding as query padding too (see module doc).
    Returns:
        ``(out, "varlen")`` (padding skipped) or ``(out, "dense")`` with out (B, Hq, Lq, Dh) (a transposed
        view of the packed (B*Lq, Hq, Dh) output), or ``(None, reason)`` when the call is not convertible.
    """
    reason = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        return None, reason
    B, Hq, Lq, Dh = query.shape
    keep = None
    if attn_mask is not None:
        keep = key_padding(attn_mask, B, Hq, Lq, key.shape[2])
        if isinstance(keep, str):
            return None, keep
        if bool(keep.all()):
            keep = None
    if keep is None and not dense:
        return None, "dense (no padding to skip)"
    if keep is not None and bool((keep.sum(1) == 0).any()):
        return None, "a sample with no valid key"
    # (B, L, H, D) views: free when the host's tensors are permuted (B, L, H, D) projections.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    k_packed, cu_k, max_k = _pack(k, keep)
    v_packed = _pack(v, keep)[0]
    q_keep = keep if (skip_padded_queries and keep is not None and Lq == key.shape[2]) else None
    q_packed, cu_q, max_q = _pack(q, q_keep)
    out = varlen_attention(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                           causal=is_causal)
    if q_keep is None:
        out = out.view(B, Lq, Hq, Dh)
    else:
        full = out.new_zeros(B, Lq, Hq, Dh)
        full[q_keep] = out
        out = full
    return out.transpose(1, 2), ("dense" if keep is None else "varlen")


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class VditAttentionMode(TorchFunctionMode):
    """TorchFunctionMode sending ``F.scaled_dot_product_attention`` calls through :func:`sdpa_as_varlen`.

    ``calls`` (a Counter) records ``attention.varlen`` / ``attention.dense`` / ``attention.fallback:<why>``,
    and for each routed call the kernel it ran on (``attention.kernel:<name>``, see :func:`vdit.plan`).
    """

    def __init__(self, *, dense: bool | str, skip_padded_queries: bool, calls: collections.Counter,
                 sparse: SparseRouting | None = None):
        super().__init__()
        self.dense, self.skip_padded_queries, self.calls = dense, skip_padded_queries, calls
        self.sparse = sparse  # block-sparse routing of the calls made inside `sparse_path`'s module
        self.sparse_path: str | None = None
        self._dense_by_device: dict[torch.device, bool] = {}

    def _dense(self, device: torch.device) -> bool:
        if self.dense != "auto":
            return bool(self.dense)
        if device not in self._dense_by_device:  # "auto": only when a compiled kernel beats nothing
            self._dense_by_device[device] = vdit_attention_kernel(device) != "torch"
        return self._dense_by_device[device]

    def _sparse(self, bound: dict) -> torch.Tensor | None:
        """The block-sparse result of a self-attention call inside a sparse-routed module, or None."""
        reason = _unsupported(*(bound.get(n, d) for n, d in (("query", None), ("key", None), ("value", None),
                                                              ("attn_mask", None), ("dropout_p", 0.0),
                                                              ("is_causal", False), ("enable_gqa", False))))
        out = None
        if reason is None:
            out, reason = sparse_sdpa(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                                      bool(bound.get("is_causal", False)), bound.get("scale"), self.sparse,
                                      self.sparse_path)
        self.calls["attention.sparse" if out is not None else f"attention.sparse_fallback:{reason}"] += 1
        if out is not None:
            self.calls[f"sparse:{self.sparse_path}"] += 1
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Under torch.compile the routing decisions (is a mask padding? which keys are valid?) would read
        # tensor values: a compiled model keeps torch's own SDPA, which the compiler handles itself.
        if func is _SDPA and not torch.compiler.is_compiling():
            bound = dict(zip(_SDPA_ARGS, args), **kwargs)
            if set(bound) <= set(_SDPA_ARGS) and len(args) <= len(_SDPA_ARGS):
                query = bound.get("query")
                if self.sparse is not None and self.sparse_path is not None:
                    out = self._sparse(bound)
                    if out is not None:
                        return out
                dense = self._dense(query.device) if isinstance(query, torch.Tensor) else False
                out, why = sdpa_as_varlen(**bound, dense=dense, skip_padded_queries=self.skip_padded_queries)
                if out is not None:
                    self.calls[f"attention.{why}"] += 1
                    kernel = vdit_attention_kernel(query.device, query.dtype, query.shape[-1],
                                                   causal=bool(bound.get("is_causal", False)),
                                                   gqa=query.shape[1] != bound["key"].shape[1])
                    self.calls[f"attention.kernel:{kernel}"] += 1
                    return out
                self.calls[f"attention.fallback:{why}"] += 1
        return func(*args, **kwargs)
