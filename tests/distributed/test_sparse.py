"""Tile-sparse attention under sequence parallelism (gloo, 2 and 4 processes): TileSparseAttention's output and
gradients on sharded tile-ordered tokens equal one process (sliding_tile with one window and per-head windows,
topk_tile with its coarse gate; Ulysses, ring (sliding tiles by halo exchange), hybrid; videos of mixed grids whose
token ranges cut through), a tile-sparse VideoDiT too; the ring's sliding tiles move only halo rows."""
import functools

import torch
import torch.distributed as dist

from tests.distributed.ranks import case_worker, spawn_ranks
from tests.distributed.test_attention import model_run
from vdit.distributed import SequenceParallel, build_mesh, shard_bounds, shard_packed
from vdit.distributed.stats import count_communication
from vdit.nn import TileSparseAttention
from vdit.ops import SparsePattern

GRIDS = [(2, 4, 4), (1, 2, 6), (3, 4, 2)]  # 32 + 12 + 24 = 68 tokens
PATTERNS = {"window": SparsePattern("sliding_tile", (1, 2, 2), window=(1, 2, 1)),
            "per-head": SparsePattern("sliding_tile", (1, 2, 2), window=[[1, 1, 1], [2, 2, 2], [1, 2, 1], [3, 1, 1]]),
            "topk": SparsePattern("topk_tile", (1, 2, 2), topk=2)}


def _sequence_parallel(mode):
    size = dist.get_world_size()
    if mode == "hybrid":
        return build_mesh("cpu", size, mode, 2).sequence_parallel
    return SequenceParallel(mode=mode)


