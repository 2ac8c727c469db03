"""Swap vdit kernels into an existing model with one call: ``report = vdit.swap(model)``; ``vdit.unswap(model)``.

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
- ``attention="sliding_tile"`` / ``"topk_tile"``: the video self-attention of diffusers' Wan and
  HunyuanVideo runs spacetime block-sparse (:mod:`vdit.swap.sparse`: ``tile``, ``window`` (3 ints, an
  int tensor (heads, 3) or a JSON file of per-head windows), ``topk``); text tokens of a joint attention
  stay global (dense). Other SDPA calls are routed as with ``attention=True``.
- ``rope`` / ``norm``: model-specific; done by :mod:`vdit.integrations.diffusers` for diffusers' video
  transformers (RoPE application through :func:`vdit.ops.rope_3d`, adaLN-Zero norms through
  :func:`vdit.ops.adaln_modulate`). Plain PyTorch models have no recognizable pattern for these.

Weights are shared, never copied; ``model.state_dict()`` keys and values are unchanged. The patched
functions and the attention routing are active around the model's forward and around each of its blocks
(the entries of its top-level ``nn.ModuleList``\ s), so gradient checkpointing, which recomputes blocks during
the backward, runs the same code. Under ``torch.compile`` the data-dependent routing is not taken (the host's
own SDPA and RoPE code run inside the graph). The swap
state lives on the model (``model._vdit_swap``) and :func:`unswap` restores the original modules,
processors and hooks, so outputs are bit-identical to the unswapped model again.
"""
from __future__ import annotations

import sys

from torch import nn

from vdit.swap.attention import VditAttentionMode
from vdit.swap.patch_embed import ConvPatchEmbed, patch_conv_reason
from vdit.swap.sparse import MODES as SPARSE_MODES
from vdit.swap.sparse import SparseAttention
from vdit.swap.report import Replacement, Skip, SwapReport

__all__ = ["swap", "unswap", "SwapReport", "Replacement", "Skip", "SwapState"]

_ATTR = "_vdit_swap"


