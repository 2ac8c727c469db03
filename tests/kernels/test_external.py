"""The external dense kernels are offered only when their signatures take what vdit passes: fakes of
torch 2.9's and 2.14's ``varlen_attn`` and of old and current flash-attn builds, since the GPU machine
may run other releases than this one.

flash-attn's private varlen backward (the ring's backward from a given output and lse) is faked per release
on CPU with vdit's reference math, asserting the layout vdit hands it: called on a ring-like split of the keys
with the merged out / lse, it must give the full gradients, and dispatch must take it only where it is usable."""
import json
import re
import sys
import types

import pytest
import torch

from tests.conftest import assert_close, cu_seqlens_of
from vdit.bench import dense_lse
from vdit.kernels import external
from vdit.ops import attention as attention_ops
from vdit.ops import plan, reference


def varlen_attn_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.9 / 2.10: causal as a flag, no scale, no window, no GQA."""


def varlen_attn_2_14(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """torch 2.14."""


def fa3_old(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
            deterministic=False):
    """an FA3 build from before return_attn_probs."""


def fa_current(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
               deterministic=False, return_attn_probs=False, window_size=(-1, -1)):
    """flash-attn 2.x and current FA3."""


def test_missing_keywords_reads_the_signature():
    assert external.missing_keywords(varlen_attn_2_9, external.TORCH_VARLEN_KEYWORDS) == [
        "scale", "window_size", "enable_gqa"]
    assert external.missing_keywords(varlen_attn_2_14, external.TORCH_VARLEN_KEYWORDS) == []
    assert external.missing_keywords(fa3_old, external.FLASH_ATTN_KEYWORDS) == ["return_attn_probs"]
    assert external.missing_keywords(fa_current, external.FLASH_ATTN_KEYWORDS) == []
    assert external.missing_keywords(lambda *a, **kw: None, external.FLASH_ATTN_KEYWORDS) == []  # **kwargs
    # a torch.library custom op (flash-attn's private functions on torch 2.4+) is read through to its function
    assert external.missing_keywords(fa3_backward, external.CAUSAL_KEYWORDS) == ["causal"]
    assert external.missing_keywords(min, ("x",)) == []  # no inspectable signature: trust the call


@pytest.mark.parametrize("fake, usable", [(varlen_attn_2_9, False), (varlen_attn_2_14, True)], ids=["2.9", "2.14"])
def test_torch_varlen_is_offered_only_with_the_keywords_vdit_passes(cuda_build, fake, usable):
    import torch.nn.attention.varlen as varlen

    cuda_build.setattr(varlen, "varlen_attn", fake)
    reason = external.torch_varlen_missing()
    if usable:
        assert reason is None
    else:
        assert "scale, window_size, enable_gqa" in reason and "varlen_attn" in reason


@pytest.mark.parametrize("fake, usable", [(fa3_old, False), (fa_current, True)], ids=["fa3-old", "current"])
def test_flash_attn_is_offered_only_with_the_keywords_vdit_passes(cuda_build, fake, usable):
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_varlen_func = fake
    module.__spec__ = types.SimpleNamespace(name="flash_attn_interface")  # find_spec reads it from sys.modules
    cuda_build.setitem(sys.modules, "flash_attn_interface", module)
    cuda_build.setitem(sys.modules, "flash_attn", None)  # FA2 absent
    assert external.flash_attn_version() == (3 if usable else None)
    reason = external.flash_attn_missing()
    assert (reason is None) if usable else ("return_attn_probs" in reason and "flash_attn_interface" in reason)


# ---- flash-attn's private backward from a given output and lse ------------------------------------------------

CALLS = []  # the causal flag of each call that reached a fake private backward


def _backward_contract(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, causal):
    """What flash-attn's private varlen backward does, with vdit's reference math on CPU, after asserting the layout
    vdit hands it (the real kernels check part of it and read the rest by pointer, lse included)."""
    assert all(t.is_contiguous() for t in (dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k))
    assert dout.shape == out.shape == q.shape and dout.dtype == out.dtype == q.dtype
    assert softmax_lse.shape == (q.shape[1], q.shape[0]) and softmax_lse.dtype == torch.float32
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert max_seqlen_q == int(cu_seqlens_q.diff().max()) and max_seqlen_k == int(cu_seqlens_k.diff().max())
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)  # written in place: preallocated
    CALLS.append(causal)
    grads = reference.varlen_attention_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                                                softmax_scale=softmax_scale, causal=causal)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)


@torch.library.custom_op("vdit_test::fa3_backward", mutates_args=("dq", "dk", "dv"))
def fa3_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 softmax_lse: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
                 cu_seqlens_k: torch.Tensor | None = None, sequed_q: torch.Tensor | None = None,
                 sequed_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                 max_seqlen_k: int | None = None, dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                 dv: torch.Tensor | None = None, softmax_scale: float | None = None, is_causal: bool = False,
                 window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
                 deterministic: bool = False, sm_margin: int = 0) -> torch.Tensor:
    """FA3's _flash_attn_backward since 2025-07 (hopper/flash_attn_interface.py): a custom op that writes dq, dk,
    dv and returns softmax_d."""
    assert sequed_q is None and sequed_k is None and (window_size_left, window_size_right, softcap) == (-1, -1, 0)
    _backward_contract(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, is_causal)
    return softmax_lse.new_zeros(softmax_lse.shape)


def fa3_2025_01_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                         max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
                         sink_token_length=0, softcap=0.0, deterministic=False, sm_margin=0):
    """FA3's _flash_attn_backward from 2025-01 to 2025-07: a plain function, `causal`, returns the gradients too."""
    _backward_contract(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, causal)
    return dq, dk, dv, softmax_lse.new_zeros(softmax_lse.shape)