def _check_module(pattern_name, mode):
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = TileSparseAttention(32, 4, pattern=PATTERNS[pattern_name]).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)  # the coarse gate too: the coarse pass must count
    g = torch.Generator().manual_seed(3)
    grids = torch.tensor(GRIDS, dtype=torch.int64)
    lengths = grids.prod(1)
    cu = torch.zeros(len(GRIDS) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    x = torch.randn(int(cu[-1]), 32, generator=g, dtype=torch.float64)
    dout = torch.randn(int(cu[-1]), 32, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    ref = module(xr, cu, grids=grids)
    ref.backward(dout)
    ref_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    sp = _sequence_parallel(mode)
    bounds = shard_bounds(cu.tolist(), sp.size)
    a, b = bounds[rank], bounds[rank + 1]
    xs = shard_packed(x, bounds=bounds).clone().requires_grad_()
    with count_communication() as sent:
        out = module(xs, cu, grids=grids, sequence_parallel=sp)
        out.backward(dout[a:b])
    if mode == "ring" and pattern_name != "topk":  # the halo exchange: no gather, only the window's rows move
        assert set(sent) <= {"halo_p2p"}, dict(sent)
    torch.testing.assert_close(out, ref.detach()[a:b], rtol=1e-9, atol=1e-9)
    # The coarse pass's backward (varlen attention among pooled tiles) is linear in the output gradient only to
    # about 1e-8 in fp64 (measured in one process: split the output gradient in two halves, sum the input
    # gradients), so the ring and hybrid paths, which split it over ranks, are held to that precision.
    tol = dict(rtol=1e-5, atol=1e-6) if pattern_name == "topk" and mode != "ulysses" else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(xs.grad, xr.grad[a:b], **tol)
    for name, p in module.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)


def _check_model(attention, mode):
    """A tile-sparse VideoDiT forward + backward over the group equals one process (gradients averaged over ranks,
    as DDP does). topk_tile runs it through Ulysses only, which is exact; ring and hybrid split the coarse pass's
    output gradient, held to its precision in _check_module."""
    from vdit.models import VideoDiT, VideoDiTConfig

    torch.manual_seed(0)
    config = VideoDiTConfig.preset("tiny", heads=4, depth=1, attention=attention, tile=(1, 2, 2), window=(1, 2, 2),
                                   topk=2)
    model = VideoDiT(config).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    run = model_run(model, [(2, 8, 12), (1, 4, 4), (3, 4, 8)])
    ref_out, ref_grads = run(None)
    out, grads = run(_sequence_parallel(mode))
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name, grad in grads.items():
        dist.all_reduce(grad)
        diff = (grad / dist.get_world_size() - ref_grads[name]).abs().max().item()
        torch.testing.assert_close(grad / dist.get_world_size(), ref_grads[name], rtol=1e-8, atol=1e-9,
                                   msg=f"{name}: {diff:.3g}")


def _check_new_window_same_batch():
    """The ring's halo plan follows the window, not the window tensor: a window changed in place (the same
    object, as a replaced pattern's new window may reuse a freed one's id) on the same batch plan gives the new
    window's output."""
    rank = dist.get_rank()
    pattern = SparsePattern("sliding_tile", (1, 2, 2), window=[[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    torch.manual_seed(0)
    module = TileSparseAttention(32, 4, pattern=pattern).double()
    grids = torch.tensor(GRIDS, dtype=torch.int64)
    cu = torch.zeros(len(GRIDS) + 1, dtype=torch.int32)
    cu[1:] = grids.prod(1).cumsum(0)
    x = torch.randn(int(cu[-1]), 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sp = _sequence_parallel("ring")
    bounds = shard_bounds(cu.tolist(), sp.size)
    xs = shard_packed(x, bounds=bounds)
    with torch.no_grad():
        before = module(xs, cu, grids=grids, sequence_parallel=sp)
        pattern.window_for(None).copy_(torch.tensor([[3, 3, 3]] * 4))
        after = module(xs, cu, grids=grids, sequence_parallel=sp)
        ref = module(x, cu, grids=grids)[bounds[rank]:bounds[rank + 1]]
    torch.testing.assert_close(after, ref, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(before, after)


def _check_case(case):
    if case == ("new window",):
        return _check_new_window_same_batch()
    (_check_model if case[0] == "model" else _check_module)(*case[-2:])


def _run(size, cases):
    spawn_ranks(functools.partial(case_worker, _check_case), size, cases)


def test_two_ranks():
    _run(2, [(name, mode) for mode in ("ulysses", "ring") for name in PATTERNS]
         + [("model", "sliding_tile", "ring"), ("model", "topk_tile", "ulysses"), ("new window",)])


def test_four_ranks():
    _run(4, [(name, mode) for mode in ("ulysses", "ring", "hybrid") for name in ("per-head", "topk")]
         + [("model", "sliding_tile", "hybrid")])


def test_halo_plans_pair_up_and_cover_every_listed_key():
    """vdit.distributed.halo.halo_plan on its own (no process group): every send of one rank is a receive of the
    rank it names, each buffer holds the rank's own range and the token rows of every key tile its query tiles
    list, and a rank without tokens sends and receives nothing."""
    from vdit.distributed.halo import halo_plan

    cu, grids = [0, 40, 64], torch.tensor([(2, 4, 5), (1, 4, 6)])
    for bounds in ([0, 30, 30, 64], [0, 17, 33, 50, 64]):
        plans = [halo_plan(cu, grids, (1, 2, 2), torch.tensor([[1, 3, 3]]), bounds, r, "cpu")
                 for r in range(len(bounds) - 1)]
        for r, plan in enumerate(plans):
            (s, e), (k0, k1) = plan.own, plan.buffer
            assert k0 <= s <= e <= k1
            for dst, a, b in plan.send:
                assert (r, a, b) in plans[dst].recv
            assert sum(b - a for _, a, b in plan.recv) == (k1 - k0) - (e - s)
            offsets = plan.offsets.tolist()
            assert offsets[0] == 0 and offsets[-1] == k1 - k0
            listed = plan.lists[plan.lists >= 0]
            assert listed.numel() == 0 or int(listed.max()) < len(offsets) - 1
        empty = plans[1] if bounds[1] == bounds[2] else None
        if empty is not None:
            assert empty.send == [] and empty.recv == []
