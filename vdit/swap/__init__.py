r"""Swap vdit kernels into an existing model with one call: ``report = vdit.swap(model)``; ``vdit.unswap(model)``.

What is replaced (each can be turned off):

- ``patch_embed``: every ``nn.Conv3d`` (and ``nn.Conv2d``, e.g. per-frame patch embeddings) whose
  kernel_size == stride (> 1 element, no padding/dilation/groups) becomes a
  :class:`~vdit.swap.patch_embed.ConvPatchEmbed` sharing its weight and bias, computing
  :func:`vdit.ops.patch_embed_3d` and returning the convolution's layout as a view.
- ``attention``: ``F.scaled_dot_product_attention`` calls made during the model's forward go through
  :func:`vdit.ops.varlen_attention` (see :mod:`vdit.swap.attention` for the mechanism and rules):
  key-padding masks become varlen sequences (padded keys cost nothing). ``attention=True`` routes
  only masked calls; ``attention="all"`` routes unmasked ones too (measured on CPU, vdit's C++
  kernel is on par with torch's flash-attention CPU kernel for unpadded batches, so there is no
  default gain to take there).
- ``sparse=vdit.SparsePattern(mode, tile, window=..., topk=...)``: the video self-attention of diffusers'
  Wan and HunyuanVideo runs spacetime block-sparse (:mod:`vdit.swap.sparse`; the pattern validates its
  options, holds per-head windows (an int tensor (heads, 3) or a JSON file, optionally per module path) and
  dispatches to the sparse op); text tokens of a joint attention stay global (dense). Other SDPA calls are
  routed as ``attention`` says.
- ``rope`` / ``norm``: model-specific; done by the adapters of :mod:`vdit.swap.diffusers` (one row per model
  class) for diffusers' video transformers (RoPE application through :func:`vdit.ops.rope_3d`, adaLN-Zero norms through
  :func:`vdit.ops.adaln_modulate`). Plain PyTorch models have no recognizable pattern for these.

Native-size batches: on a swapped diffusers Wan or HunyuanVideo, :func:`forward_packed` runs latents of different
sizes in one packed forward (:mod:`vdit.swap.packed`; the planner :func:`plan_batches`, mixed-size sampling
:func:`sample_packed`); each model's packed forward is the ``packed`` field of its adapter row.

Weights are shared, never copied; ``model.state_dict()`` keys and values are unchanged. The patched
functions and the attention routing are active around the model's forward and around each of its blocks
(the entries of its top-level ``nn.ModuleList``\ s), so gradient checkpointing, which recomputes blocks during
the backward, runs the same code. Under ``torch.compile`` the data-dependent routing is not taken (the host's
own SDPA and RoPE code run inside the graph) and nothing is counted in the report, so a compiled swapped model
compiles once (:mod:`vdit.swap.state`). The swap state lives on the model (``model._vdit_swap``) and
:func:`unswap` restores the original modules, processors and hooks, so outputs are bit-identical to the
unswapped model again.
"""
from __future__ import annotations

import sys

from torch import nn

from vdit.ops.sparse_pattern import MODES as SPARSE_MODES
from vdit.ops.sparse_pattern import SparsePattern
from vdit.swap import diffusers as diffusers_adapters  # diffusers itself is imported only for its models
from vdit.swap.attention import VditAttentionMode
from vdit.swap.packed import flow_sigmas, forward_packed, sample_packed
from vdit.swap.packed_plan import plan_batches
from vdit.swap.patch_embed import ConvPatchEmbed, patch_conv_reason
from vdit.swap.report import Replacement, Skip, SwapReport
from vdit.swap.sparse import SparseRouting
from vdit.swap.state import ATTR as _ATTR
from vdit.swap.state import SwapState

__all__ = ["swap", "unswap", "forward_packed", "sample_packed", "plan_batches", "flow_sigmas", "SwapReport",
           "Replacement", "Skip", "SwapState"]