class SwapState:
    """Undo log and scoped patches of one swapped model (stored as ``model._vdit_swap``)."""

    def __init__(self, report: SwapReport):
        self.report = report
        self.undo: list = []  # callables, run in reverse by unswap
        self.scoped: list[tuple[object, str, object]] = []  # (owner, attr, replacement) set during forward
        self.mode: VditAttentionMode | None = None
        self.sparse: SparseAttention | None = None  # block-sparse self-attention options, if asked for
        self._saved: list = []
        self._depth = 0

    def replace_module(self, model: nn.Module, path: str, new: nn.Module) -> None:
        """Put ``new`` at ``path`` (its runs counted in the report as ``module:<path>``); unswap restores the old."""
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        setattr(parent, name, new)
        self.undo.append(lambda: setattr(parent, name, old))
        self.count_runs(new, path)

    def set_class(self, module: nn.Module, cls: type, path: str) -> None:
        """Give ``module`` the class ``cls`` (a subclass of its own) now, its runs counted as ``module:<path>``;
        unswap restores the old class. The module object, its parameters and hooks stay."""
        old = module.__class__
        module.__class__ = cls
        self.undo.append(lambda: setattr(module, "__class__", old))
        self.count_runs(module, path)

    def count_runs(self, module: nn.Module, path: str) -> None:
        """Count each run of ``module`` in the report (``module:<path>``) until unswap."""
        calls = self.report.calls
        handle = module.register_forward_hook(lambda m, args, out: calls.update((f"module:{path}",)))
        self.undo.append(handle.remove)

    def set_attr(self, owner, name: str, value) -> None:
        """Set ``owner.name`` now and restore it on unswap."""
        had = name in vars(owner) if hasattr(owner, "__dict__") else False
        old = vars(owner).get(name) if had else None
        setattr(owner, name, value)
        self.undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

    # Entered and left around the model's forward by hooks (see _install_hooks).
    def enter(self) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        saved = []
        for owner, attr, new in self.scoped:
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, new)
        self._saved = saved
        if self.mode is not None:
            self.mode.__enter__()

    def exit(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        for owner, attr, old in reversed(self._saved):
            setattr(owner, attr, old)
        self._saved = []


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules a host may run on their own, outside the model's forward: the entries of the root's
    ``nn.ModuleList`` children (transformer blocks), which gradient checkpointing recomputes in the backward."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


def _install_hooks(model: nn.Module, state: SwapState) -> None:
    """Enter the swap's scope (patched functions, attention routing) around the model's forward and around
    each of its blocks: a checkpointed block is recomputed during the backward, after the model's forward
    has returned, and must run the same code as in the forward. Nested entries are counted, not repeated.
    The report's last-forward counts start at each model forward."""
    start = model.register_forward_pre_hook(lambda module, args: state.report.forward_started())
    state.undo.append(start.remove)
    for module in [model, *_repeated_blocks(model)]:
        pre = module.register_forward_pre_hook(lambda module, args: state.enter())
        # always_call: leave the scope even when forward raises.
        post = module.register_forward_hook(lambda module, args, out: state.exit(), always_call=True)
        state.undo.append(pre.remove)
        state.undo.append(post.remove)


def _swap_patch_convs(model: nn.Module, state: SwapState, handled: set[str]) -> None:
    report = state.report
    for path, module in list(model.named_modules()):
        if path in handled or type(module) not in (nn.Conv3d, nn.Conv2d):
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


def swap(model: nn.Module, *, attention: bool | str = True, patch_embed: bool = True, rope: bool = True,
         norm: bool = True, skip_padded_queries: bool | None = None, tile=None, window=(3, 3, 3),
         topk: int = 8) -> SwapReport:
    """Replace the parts of ``model`` that vdit has kernels for, in place.

    Args:
        model: any ``nn.Module``; diffusers' video transformers get model-specific handling too.
        attention: True or ``"masked"`` (SDPA calls with a key-padding mask), ``"all"`` (every
            convertible SDPA call, unmasked ones too), ``"auto"`` (masked ones, plus unmasked ones when
            vdit has a compiled attention kernel for the device), ``"sliding_tile"`` / ``"topk_tile"``
            (video self-attention block-sparse, Wan and HunyuanVideo; other calls as True), or False.
        tile: sparse modes: (tt, th, tw) tokens per tile (required).
        window: sliding_tile: (wt, wh, ww) tiles, an int tensor (heads, 3), or the path of a JSON file of
            per-head (optionally per-module) windows (:func:`vdit.swap.sparse.load_windows`).
        topk: topk_tile: key tiles per query tile and head.
        patch_embed, rope, norm: turn those replacements on or off.
        skip_padded_queries: in masked self-attention (Lq == Lk), skip the padded queries (their
            outputs become 0). None = only where the integration knows it is safe (e.g. HunyuanVideo's
            joint attention); True forces it; False never.
    Returns:
        :class:`SwapReport` listing replacements and skips (its ``calls`` fills in as the model runs).
    Raises:
        ValueError: the model is already swapped.
    """
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model is already swapped; call vdit.unswap(model) first")
    if attention not in (True, False, "all", "masked", "auto", *SPARSE_MODES):
        raise ValueError(f"attention must be True, False, 'all', 'masked', 'auto', 'sliding_tile' or 'topk_tile', "
                         f"got {attention!r}")
    report = SwapReport(model=type(model).__name__)
    state = SwapState(report)
    if attention in SPARSE_MODES:
        state.sparse = SparseAttention.from_options(attention, tile, window, topk)
    options = dict(attention=attention, patch_embed=patch_embed, rope=rope, norm=norm)

    handled: set[str] = set()
    safe_query_skip = False
    from vdit.integrations import diffusers as diffusers_integration  # optional dependency inside
    if diffusers_integration.is_diffusers_model(model):
        handled, safe_query_skip = diffusers_integration.swap_model(model, state, **options)

    if patch_embed:
        _swap_patch_convs(model, state, handled)
    if state.sparse is not None and not any(r.kind == "attention" for r in report.replacements):
        report.skip("", "attention", f"{attention} needs the video's token grid and which modules are its "
                    "self-attention: vdit knows them for diffusers' Wan and HunyuanVideo")
    if attention:
        _route_attention(state, attention, safe_query_skip if skip_padded_queries is None else bool(skip_padded_queries))
    _install_hooks(model, state)
    mentioned = {r.kind for r in report.replacements} | {s.kind for s in report.skipped}
    if norm and "norm" not in mentioned:
        report.skip("", "norm", "no LayerNorm + modulation module recognized (inline modulation in forward code "
                    "cannot be swapped)")
    if rope and "rope" not in mentioned:
        report.skip("", "rope", "no rotary-embedding application recognized")
    object.__setattr__(model, _ATTR, state)
    return report


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


def swap_state(model: nn.Module) -> SwapState | None:
    """The :class:`SwapState` of a swapped model, or None."""
    return getattr(model, _ATTR, None)



class _CallableModule(type(sys.modules[__name__])):
    """Lets ``vdit.swap(model)`` call :func:`swap` while ``vdit.swap`` stays this package (so
    ``vdit.swap.attention`` etc. remain reachable whichever of the two ``vdit/__init__`` exports)."""

    def __call__(self, model: nn.Module, **options) -> SwapReport:
        return swap(model, **options)


sys.modules[__name__].__class__ = _CallableModule
