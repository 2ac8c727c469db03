"""The external dense kernels are offered only when their signatures take what vdit passes: fakes of
torch 2.9's and 2.14's ``varlen_attn`` and of old and current flash-attn builds, since the GPU machine
may run other releases than this one."""
import sys
import types

import pytest

from vdit.kernels import external


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
