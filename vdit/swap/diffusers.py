"""vdit for diffusers' video transformers (optional dependency; diffusers is imported only when a
diffusers model is swapped).

``vdit.swap.swap(pipe.transformer)`` calls :func:`swap_model` for diffusers models, which runs the model's row
of :data:`ADAPTERS` (its RoPE, norm, patch-embedding and block-sparse-site handlers, and whether its padded
queries may be skipped; supporting another model adds one row). Per model (patch embedding; attention;
rotary application; norm):

- ``WanTransformer3DModel``: Conv3d -> vdit; SDPA -> vdit (text is zero-padded, no mask); vdit processor,
  ``rope_3d_qk``; block -> ``adaln_modulate`` + ``gated_residual``.
- ``CogVideoXTransformer3DModel``: per-frame Conv2d -> vdit (1.0), Linear (1.5): skipped; SDPA -> vdit;
  ``rope_3d``; ``CogVideoXLayerNormZero`` -> ``adaln_modulate``.
- ``HunyuanVideoTransformer3DModel``: Conv3d -> vdit; text-padding mask -> varlen, padded text queries skipped;
  ``rope_3d``; ``AdaLayerNormZero(Single)`` -> ``adaln_modulate``.
- ``LTXVideoTransformer3DModel``: Linear on pre-patchified latents: skipped; text-padding bias -> varlen; own
  frequency schedule: skipped; norm inline: skipped.

``sparse=SparsePattern(...)`` runs the video self-attention of Wan and HunyuanVideo block-sparse
(:mod:`vdit.swap.sparse`); the other models have no sparse sites. Wan and HunyuanVideo also have a packed
forward (:func:`vdit.swap.forward_packed`: latents of different sizes in one call; :mod:`vdit.swap.packed_wan`,
:mod:`vdit.swap.packed_hunyuan`), the ``packed`` field of their rows.

Attention backend: diffusers 0.42's dispatcher (``diffusers.models.attention_dispatch``) keys its
registry on the closed enum ``AttentionBackendName``, so a third-party backend cannot be registered
under its own name without patching the enum. vdit therefore takes the calls of the default
"native" backend (and of processors that call SDPA themselves): they reach
``F.scaled_dot_product_attention``, which :mod:`vdit.swap.attention` routes while the swapped model
runs. A model set to another diffusers backend (flash, sage, ...) keeps it.

Rotary application: the tables these models pass (cos/sin, interleaved pairs, [t, h, w] chunks)
are turned back into positions once per table by :class:`vdit.swap.rope.TableRope` (verified, with a
fallback to the original code when they do not match), then :func:`vdit.ops.rope_3d(_qk)` applies them.
CogVideoX and HunyuanVideo import ``apply_rotary_emb`` from ``diffusers.models.embeddings`` at call
time, so it is replaced by a vdit version while the swapped model runs; Wan applies RoPE inside its
attention processor, which is replaced by a vdit processor.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from vdit.nn import RotaryEmbedding3d
from vdit.ops import adaln_modulate, gated_residual, rope_3d_qk
from vdit.swap import packed_hunyuan, packed_wan, sparse
from vdit.swap.packed_inputs import PackedHandler
from vdit.swap.rope import TableRope


def is_diffusers_model(model: nn.Module) -> bool:
    """True if ``model`` is a diffusers ``ModelMixin`` (without importing diffusers if it is not loaded)."""
    if "diffusers" not in sys.modules:
        return False
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:
        return False
    return isinstance(model, ModelMixin)


# --------------------------------------------------------------------------------------------
# Rotary application
# --------------------------------------------------------------------------------------------

def _vdit_apply_rotary_emb(original, tables: TableRope, calls):
    """A drop-in for ``diffusers.models.embeddings.apply_rotary_emb`` that uses vdit's RoPE op for
    real-valued, interleaved tables it can read positions from, and ``original`` otherwise."""

    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if (use_real and use_real_unbind_dim == -1 and isinstance(freqs_cis, (tuple, list)) and len(freqs_cis) == 2
                and isinstance(x, torch.Tensor) and x.dim() == 4 and sequence_dim in (1, 2)):
            cos, sin = freqs_cis
            positions = tables.positions(cos, sin)
            if positions is not None and positions.shape[0] == x.shape[sequence_dim] and cos.shape[-1] == x.shape[-1]:
                calls["rope"] += 1
                return tables.apply(x, positions.to(x.device), sequence_dim)
            if not torch.compiler.is_compiling():  # no host-side bookkeeping inside a compiled graph
                calls["rope.fallback:tables"] += 1
        else:
            if not torch.compiler.is_compiling():
                calls["rope.fallback:layout"] += 1
        return original(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim,
                        sequence_dim=sequence_dim)

    return apply_rotary_emb


def _scope_apply_rotary_emb(state, tables: TableRope) -> None:
    from diffusers.models import embeddings
    state.scoped.append((embeddings, "apply_rotary_emb",
                         _vdit_apply_rotary_emb(embeddings.apply_rotary_emb, tables, state.report.calls)))


def _wan_processor_class():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import (
        WanAttnProcessor,
        _get_added_kv_projections,
        _get_qkv_projections,
    )

    class VditWanAttnProcessor(WanAttnProcessor):
        """WanAttnProcessor with RoPE applied by :func:`vdit.ops.rope_3d_qk` (q and k in one call).

        Same inputs and outputs as the processor it replaces: hidden_states (B, L, D), optional
        encoder_hidden_states (B, S, D) (image context first for I2V), rotary_emb (cos, sin) tables
        (1, L, 1, Dh). Tables it cannot read positions from run the replaced processor unchanged.
        """

        def __init__(self, original, tables: TableRope, calls, site: str = ""):
            self.__dict__.update(vars(original))  # keeps a per-instance attention backend / parallel config
            self.original, self.tables, self.calls, self.site = original, tables, calls, site

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            positions = None
            if rotary_emb is not None:
                positions = self.tables.positions(*rotary_emb)
                if positions is None or positions.shape[0] != hidden_states.shape[1]:
                    if not torch.compiler.is_compiling():  # no host-side bookkeeping inside a compiled graph
                        self.calls["rope.fallback:tables"] += 1
                    return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            image_context = None
            if attn.add_k_proj is not None:  # I2V: image tokens precede the 512 text tokens
                split = encoder_hidden_states.shape[1] - 512
                image_context, encoder_hidden_states = (encoder_hidden_states[:, :split],
                                                        encoder_hidden_states[:, split:])
            q, k, v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            q = attn.norm_q(q).unflatten(2, (attn.heads, -1))  # (B, L, H, Dh)
            k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
            v = v.unflatten(2, (attn.heads, -1))
            if positions is not None:
                self.calls["rope"] += 1
                self.calls[f"rope:{self.site}"] += 1
                q, k = rope_3d_qk(q, k, positions.to(q.device), dims=self.tables.dims, theta=self.tables.theta)
            image_out = None
            if image_context is not None:
                k_img, v_img = _get_added_kv_projections(attn, image_context)
                k_img = attn.norm_added_k(k_img).unflatten(2, (attn.heads, -1))
                v_img = v_img.unflatten(2, (attn.heads, -1))
                image_out = dispatch_attention_fn(q, k_img, v_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                                                  backend=self._attention_backend, parallel_config=None)
                image_out = image_out.flatten(2, 3).type_as(q)
            parallel = self._parallel_config if encoder_hidden_states is None else None
            out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=parallel)
            out = out.flatten(2, 3).type_as(q)
            if image_out is not None:
                out = out + image_out
            return attn.to_out[1](attn.to_out[0](out))

    return VditWanAttnProcessor


# --------------------------------------------------------------------------------------------
# adaLN-Zero norms
# --------------------------------------------------------------------------------------------

class VditAdaLayerNormZero(nn.Module):
    """diffusers ``AdaLayerNormZero`` / ``AdaLayerNormZeroSingle`` (LayerNorm without affine) computing
    ``LayerNorm(x) * (1 + scale) + shift`` with :func:`vdit.ops.adaln_modulate`.

    Holds the replaced module's ``linear`` / ``silu`` / ``norm`` children (same state_dict keys).
    ``forward(x, ..., emb=(B, E))``: x (B, N, C) -> the replaced module's outputs (x, gates, ...).
    """

    def __init__(self, original: nn.Module, chunks: int):
        super().__init__()
        self.silu, self.linear, self.norm, self.chunks = original.silu, original.linear, original.norm, chunks
        self.emb = getattr(original, "emb", None)
        object.__setattr__(self, "original", original)

    def forward(self, x, *args, emb=None, **kwargs):
        if self.chunks == 3:  # AdaLayerNormZeroSingle.forward(x, emb)
            emb = args[0] if args else emb
        elif self.emb is not None:  # AdaLayerNormZero.forward(x, timestep, class_labels, hidden_dtype, emb)
            timestep, class_labels = (list(args) + [None, None])[:2]
            timestep = kwargs.get("timestep", timestep)
            class_labels = kwargs.get("class_labels", class_labels)
            emb = self.emb(timestep, class_labels, hidden_dtype=kwargs.get("hidden_dtype"))
        elif len(args) >= 4:
            emb = args[3]
        params = self.linear(self.silu(emb)).chunk(self.chunks, dim=1)
        shift, scale = params[0], params[1]
        x = adaln_modulate(x, shift.to(x.dtype).contiguous(), scale.to(x.dtype).contiguous(), eps=self.norm.eps)
        return (x, *params[2:])


class VditCogVideoXLayerNormZero(nn.Module):
    """diffusers ``CogVideoXLayerNormZero`` with :func:`vdit.ops.adaln_modulate`; the LayerNorm's affine
    parameters (w, b) fold into the modulation: ``(n*w + b)(1 + s) + t = n(1 + (w(1 + s) - 1)) + (b(1 + s) + t)``.

    ``forward(hidden_states (B, N, C), encoder_hidden_states (B, S, C), temb (B, E))`` -> the replaced
    module's (hidden_states, encoder_hidden_states, gate (B, 1, C), enc_gate (B, 1, C)).
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.silu, self.linear, self.norm = original.silu, original.linear, original.norm
        object.__setattr__(self, "original", original)

    def _modulate(self, x, shift, scale):
        w, b = self.norm.weight, self.norm.bias
        if w is not None:
            shift = shift + (b if b is not None else 0) * (1 + scale)
            scale = w * (1 + scale) - 1
        return adaln_modulate(x, shift.to(x.dtype).contiguous(), scale.to(x.dtype).contiguous(), eps=self.norm.eps)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
        return (self._modulate(hidden_states, shift, scale),
                self._modulate(encoder_hidden_states, enc_shift, enc_scale), gate[:, None, :], enc_gate[:, None, :])


