"""The attention kernels themselves, called directly (below the op layer, without its Python checks).

Triton (vdit/kernels/triton/attention): varlen_attention_forward / varlen_attention_backward vs the
float64 reference, forward (out, lse) and backward (dq, dk, dv), tile shapes, alignment, the work-item
schedule, the shipped per-architecture configurations (GPU) and the opt-in tuner. Without a GPU the
kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest.py), in fp16 and fp32 only (bf16 tl.dot
is broken in the interpreter), on small ragged batches. Outputs are NaN-poisoned before the kernels
run (conftest's autouse fixture), so an element a kernel forgets fails.

C++ (csrc/attention): the compiled operator re-checks its offsets itself.

The op contract (every backend through vdit.ops.varlen_attention) is tested in tests/ops/test_attention.py.
"""
from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import HAS_GPU, assert_close, cu_seqlens_of, ragged_lengths
from vdit.ops import reference

try:
    import triton  # noqa: F401
except ImportError:
    A = None
else:
    from vdit.kernels.triton import attention as A
# Every test of the Triton kernels carries this mark; the C++ kernel test at the end runs without triton.
requires_triton = pytest.mark.skipif(A is None, reason="could not import 'triton'")

DEVICE = "cuda" if HAS_GPU else "cpu"
# bf16 tl.dot only works compiled, on a GPU.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_GPU else [])
# Gradients go through two more roundings to the input dtype (p and ds before their dot products).
GRAD_SCALE = {torch.float16: 4.0, torch.bfloat16: 4.0, torch.float32: 2.0}


def _inputs(lq, lk, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(lk), hk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(sum(lk), hk, d, generator=g).to(DEVICE, dtype)
    dout = torch.randn(sum(lq), hq, d, generator=g).to(DEVICE, dtype)
    return q, k, v, dout, cu_seqlens_of(lq, DEVICE), cu_seqlens_of(lk, DEVICE)


def _reference(q, k, v, dout, cu_q, cu_k, scale, causal):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.varlen_attention(qd, kd, vd, cu_q, cu_k, softmax_scale=scale, causal=causal,
                                          return_lse=True)
    out.backward(dout.double())
    return out.detach(), lse, qd.grad, kd.grad, vd.grad


def _check(lq, lk, hq, hk, d, causal, dtype, scale=None, fwd_config=None, bwd_config=None):
    q, k, v, dout, cu_q, cu_k = _inputs(lq, lk, hq, hk, d, dtype)
    scale = d ** -0.5 if scale is None else scale
    mq, mk = max(lq, default=0), max(lk, default=0)
    out, lse = A.varlen_attention_forward(q, k, v, cu_q, cu_k, mq, mk, scale, causal, config=fwd_config)
    dq, dk, dv = A.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal,
                                             dkdv_config=bwd_config, dq_config=bwd_config)
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout, cu_q, cu_k, scale, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, sum(lq))
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert_close(out, r_out, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    assert_close(lse, r_lse, torch.float32, scale=4.0)  # lse is fp32 whatever the input dtype
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype, scale=GRAD_SCALE[dtype])
    return out, lse, dq, dk, dv


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_ragged(dtype, causal):
    rng = random.Random(7)
    lengths = ragged_lengths(rng, 5, 90)  # includes 0 and 1
    _check(lengths, lengths, 2, 2, 64, causal, dtype)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_query_causal(dtype):
    lengths = [33, 1, 0, 64, 17]
    _check(lengths, lengths, 4, 2, 32, True, dtype, scale=0.3)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cross_attention_lengths_padded_head_dim(dtype, causal):
    # Lq != Lk both ways, Lk = 0 with queries (rows that see no key), Lq = 0 with keys; multi-query
    # attention (Hk = 1); head dim 40 is padded to 64 inside the kernels.
    lq = [50, 7, 0, 3, 40, 1]
    lk = [9, 70, 5, 0, 40, 2]
    _check(lq, lk, 3, 1, 40, causal, dtype)


@requires_triton
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 16)])
def test_uneven_tile_shapes(block_m, block_n):
    # BLOCK_M != BLOCK_N changes which tiles take the masked (causal diagonal / tail) path.
    cfg = A.Config(block_m, block_n, 4, 1)
    _check([37, 70, 5], [60, 45, 5], 2, 1, 32, True, torch.float32, fwd_config=cfg, bwd_config=cfg)


