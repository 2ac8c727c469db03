"""vdit.ops.attention.varlen_attention_backward (the building block of ring attention) on every backend."""
import pytest
import torch

from vdit.ops import reference, varlen_attention
from vdit.ops.attention import varlen_attention_backward
from conftest import assert_close, cu_seqlens_of, kernel_backends


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends() if p.id != "cuda"] + [
    pytest.param("torch", "cpu", id="torch")])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_from_out_and_lse_matches_autograd(backend, device, causal):
    dtype = torch.float64 if backend in ("cpu", "torch") else torch.float32
    lq, lk = [5, 0, 17, 1], [7, 3, 17, 0]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), 4, 32, generator=g, dtype=dtype)
    k, v = (torch.randn(sum(lk), 2, 32, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    cu_q, cu_k = cu_seqlens_of(lq), cu_seqlens_of(lk)
    out, lse = varlen_attention(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                                softmax_scale=0.4, causal=causal, backend=backend, return_lse=True)
    grads = varlen_attention_backward(dout.to(device), q.to(device), k.to(device), v.to(device), out, lse,
                                      cu_q.to(device), cu_k.to(device), softmax_scale=0.4, causal=causal,
                                      backend=backend)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    reference.varlen_attention(qr, kr, vr, cu_q, cu_k, softmax_scale=0.4, causal=causal).backward(dout.double())
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        assert_close(got.cpu(), want, dtype, scale=10)