def _wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """``WanTransformerBlock.forward`` with the adaLN steps as vdit ops: ``norm1``/``norm3`` + shift/scale as
    :func:`vdit.ops.adaln_modulate` (one pass instead of LayerNorm, multiply, add and casts) and the gated
    residuals as :func:`vdit.ops.gated_residual`. hidden_states (B, L, C), encoder_hidden_states (B, S, C),
    temb (B, 6, C) -> (B, L, C); per-token modulation (Wan 2.2 TI2V, temb (B, L, 6, C)) runs the host's forward."""
    if temb.ndim != 3 or hidden_states.dim() != 3:
        return super(type(self), self).forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
    x = hidden_states
    mod = (self.scale_shift_table + temb.float()).to(x.dtype)  # (B, 6, C)
    shift, scale, gate, c_shift, c_scale, c_gate = (m.contiguous() for m in mod.unbind(1))
    h = adaln_modulate(x, shift, scale, eps=self.norm1.eps)
    x = gated_residual(x, self.attn1(h, None, None, rotary_emb), gate)
    h = self.norm2(x.float()).type_as(x)
    x = x + self.attn2(h, encoder_hidden_states, None, None)
    h = adaln_modulate(x, c_shift, c_scale, eps=self.norm3.eps)
    return gated_residual(x, self.ffn(h).to(x.dtype), c_gate)