@requires_triton
def test_rows_without_keys_are_zero_with_zero_gradients():
    # Causal with Lq > Lk: query i sees keys j <= i - 8, so the first 8 rows see nothing; plus an
    # empty key sequence. Their output is 0, lse -inf, and every gradient through them is 0 (no NaN).
    lq, lk = [12, 4], [4, 0]
    out, lse, dq, dk, dv = _check(lq, lk, 2, 2, 32, True, torch.float32)
    blind = torch.tensor([True] * 8 + [False] * 4 + [True] * 4)
    assert torch.all(out[blind] == 0) and torch.all(torch.isneginf(lse[:, blind]))
    assert torch.all(dq[blind] == 0)
    assert torch.isfinite(lse[:, ~blind]).all()


@requires_triton
def test_backward_is_deterministic():
    lengths = [45, 3, 80]
    q, k, v, dout, cu_q, cu_k = _inputs(lengths, lengths, 4, 1, 32, torch.float16, seed=3)
    out, lse = A.varlen_attention_forward(q, k, v, cu_q, cu_k, 80, 80, 0.2, True)
    first = A.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 80, 80, 0.2, True)
    second = A.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 80, 80, 0.2, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_triton
def test_misaligned_inputs():
    # A contiguous view that starts 4 bytes into its buffer: the launcher copies it to keep the
    # kernels' 16-byte alignment promise.
    lengths = [20, 9]
    q, k, v, dout, cu_q, cu_k = _inputs(lengths, lengths, 2, 2, 32, torch.float32)
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
    q_view = buf[1:].view(q.shape)
    q_view.copy_(q)
    assert q_view.data_ptr() % 16 != 0
    out, lse = A.varlen_attention_forward(q_view, k, v, cu_q, cu_k, 20, 20, 0.25, False)
    r_out, r_lse, *_ = _reference(q, k, v, dout, cu_q, cu_k, 0.25, False)
    assert_close(out, r_out)
    assert_close(lse, r_lse)


@requires_triton
def test_expanded_dout():
    # Autograd can pass a non-contiguous (e.g. expanded) gradient; the launcher makes it contiguous.
    lengths = [13, 30]
    q, k, v, _, cu_q, cu_k = _inputs(lengths, lengths, 2, 2, 16, torch.float32)
    dout = torch.ones(1, 1, 1, dtype=q.dtype, device=q.device).expand(q.shape)
    out, lse = A.varlen_attention_forward(q, k, v, cu_q, cu_k, 30, 30, 0.25, True)
    dq, dk, dv = A.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, 30, 30, 0.25, True)
    _, _, r_dq, r_dk, r_dv = _reference(q, k, v, dout.contiguous(), cu_q, cu_k, 0.25, True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert_close(got, want, scale=GRAD_SCALE[torch.float32])


@requires_triton
@pytest.mark.parametrize("lq,lk", [([], []), ([0, 0], [3, 0]), ([0], [0])])
def test_empty_batches(lq, lk):
    q, k, v, dout, cu_q, cu_k = _inputs(lq, lk, 2, 1, 16, torch.float32)
    out, lse = A.varlen_attention_forward(q, k, v, cu_q, cu_k, max(lq, default=0), max(lk, default=0), 1.0, True)
    assert out.shape == q.shape and lse.shape == (2, 0)
    dq, dk, dv = A.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lq, default=0),
                                             max(lk, default=0), 1.0, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert torch.all(dk == 0) and torch.all(dv == 0)