def fa2_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                 alibi_slopes, deterministic, rng_state=None, zero_tensors=False):
    """FA2's _flash_attn_varlen_backward since 2.7 (flash_attn/flash_attn_interface.py): all required."""
    assert (dropout_p, window_size_left, window_size_right, softcap, alibi_slopes) == (0.0, -1, -1, 0.0, None)
    _backward_contract(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, causal)
    return softmax_lse.new_zeros(softmax_lse.shape)


def fa3_2024_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size,
                      deterministic=False):
    """FA3 before 2025-01: no varlen offsets (those went to a separate _flash_attn_varlen_backward)."""


def fa2_2_6_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                     deterministic, rng_state=None):
    """FA2 2.6: the window as one pair."""


def install_flash_attn(monkeypatch, name: str, backward=None):
    """A fake flash-attn module ``name`` (FA3: flash_attn_interface, FA2: flash_attn) with a current forward and
    ``backward`` under its private name (None: the module has none), the other module hidden."""
    module = types.ModuleType(name)
    module.flash_attn_varlen_func = fa_current
    module.__version__ = "3.0.0" if name == "flash_attn_interface" else "2.8.3"
    module.__spec__ = types.SimpleNamespace(name=name)  # find_spec reads it from sys.modules
    if backward is not None:
        setattr(module, external.FLASH_ATTN_BACKWARDS[name][0], backward)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "flash_attn" if name == "flash_attn_interface" else "flash_attn_interface", None)
    CALLS.clear()


USABLE = [pytest.param("flash_attn_interface", fa3_backward, id="fa3-custom-op"),
          pytest.param("flash_attn_interface", fa3_2025_01_backward, id="fa3-2025-01"),
          pytest.param("flash_attn", fa2_backward, id="fa2-2.7+")]


def _ring_inputs(causal: bool):
    """A GQA batch (Hq 4, Hk 2) in float32 whose key halves include sequences without keys and, causal, rows
    that see no key at all (Lq 7 > Lk 3), with the reference's merged out / lse over all keys and its float64
    gradients."""
    lengths_q, lengths_k = (5, 9, 1, 7), (8, 12, 1, 3)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths_q), 4, 16, generator=g)
    k, v = (torch.randn(sum(lengths_k), 2, 16, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    cu_q, cu_k = cu_seqlens_of(lengths_q), cu_seqlens_of(lengths_k)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.varlen_attention(*leaves, cu_q, cu_k, softmax_scale=0.3, causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout.double())
    case = dense_lse.LseCase("ring", lengths_q, lengths_k, heads=(4, 2), head_dim=16, causal=causal)
    return case, (dout, q, k, v, out.detach().float(), lse.float(), cu_q, cu_k), grads


@pytest.mark.parametrize("module, backward", USABLE)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_backward_from_merged_out_and_lse_gives_each_key_block_its_gradients(
        cuda_build, module, backward, causal):
    install_flash_attn(cuda_build, module, backward)
    assert external.flash_attn_backward_missing() is None
    case, (dout, q, k, v, out, lse, cu_q, cu_k), want = _ring_inputs(causal)
    assert torch.isneginf(lse).any() == causal  # causal: rows that see no key reach the kernel as -inf

    def block(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal):
        return external.flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.3, causal,
                                                 deterministic=False)

    got = dense_lse.split_backward(block, case, dout, q, k, v, out, lse, cu_q, max(case.lengths_q))
    assert CALLS == [False, causal]  # one call per key half; causal, the first half is fully visible
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w, torch.float32, scale=10)