@functools.cache
def vdit_wan_block_class(cls: type) -> type:
    """A subclass of the host's ``WanTransformerBlock`` class with :func:`_wan_block_forward`, under the same
    class name: swapped blocks keep their parameters, their state_dict and the name diffusers'
    ``compile_repeated_blocks`` looks blocks up by; unswap restores the original class."""
    return type(cls.__name__, (cls,), {"forward": _wan_block_forward, "__module__": __name__,
                                       "__qualname__": f"vdit_{cls.__qualname__}",
                                       "__doc__": _wan_block_forward.__doc__})


def _swap_wan_blocks(model, state) -> None:
    for path, block in list(model.named_modules()):
        if type(block).__name__ != "WanTransformerBlock" or type(block).__module__ == __name__:
            continue
        plain = all(isinstance(n, nn.LayerNorm) and not n.elementwise_affine for n in (block.norm1, block.norm3))
        if not plain or getattr(block.scale_shift_table, "shape", None) != (1, 6, block.norm1.normalized_shape[0]):
            state.report.skip(path, "norm", "WanTransformerBlock with an unexpected norm / modulation layout")
            continue
        state.set_class(block, vdit_wan_block_class(type(block)), path)
        state.report.add(path, "norm", "WanTransformerBlock (inline LayerNorm + modulation)",
                         "WanTransformerBlock with vdit.ops.adaln_modulate, gated_residual (same class name)")