_DENSE_ROUTING = (True, False, "all", "masked", "auto")


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules a host may run on their own, outside the model's forward: the entries of the root's
    ``nn.ModuleList`` children (transformer blocks), which gradient checkpointing recomputes in the backward."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def _install_hooks(model: nn.Module, state: SwapState) -> None:
    """Enter the swap's scope (patched functions, attention routing) around the model's forward and around
    each of its blocks: a checkpointed block is recomputed during the backward, after the model's forward
    has returned, and must run the same code as in the forward. Nested entries are counted, not repeated.
    The report's last-forward counts start at each (eager) model forward."""
    start = model.register_forward_pre_hook(lambda module, args: state.forward_started())
    state.undo.append(start.remove)
    for module in [model, *_repeated_blocks(model)]:
        pre = module.register_forward_pre_hook(lambda module, args: state.enter())
        # always_call: leave the scope even when forward raises.
        post = module.register_forward_hook(lambda module, args, out: state.exit(), always_call=True)
        state.undo.append(pre.remove)
        state.undo.append(post.remove)


def _swap_patch_convs(model: nn.Module, state: SwapState) -> None:
    report = state.report
    for path, module in list(model.named_modules()):
        if type(module) not in (nn.Conv3d, nn.Conv2d):
            continue
        reason = patch_conv_reason(module)
        if reason is None:
            state.replace_module(model, path, ConvPatchEmbed.from_conv(module))
            report.add(path, "patch_embed", type(module).__name__ + str(tuple(module.kernel_size)),
                       "ConvPatchEmbed (vdit.ops.patch_embed_3d)")
        elif isinstance(module, nn.Conv3d) or tuple(module.kernel_size) == tuple(module.stride):
            report.skip(path, "patch_embed", reason)


def _route_attention(state: SwapState, attention, skip_padded_queries: bool) -> None:
    """The SDPA router of ``attention`` (see :func:`swap`) on ``state``, reported."""
    dense = {"all": True, "auto": "auto"}.get(attention, False)
    state.mode = VditAttentionMode(dense=dense, skip_padded_queries=skip_padded_queries, calls=state.report.calls,
                                   sparse=state.sparse)
    where = {True: "all calls", False: "masked calls"}.get(dense, "masked calls; unmasked too with a compiled kernel")
    state.report.add("", "attention", "F.scaled_dot_product_attention",
                     f"vdit.ops.varlen_attention ({where}; padded queries "
                     f"{'skipped' if skip_padded_queries else 'computed'}; TorchFunctionMode during forward)")


def _check_options(attention, sparse) -> None:
    """ValueError / TypeError naming the argument of :func:`swap` that is not valid."""
    if isinstance(attention, str) and attention in SPARSE_MODES:
        raise ValueError(f"attention={attention!r} moved to its own argument: vdit.swap(model, "
                         f"sparse=vdit.SparsePattern({attention!r}, tile, ...)); attention= routes dense SDPA calls")
    if attention not in _DENSE_ROUTING:
        raise ValueError(f"attention must be True, False, 'all', 'masked' or 'auto', got {attention!r}")
    if sparse is not None and not isinstance(sparse, SparsePattern):
        raise TypeError(f"sparse must be a vdit.SparsePattern or None, got {type(sparse).__name__}")
    if sparse is not None and attention is False:
        raise ValueError("sparse= runs through the attention routing: pass attention=True (or 'all' / 'auto'), "
                         "not False")