def test_varlen_attention_backward_hands_flash_attn_what_it_takes(cuda_build, monkeypatch):
    """Dispatch to flash-attn: dout and out in q's dtype, lse in float32, everything contiguous."""
    install_flash_attn(cuda_build, "flash_attn_interface", fa3_backward)
    monkeypatch.setattr(attention_ops, "_select", lambda *args, **kwargs: "flash-attn")  # CPU tensors: chosen
    _, (dout, q, k, v, out, lse, cu_q, cu_k), want = _ring_inputs(True)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    grads = attention_ops.varlen_attention_backward(dout.double(), q, k, v, out.double(), lse.double(), cu_q, cu_k,
                                                    softmax_scale=0.3, causal=True)
    assert CALLS == [True] and all(g.dtype == torch.float32 for g in grads)
    for g, w in zip(grads, want):
        assert_close(g, w, torch.float32, scale=10)
    with pytest.raises(ValueError, match=r"lse must have shape \(4, 22\) for q of shape \(22, 4, 16\), got \(22, 4\)"):
        attention_ops.varlen_attention_backward(dout, q, k, v, out, lse.T, cu_q, cu_k, causal=True)


def _plan_backward(head_dim=128, **features):
    return plan("varlen_attention", device="cuda", dtype=torch.bfloat16, head_dim=head_dim, capability=(9, 0),
                backward=True, **features)


@pytest.mark.parametrize("module, backward", USABLE)
def test_dispatch_runs_the_backward_from_lse_on_flash_attn_where_it_has_a_usable_one(cuda_build, module, backward):
    install_flash_attn(cuda_build, module, backward)
    assert _plan_backward(causal=True, gqa=True)[0] == "flash-attn"
    assert _plan_backward(head_dim=60)[0] != "flash-attn"  # the private backward does not pad head dims


@pytest.mark.parametrize("module, backward, reason", [
    ("flash_attn_interface", None, "flash_attn_interface has no _flash_attn_backward"),
    ("flash_attn_interface", fa3_2024_backward, "flash_attn_interface._flash_attn_backward takes no cu_seqlens_q, "
                                                "cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k"),
    ("flash_attn", fa2_2_6_backward, "flash_attn._flash_attn_varlen_backward takes no window_size_left, "
                                     "window_size_right"),
], ids=["fa3-none", "fa3-2024", "fa2-2.6"])
def test_a_flash_attn_without_a_usable_private_backward_runs_only_the_forward(cuda_build, module, backward, reason):
    install_flash_attn(cuda_build, module, backward)
    assert reason in external.flash_attn_backward_missing()
    kernel, why = _plan_backward()
    assert kernel in ("triton", "torch") and f"flash-attn: has no backward from a given output and lse here: " \
                                                f"{reason}" in why
    with pytest.raises(ValueError, match=re.escape(reason)):
        _plan_backward(backend="flash-attn")
    forward = plan("varlen_attention", device="cuda", dtype=torch.bfloat16, head_dim=128, capability=(9, 0))[0]
    assert forward == ("flash-attn" if module == "flash_attn_interface" else "torch-varlen")  # as before


def test_a_quarantined_flash_attn_runs_no_backward_either(cuda_build, tmp_path):
    install_flash_attn(cuda_build, "flash_attn_interface", fa3_backward)
    assert _plan_backward()[0] == "flash-attn"
    path = tmp_path / "quarantine.json"
    path.write_text(json.dumps({"kernels": {"flash-attn": {
        "implementation": "flash_attn_interface 3.0.0",
        "problems": ["self bfloat16: backward from merged (out, lse): dk max |err| 1"]}}}))
    cuda_build.setenv(external.QUARANTINE_ENV, str(path))
    external.flash_attn_version.cache_clear()
    external._flash_attn_module_missing.cache_clear()
    assert "is quarantined by" in external.flash_attn_backward_missing()
    kernel, why = _plan_backward()
    assert kernel != "flash-attn" and "quarantined" in why