def _swap_norms(model, state) -> None:
    from diffusers.models import normalization as N
    report = state.report
    kinds = {N.AdaLayerNormZero: 6, N.AdaLayerNormZeroSingle: 3}
    for path, module in list(model.named_modules()):
        if type(module) in kinds:
            if not isinstance(module.norm, nn.LayerNorm) or module.norm.elementwise_affine:
                report.skip(path, "norm", f"{type(module).__name__} with {type(module.norm).__name__} (affine or not "
                            "a plain LayerNorm)")
                continue
            state.replace_module(model, path, VditAdaLayerNormZero(module, kinds[type(module)]))
            report.add(path, "norm", type(module).__name__, "VditAdaLayerNormZero (vdit.ops.adaln_modulate)")
        elif type(module) is N.CogVideoXLayerNormZero:
            state.replace_module(model, path, VditCogVideoXLayerNormZero(module))
            report.add(path, "norm", "CogVideoXLayerNormZero", "VditCogVideoXLayerNormZero (vdit.ops.adaln_modulate)")


# --------------------------------------------------------------------------------------------
# Per-model handlers and the table of supported models
# --------------------------------------------------------------------------------------------

def _attention_modules(model, cls_name: str):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ == cls_name]


def _latent_grid(patch, args, kwargs):
    """(T, H, W) tokens of the forward's ``hidden_states`` (B, C, F, H, W) patchified by ``patch``, or None."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    return tuple(n // p for n, p in zip(x.shape[2:], patch))


def _wan_self_attention(model):
    modules = [(p, m) for p, m in _attention_modules(model, "WanAttention")
               if not getattr(m, "is_cross_attention", True)]
    return modules, tuple(model.config.patch_size)


def _hunyuan_joint_attention(model):
    # The dual- and single-stream blocks' joint [video, text] attention; the token refiner's is text only.
    modules = [(p, m) for p, m in model.named_modules()
               if type(getattr(m, "processor", None)).__name__ == "HunyuanVideoAttnProcessor2_0"]
    return modules, (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)


def _swap_wan_rope(model, state) -> None:
    """Wan's self-attention processors -> :class:`VditWanAttnProcessor` (RoPE through vdit.ops.rope_3d_qk)."""
    report = state.report
    try:
        processor_cls = _wan_processor_class()
    except ImportError as e:
        report.skip("", "rope", f"this diffusers version lacks the Wan processor helpers ({e})")
        return
    tables = TableRope((model.rope.t_dim, model.rope.h_dim, model.rope.w_dim), 10000.0)
    for path, attn in _attention_modules(model, "WanAttention"):
        if getattr(attn, "is_cross_attention", False):  # text/image cross-attention has no RoPE
            continue
        state.set_attr(attn, "processor", processor_cls(attn.processor, tables, report.calls, path))
        report.add(path, "rope", type(attn.processor.original).__name__, "VditWanAttnProcessor (vdit.ops.rope_3d_qk)")


def _scoped_rope(tables_of):
    """A RoPE handler replacing ``apply_rotary_emb`` during forward, with the tables ``tables_of(model)``."""

    def swap_rope(model, state) -> None:
        _scope_apply_rotary_emb(state, tables_of(model))
        state.report.add("", "rope", "diffusers.models.embeddings.apply_rotary_emb",
                         "vdit.ops.rope_3d (during forward)")

    return swap_rope


def _cogvideox_tables(model) -> TableRope:
    rotary = RotaryEmbedding3d.cogvideox(model.config.attention_head_dim)  # the (t, h, w) split is the preset's
    return TableRope(rotary.dims, rotary.theta)


def _hunyuan_tables(model) -> TableRope:
    return TableRope(tuple(model.config.rope_axes_dim), model.rope.theta)