@requires_triton
def test_head_dims_above_256_raise():
    q, k, v, _, cu_q, cu_k = _inputs([3], [3], 1, 1, 264, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        A.varlen_attention_forward(q, k, v, cu_q, cu_k, 3, 3, 1.0, False)


@requires_triton
@pytest.mark.parametrize("head_dim", [4, 12, 59, 100])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dims_that_are_not_multiples_of_8_are_padded(head_dim, causal):
    # FlashAttention's own varlen tests use head dim 59; the kernel pads to a multiple of 8 and cuts back.
    _check([21, 1, 0, 40], [30, 2, 5, 40], 2, 1, head_dim, causal, torch.float32)


@requires_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rows_are_queries", [True, False])
def test_work_items_cover_every_tile_once_heaviest_first(causal, rows_are_queries):
    # One long sequence next to short and empty ones, as in a packed batch of videos.
    rows = [3000, 20, 0, 1, 200, 130]
    cols = [2900, 40, 5, 0, 200, 7]
    cu_r, cu_c = cu_seqlens_of(rows), cu_seqlens_of(cols)
    block_r, block_c = 64, 32
    items = A.work_items(cu_r, cu_c, sum(rows), block_r, block_c, causal, rows_are_queries)
    assert items.dtype == torch.int32 and items.shape[1] == 2
    valid = items[:, 0] >= 0
    # Real items first, then unused slots; the bound on the list length is tight to within B.
    assert torch.all(valid[: int(valid.sum())]) and not torch.any(valid[int(valid.sum()):])
    assert items.shape[0] - int(valid.sum()) <= len(rows)
    got = sorted(map(tuple, items[valid].tolist()))
    want = sorted((s, t) for s, n in enumerate(rows) for t in range(-(-n // block_r)))
    assert got == want

    def cost(s, t):
        lr, lc = rows[s], cols[s]
        if not causal:
            span = lc
        elif rows_are_queries:
            span = max(0, min(lc, (t + 1) * block_r + lc - lr))
        else:
            span = max(0, lc - max(0, t * block_r - (lr - lc)))
        return -(-span // block_c)

    costs = [cost(s, t) for s, t in items[valid].tolist()]
    assert costs == sorted(costs, reverse=True)


@requires_triton
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shipped_configs_on_gpu(dtype, head_dim, causal):
    # The real per-architecture tile configurations, long and uneven sequences (GPU only).
    lq = [1100, 1, 0, 255, 17, 700]
    lk = [1100, 3, 9, 255, 40, 0] if not causal else [1100, 1, 0, 300, 17, 650]
    _check(lq, lk, 4, 2, head_dim, causal, dtype)


@requires_triton
@pytest.mark.skipif(HAS_GPU, reason="uses the interpreter's two candidate configurations")
def test_opt_in_tuner_picks_a_candidate_and_stays_correct(monkeypatch):
    # VDIT_TRITON_AUTOTUNE=1 times every candidate on the first call (here the interpreter's two) and
    # caches the winner per (kernel, device, block_d, dtype, causal); results must not change.
    monkeypatch.setenv(A.AUTOTUNE_ENV, "1")
    from vdit.kernels.triton.attention import configs
    monkeypatch.setattr(configs, "_TUNED", {})
    _check([21, 0, 40], [30, 2, 40], 2, 1, 16, True, torch.float32)
    kernels = sorted(key[0] for key in configs._TUNED)
    assert kernels == ["bwd_dkdv", "bwd_dq", "fwd"]
    assert all(cfg in A.INTERPRETER_CONFIGS for cfg in configs._TUNED.values())


# ---- C++ kernel (csrc/attention) ----------------------------------------------------------------

def test_cpu_kernel_checks_offsets_itself():
    """The C++ op never reads out of bounds, even when called directly with bad offsets."""
    g = torch.Generator().manual_seed(0)  # the inputs of tests/ops/test_attention.py's _inputs([3, 5], [4, 2], 2, 2, 8)
    q = torch.randn(8, 2, 8, generator=g, dtype=torch.float64).float()
    k = torch.randn(6, 2, 8, generator=g, dtype=torch.float64).float()
    v = torch.randn(6, 2, 8, generator=g, dtype=torch.float64).float()
    bad = torch.tensor([0, 4, 100], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must start at 0 and end at 6"):
        torch.ops.vdit.varlen_attention_fwd(q, k, v, cu_seqlens_of([3, 5]), bad, 5, 100, 0.1, False)


@requires_triton
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_descriptor_path_matches_the_reference(monkeypatch, head_dim, causal):
    """The sm_90 forward loads K/V through per-sequence TMA descriptors (out-of-sequence rows and head-dim
    padding arrive as zeros); VDIT_TRITON_TMA=1 runs that path here, under the interpreter."""
    monkeypatch.setenv("VDIT_TRITON_TMA", "1")
    lengths = [1, 0, 45, 70, 3]  # the last sequence's tail tile reaches past the end of the tensors
    _check(lengths, lengths, 2, 1, head_dim, causal, torch.float16)