def swap(model: nn.Module, *, attention: bool | str = True, sparse: SparsePattern | None = None,
         patch_embed: bool = True, rope: bool = True, norm: bool = True,
         skip_padded_queries: bool | None = None) -> SwapReport:
    """Replace the parts of ``model`` that vdit has kernels for, in place.

    Args:
        model: any ``nn.Module``; diffusers' video transformers get model-specific handling too
            (:data:`vdit.swap.diffusers.ADAPTERS`).
        attention: which dense SDPA calls go to :func:`vdit.ops.varlen_attention`: True or ``"masked"``
            (calls with a key-padding mask), ``"all"`` (every convertible call, unmasked ones too), ``"auto"``
            (masked ones, plus unmasked ones when vdit has a compiled attention kernel for the device), or False.
        sparse: a :class:`vdit.SparsePattern`: the video self-attention runs block-sparse with it (diffusers'
            Wan and HunyuanVideo; per-module windows from its JSON file by module path). Other SDPA calls are
            routed as ``attention`` says.
        patch_embed, rope, norm: turn those replacements on or off.
        skip_padded_queries: in masked self-attention (Lq == Lk), skip the padded queries (their
            outputs become 0). None = only where the adapter knows it is safe (e.g. HunyuanVideo's
            joint attention); True forces it; False never.
    Returns:
        :class:`SwapReport` listing replacements and skips (its ``calls`` fills in as the model runs eagerly).
    Raises:
        ValueError: the model is already swapped, an ``attention`` value that is not a dense routing (the
            block-sparse modes name the ``sparse=`` form), or ``sparse`` with ``attention=False``.
        TypeError: ``sparse`` is not a SparsePattern.
    """
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model is already swapped; call vdit.unswap(model) first")
    _check_options(attention, sparse)
    report = SwapReport(model=type(model).__name__)
    state = SwapState(report)
    state.sparse = SparseRouting(sparse) if sparse is not None else None
    safe_query_skip = False
    if diffusers_adapters.is_diffusers_model(model):
        safe_query_skip = diffusers_adapters.swap_model(model, state, patch_embed=patch_embed, rope=rope, norm=norm)
    if patch_embed:
        _swap_patch_convs(model, state)
    if state.sparse is not None and not any(r.kind == "attention" for r in report.replacements):
        report.skip("", "attention", f"sparse={sparse.mode} needs the video's token grid and which modules are its "
                    "self-attention: vdit knows them for diffusers' Wan and HunyuanVideo")
    if attention:
        skip = safe_query_skip if skip_padded_queries is None else bool(skip_padded_queries)
        _route_attention(state, attention, skip)
    _install_hooks(model, state)
    _report_missing(report, norm=norm, rope=rope)
    object.__setattr__(model, _ATTR, state)
    return report


def _report_missing(report: SwapReport, *, norm: bool, rope: bool) -> None:
    """Say so when a kind that was asked for found nothing to replace."""
    mentioned = {r.kind for r in report.replacements} | {s.kind for s in report.skipped}
    if norm and "norm" not in mentioned:
        report.skip("", "norm", "no LayerNorm + modulation module recognized (inline modulation in forward code "
                    "cannot be swapped)")
    if rope and "rope" not in mentioned:
        report.skip("", "rope", "no rotary-embedding application recognized")


def unswap(model: nn.Module) -> SwapReport | None:
    """Undo :func:`swap` on ``model``: original modules, processors, functions and hooks come back.

    Returns:
        The report of the swap that was undone, or None if the model was not swapped.
    """
    state = getattr(model, _ATTR, None)
    if state is None:
        return None
    for undo in reversed(state.undo):
        undo()
    object.__delattr__(model, _ATTR)
    return state.report


# WHY THIS PACKAGE IS CALLABLE: ``vdit.swap(model)`` is the one-call API, and ``vdit.swap`` must also stay this
# package: ``import vdit.swap as m`` and ``import vdit.swap; vdit.swap.unswap(...)`` read the attribute ``swap``
# of ``vdit``, not ``sys.modules["vdit.swap"]``. If ``vdit/__init__`` bound a function ``swap`` there instead,
# those would get the function and every ``vdit.swap.<name>`` would fail; a function cannot be both. So the
# package's module object gets a ModuleType subclass with ``__call__`` (assigning ``__class__`` of a module is
# the way the Python data model documents to customize a module: "Customizing module attribute access").
class _CallablePackage(type(sys.modules[__name__])):
    """``vdit.swap(model, **options)`` is :func:`swap` while ``vdit.swap`` stays this package."""

    def __call__(self, model: nn.Module, **options) -> SwapReport:
        return swap(model, **options)


sys.modules[__name__].__class__ = _CallablePackage