def _cogvideox_patch_embed(model, state) -> None:
    if isinstance(model.patch_embed.proj, nn.Linear):
        state.report.skip("patch_embed.proj", "patch_embed", "CogVideoX 1.5 patchifies with reshapes and embeds with "
                          "nn.Linear (already one matmul)")


def _skipped(kind: str, path: str, reason: str):
    """A handler that only reports ``kind`` at ``path`` as skipped for ``reason``."""
    return lambda model, state: state.report.skip(path, kind, reason)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How :func:`vdit.swap.swap` handles one diffusers model class.

    Handlers take ``(model, state)`` (state: :class:`vdit.swap.SwapState`), replace what they can and report
    every replacement or skip; None means nothing model-specific of that kind. ``patch_embed`` only adds notes:
    the generic pass swaps patch-embedding convolutions of every model. ``sparse_sites(model)`` ->
    ([(path, self-attention module)], latent patch size (t, h, w)): the video self-attention that
    ``sparse=`` runs block-sparse. ``skip_padded_queries``: the model's masked SDPA calls are self-attention
    whose padded query positions the host discards, so their queries may be skipped. ``packed``: the model's
    packed forward for :func:`vdit.swap.forward_packed` (a :class:`vdit.swap.packed_inputs.PackedHandler`), or
    None when latents of different sizes cannot share a call.
    """

    rope: Callable | None = None
    norm: Callable | None = None
    patch_embed: Callable | None = None
    sparse_sites: Callable | None = None
    skip_padded_queries: bool = False
    packed: PackedHandler | None = None


# One row per supported model class (by class name: diffusers is imported only when one of its models is swapped).
ADAPTERS: dict[str, Adapter] = {
    "WanTransformer3DModel": Adapter(rope=_swap_wan_rope, norm=_swap_wan_blocks, sparse_sites=_wan_self_attention,
                                     packed=packed_wan.HANDLER),
    "CogVideoXTransformer3DModel": Adapter(rope=_scoped_rope(_cogvideox_tables), norm=_swap_norms,
                                           patch_embed=_cogvideox_patch_embed),
    # Its masked SDPA calls are joint self-attention over [video, text] with the text padding at the tail;
    # padded text positions are dropped from the output, so their queries can be skipped. (The token
    # refiner's mask also hides padded query rows and falls back to SDPA.)
    "HunyuanVideoTransformer3DModel": Adapter(rope=_scoped_rope(_hunyuan_tables), norm=_swap_norms,
                                              sparse_sites=_hunyuan_joint_attention, skip_padded_queries=True,
                                              packed=packed_hunyuan.HANDLER),
    "LTXVideoTransformer3DModel": Adapter(
        rope=_skipped("rope", "", "LTX-Video's RoPE uses its own frequency schedule (log-spaced, scaled by pi/2) "
                      "which vdit.ops.rope_3d does not implement"),
        norm=_skipped("norm", "transformer_blocks.*", "LTX-Video modulates inline (RMSNorm + scale/shift)"),
        patch_embed=_skipped("patch_embed", "proj_in", "LTX-Video receives pre-patchified latents and embeds them "
                             "with nn.Linear (already one matmul)")),
}


def swap_model(model: nn.Module, state, *, patch_embed: bool, rope: bool, norm: bool) -> bool:
    """Model-specific part of :func:`vdit.swap.swap` for a diffusers model: its :data:`ADAPTERS` row.

    Args:
        model: a diffusers ``ModelMixin``; state: the :class:`vdit.swap.SwapState` being filled (``state.sparse``
            set when block-sparse attention was asked for).
        patch_embed, rope, norm: which kinds to handle.
    Returns:
        Whether the model's masked self-attention may skip padded queries.
    """
    name = type(model).__name__
    adapter = ADAPTERS.get(name)
    if adapter is None:
        state.report.skip("", "model", f"{name} has no model-specific vdit handling; generic swaps only")
        return False
    if state.sparse is not None and adapter.sparse_sites is not None:
        modules, patch = adapter.sparse_sites(model)
        sparse.install(model, state, modules, functools.partial(_latent_grid, patch))
    for wanted, handler in ((rope, adapter.rope), (patch_embed, adapter.patch_embed), (norm, adapter.norm)):
        if wanted and handler is not None:
            handler(model, state)
    return adapter.skip_padded_queries
