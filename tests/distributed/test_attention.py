"""vdit.distributed on CPU with gloo (2 and 4 processes): sequence-parallel attention (ulysses, ring, hybrid;
forward and gradients) against single-process attention, a sequence-parallel VideoDiT forward + backward
against one process, the process-group helpers (shard_packed / gather_packed / shard_range) and the
cross-rank input checks; a data-parallel x sequence-parallel rank grid (groups made up front,
vdit.distributed.build_mesh) repeated with fresh groups; the device-placement checker itself. Every worker runs under
vdit.distributed.check_placement, so a collective given a tensor off the data's device, or a tensor made in
vdit.distributed without a device, fails here as NCCL would fail on a GPU. The torchrun CLI tests are in
tests/demo/test_cli.py (under VDIT_CHECK_PLACEMENT=1)."""
import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from tests.distributed.ranks import free_port, spawn_ranks
from vdit.distributed import (
    PlacementError,
    build_mesh,
    check_placement,
    gather_packed,
    sequence_parallel_attention,
    shard_bounds,
    shard_packed,
    shard_range,
)
from vdit.distributed.stats import count_communication
from vdit.ops import reference

LENGTHS = [5, 1, 0, 13, 2, 1]  # 22 tokens: ranges cut through sequences, some ranks see no token of some
CROSS = [3, 2, 1, 0, 4, 2]


def _cu(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def _case_inputs(dtype, Hq, Hk, kv_lengths):
    g = torch.Generator().manual_seed(0)
    total_q, total_k = sum(LENGTHS), sum(kv_lengths)
    q = torch.randn(total_q, Hq, 8, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(total_k, Hk, 8, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(total_k, Hk, 8, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(total_q, Hq, 8, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _check(mode, dtype, Hq, Hk, causal, kv_replicated, ulysses_size=None, layout="tokens"):
    rank, size = dist.get_rank(), dist.get_world_size()
    kv_lengths = CROSS if kv_replicated else LENGTHS
    q, k, v, dout = _case_inputs(dtype, Hq, Hk, kv_lengths)
    cu_q, cu_k = _cu(LENGTHS), _cu(kv_lengths)
    # single-process expectation
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(qr, kr, vr, cu_q, cu_k, softmax_scale=0.5, causal=causal)
    ref.backward(dout)
    # sharded
    bq, bk = shard_bounds(cu_q.tolist(), size, layout, causal), shard_bounds(cu_k.tolist(), size, layout, causal)
    qs = shard_packed(q, bounds=bq).clone().requires_grad_()
    ks = (k if kv_replicated else shard_packed(k, bounds=bk)).clone().requires_grad_()
    vs = (v if kv_replicated else shard_packed(v, bounds=bk)).clone().requires_grad_()
    # hybrid runs on its Ulysses and ring groups, made up front on every rank
    subgroups = build_mesh("cpu", size, mode, ulysses_size).sequence_parallel.subgroups if mode == "hybrid" else None
    out = sequence_parallel_attention(qs, ks, vs, cu_q, cu_k, group=None, mode=mode, ulysses_size=ulysses_size,
                                      softmax_scale=0.5, causal=causal, kv_replicated=kv_replicated, layout=layout,
                                      subgroups=subgroups)
    out.backward(shard_packed(dout, bounds=bq))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    a, b = bq[rank], bq[rank + 1]
    torch.testing.assert_close(out, ref.detach()[a:b], **tol)
    torch.testing.assert_close(qs.grad, qr.grad[a:b], **tol)
    if kv_replicated:
        torch.testing.assert_close(ks.grad, kr.grad, **tol)
        torch.testing.assert_close(vs.grad, vr.grad, **tol)
    else:
        c, d = bk[rank], bk[rank + 1]
        torch.testing.assert_close(ks.grad, kr.grad[c:d], **tol)
        torch.testing.assert_close(vs.grad, vr.grad[c:d], **tol)


def model_run(model, grids):
    """For a float64 VideoDiT ``model`` (3 input channels, context dim 32) and three videos of patch ``grids``
    (T, H, W): a function ``run(sequence_parallel) -> (outputs, {name: gradient})`` of one forward and the
    backward of a fixed weighted sum of the outputs, on the same inputs at every call."""
    g = torch.Generator().manual_seed(1)
    videos = [torch.randn(3, t, h, w, generator=g, dtype=torch.float64) for t, h, w in grids]
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    context = torch.randn(7, 32, generator=g, dtype=torch.float64)
    cu_ctx = torch.tensor([0, 3, 4, 7], dtype=torch.int32)

    def run(sp):
        model.zero_grad()
        out = model(videos, t, context, cu_ctx, sequence_parallel=sp)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}

    return run


def _check_model(mode, checker=None, depth=2, checkpointing=False, layout="tokens"):
    """A VideoDiT forward + backward over the group equals one process (gradients averaged over ranks), also
    with activation checkpointing (the recompute replays the collectives); returns the host reads
    vdit.distributed made in the sequence-parallel forward + backward."""
    from vdit.distributed import SequenceParallel
    from vdit.models import VideoDiT, VideoDiTConfig

    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig.preset("tiny", heads=4, depth=depth)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    run = model_run(model, [(2, 8, 12), (1, 4, 4), (3, 12, 8)])
    ref_out, ref_grads = run(None)
    model.enable_activation_checkpointing(checkpointing)
    if mode == "hybrid":  # its Ulysses and ring groups, made up front on every rank
        sp = build_mesh("cpu", dist.get_world_size(), mode, 2, layout).sequence_parallel
    else:
        sp = SequenceParallel(mode=mode, layout=layout)
    reads_before = sum(checker.host_reads.values()) if checker else 0
    out, grads = run(sp)
    reads = (sum(checker.host_reads.values()) if checker else 0) - reads_before
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for name, grad in grads.items():
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / dist.get_world_size(), ref_grads[name], rtol=1e-8, atol=1e-9, msg=name)
    return reads


def _check_sharded_loss(mode, attention="dense"):
    """The flow-matching loss on each rank's shard (VideoDiT.forward_shard): the ranks' losses add up to one
    process's loss and their gradients to its gradients, and no rank gathers hidden states or velocities (with
    dense attention nothing but the attention's point-to-point / all-to-all traffic moves)."""
    from vdit.distributed import SequenceParallel
    from vdit.models import VideoDiT, VideoDiTConfig
    from vdit.training import flow_matching_loss

    torch.manual_seed(0)
    extra = {} if attention == "dense" else dict(attention="sliding_tile", tile=(1, 2, 2), window=(1, 3, 3))
    model = VideoDiT(VideoDiTConfig.preset("tiny", heads=4, depth=2, fractional_positions=True,
                                           prompt_velocity=True, **extra)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    videos = [torch.randn(3, t, h, w, generator=g, dtype=torch.float64) for t, h, w in [(2, 8, 12), (1, 4, 4),
                                                                                        (3, 12, 8)]]
    noise = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in videos]
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    context = torch.randn(7, 32, generator=g, dtype=torch.float64)
    cu_ctx = torch.tensor([0, 3, 4, 7], dtype=torch.int32)

    def loss_of(forward):
        model.zero_grad()
        loss = flow_matching_loss(forward, videos, context, cu_ctx, t=t, noise=noise)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_of(model)
    if mode == "hybrid":
        sp = build_mesh("cpu", dist.get_world_size(), mode, 2).sequence_parallel
    else:
        sp = SequenceParallel(mode=mode)
    with count_communication() as sent:
        loss, grads = loss_of(lambda x, tt, c, cu: model.forward_shard(x, tt, c, cu, sp))
    if attention == "dense":  # (tile-sparse ring attention gathers k / v itself, vdit.distributed.sparse)
        assert "all_gather" not in sent and "all_reduce" not in sent, dict(sent)
    dist.all_reduce(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)  # the loss sums its squares in float32
    for name, grad in grads.items():
        dist.all_reduce(grad)
        # The clip velocities are computed in float32 (vdit.models.dit.PromptVelocity), so their gradient is a
        # float32 sum over the tokens, in another order on each rank's share.
        rtol, atol = (1e-4, 1e-6) if name.startswith("prompt_velocity") else (1e-8, 1e-10)
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_no_host_reads_per_layer(mode, checker):
    """The sequence-parallel model reads the batch's offsets on the host once per batch: three blocks make no
    more host reads in vdit.distributed than one."""
    one, three = _check_model(mode, checker, depth=1), _check_model(mode, checker, depth=3)
    assert one == three, (mode, one, three, dict(checker.host_reads))


def _check_mesh_repeated(repeats):
    """dp x sp = 2 x 2 with hybrid sequence parallelism inside each data-parallel group, every group made up
    front by every rank; repeated with fresh groups. Each data-parallel group attends its own batch."""
    for _ in range(repeats):
        mesh = build_mesh("cpu", sp=2, mode="hybrid", ulysses_size=1)
        assert mesh.dp_size == 2 and mesh.sp_size == 2
        sp = mesh.sequence_parallel
        g = torch.Generator().manual_seed(mesh.dp_rank)
        q, k, v = (torch.randn(sum(LENGTHS), 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
        cu = _cu(LENGTHS)
        ref = reference.varlen_attention(q, k, v, cu, cu)
        a, b = shard_range(q.shape[0], sp.size, sp.rank)
        qs = q[a:b].clone().requires_grad_()
        out = sp.attention(qs, k[a:b], v[a:b], cu, cu)
        torch.testing.assert_close(out, ref[a:b], rtol=1e-9, atol=1e-9)
        out.sum().backward()
        assert torch.isfinite(qs.grad).all()
        dist.barrier()


def _check_aligned(mode, cu_list, ulysses_size=None):
    """Attention on a batch whose shard ranges start and end on video boundaries (a ring rank may send and
    receive nothing at some or all steps) equals one process; the groups come from build_mesh, which warms each
    up, so the checker's rule on point-to-point calls before a collective holds."""
    rank, size = dist.get_rank(), dist.get_world_size()
    cu = torch.tensor(cu_list, dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(cu_list[-1], 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(qr, kr, vr, cu, cu)
    ref.backward(dout)
    sp = build_mesh("cpu", size, mode, ulysses_size).sequence_parallel
    bounds = shard_bounds(cu_list, size)
    a, b = bounds[rank], bounds[rank + 1]
    qs, ks, vs = (t[a:b].clone().requires_grad_() for t in (q, k, v))
    with count_communication() as forward:
        out = sp.attention(qs, ks, vs, cu, cu)
    with count_communication() as backward:
        out.backward(dout[a:b])
    torch.testing.assert_close(out, ref.detach()[a:b], rtol=1e-9, atol=1e-9)
    if mode == "ring":  # the backward moves each used block once more and its gradients back: nothing else
        assert set(backward) <= {"ring_p2p"} and backward["ring_p2p"] == 2 * forward["ring_p2p"], (forward, backward)
    for mine, full in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(mine.grad, full.grad[a:b], rtol=1e-9, atol=1e-9)


def _worker(rank, size, port, cases, errors):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        with check_placement("cpu") as checker:
            _cases(rank, size, cases, checker)
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _cases(rank, size, cases, checker):
    """The gather round trip, the listed cases, and bad input raising on every rank instead of hanging."""
    x = torch.arange(22.0).reshape(22, 1).requires_grad_()
    full = gather_packed(shard_packed(x), 22)
    assert torch.equal(full, x)
    full.sum().backward()  # every rank's loss uses every token: gradient = world size
    lo, hi = shard_range(22, size, rank)
    assert torch.equal(x.grad[lo:hi], torch.full((hi - lo, 1), float(size)))
    for case in cases:
        if case[0] == "model":
            _check_model(case[1])
        elif case[0] == "model-checkpointing":
            _check_model(case[1], checkpointing=True)
        elif case[0] == "model-work-layout":
            _check_model(case[1], layout="work")
        elif case[0] == "sharded-loss":
            _check_sharded_loss(*case[1:])
        elif case[0] == "host-reads":
            _check_no_host_reads_per_layer(case[1], checker)
        elif case[0] == "mesh":
            _check_mesh_repeated(case[1])
        elif case[0] == "aligned":
            _check_aligned(*case[1:])
        else:
            _check(*case)
    # bad input: cu_seqlens differing across ranks raises on every rank (no hang)
    cu = _cu(LENGTHS)
    if rank == 1:
        cu = _cu([6, 0, 0, 13, 2, 1])
    q = torch.zeros(shard_range(22, size, rank)[1] - shard_range(22, size, rank)[0], 4, 8)
    try:
        sequence_parallel_attention(q, q, q, cu, cu, mode="ring")
        raise AssertionError("differing cu_seqlens were accepted")
    except ValueError as exc:
        assert "identical on every rank" in str(exc)
    try:  # a shard of the wrong size
        sequence_parallel_attention(q[1:] if rank == 0 else q, q, q, _cu(LENGTHS), _cu(LENGTHS), mode="ulysses")
        raise AssertionError("a wrong shard size was accepted")
    except ValueError as exc:
        assert "do not follow the contract" in str(exc)
    try:  # hybrid without its groups made up front: raises on every rank, before any collective
        sequence_parallel_attention(q, q, q, _cu(LENGTHS), _cu(LENGTHS), mode="hybrid", ulysses_size=1)
        raise AssertionError("hybrid attention ran without subgroups")
    except ValueError as exc:
        assert "build_mesh" in str(exc)
    assert checker.collectives["all_gather"] > 0 and checker.collectives["all_to_all_single"] > 0


def _run(size, cases):
    spawn_ranks(_worker, size, cases)


def test_two_ranks():
    f64, f32 = torch.float64, torch.float32
    _run(2, [("ulysses", f64, 4, 2, False, False), ("ulysses", f32, 4, 2, True, False),
             ("ulysses", f64, 4, 2, False, True), ("ring", f64, 4, 2, False, False), ("ring", f32, 4, 1, True, False),
             ("ring", f64, 3, 3, False, True),
             ("model", "ulysses"), ("model", "ring"), ("host-reads", "ulysses"), ("host-reads", "ring"),
             ("model-checkpointing", "ulysses"), ("model-checkpointing", "ring"),
             ("ring", f64, 4, 2, False, False, None, "work"), ("ulysses", f64, 4, 2, False, False, None, "work"),
             ("model-work-layout", "ring"), ("sharded-loss", "ulysses"), ("sharded-loss", "ring"),
             ("sharded-loss", "ring", "sliding_tile")])


def test_four_ranks():
    f64 = torch.float64
    _run(4, [("ulysses", f64, 4, 4, False, False), ("ring", f64, 4, 2, True, False),
             ("hybrid", f64, 4, 2, False, False, 2), ("hybrid", f64, 4, 2, True, False, 2),
             ("hybrid", f64, 4, 2, False, True, 2), ("model", "hybrid"), ("model-checkpointing", "hybrid"),
             ("mesh", 20),
             ("ring", f64, 4, 2, False, False, None, "work"), ("hybrid", f64, 4, 2, False, False, 2, "work"),
             ("ring", f64, 4, 2, False, True, None, "work"), ("ring", f64, 4, 2, True, False, None, "work"),
             ("model-work-layout", "hybrid"), ("sharded-loss", "hybrid"), ("sharded-loss", "ulysses", "sliding_tile")])


def test_video_aligned_ranges_do_not_hang():
    """Ranges on video boundaries: hybrid Ulysses 2 x ring 3 on [0, 200, 300] (ring rank 2 holds all of the
    second video and takes part in no ring step, so a ring group whose first call were point-to-point would hang
    on NCCL), and a ring of 4 on [0, 150, 300] (ranks 0-1 and 2-3 exchange, never across)."""
    _run(6, [("aligned", "hybrid", [0, 200, 300], 2)])
    _run(4, [("aligned", "ring", [0, 150, 300]), ("aligned", "ulysses", [0, 150, 300])])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VDIT_SLOW_TESTS"), reason="20 launches of 6 ranks: set VDIT_SLOW_TESTS=1")
def test_hybrid_ring_of_three_runs_twenty_times():
    """The hybrid Ulysses 2 x ring 3 case on [0, 200, 300], launched 20 times with fresh processes and groups:
    every launch finishes and equals one process (the checker's warm-up rule holds on every launch)."""
    for _ in range(20):
        _run(6, [("aligned", "hybrid", [0, 200, 300], 2)])


def test_placement_checker_refuses_p2p_before_a_collective():
    """A batched point-to-point call on a group that has run no collective raises (NCCL would set its
    communicator up there, collectively); build_mesh warms every group it makes up."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        token = torch.zeros(1)
        with check_placement("cpu") as checker:
            with pytest.raises(PlacementError, match="run no collective yet"):
                dist.batch_isend_irecv([dist.P2POp(dist.isend, token, 0, group)])
            assert checker.collectives["batch_isend_irecv"] == 0
            dist.all_reduce(token, group=group)
            assert group in checker.joined and "world" not in checker.joined
            before = checker.collectives["all_reduce"]
            mesh = build_mesh("cpu", 1)
            # groups of one rank have no peer to set a communicator up with: not warmed (the 6-rank test covers
            # real groups)
            assert mesh.world_size == 1 and checker.collectives["all_reduce"] == before
    finally:
        dist.destroy_process_group()


def test_placement_checker_catches_what_nccl_would_refuse(tmp_path):
    """The checker itself, in one gloo process: a collective given a tensor off the declared data device, and a
    factory call without a device from code in vdit/distributed, both raise before anything runs."""
    import vdit.distributed as package

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with check_placement("cuda") as checker:  # the data would be on a GPU: a CPU tensor must be refused
            with pytest.raises(PlacementError, match="all_reduce got a tensor on cpu"):
                dist.all_reduce(torch.zeros(2))
        assert checker.collectives["all_reduce"] == 0
        inside = os.path.join(os.path.dirname(package.__file__), "made_up.py")
        code = compile("import torch\nx = torch.zeros(2)\ny = torch.zeros(2, device='cpu')\nx.tolist()\n",
                       inside, "exec")
        with check_placement("cpu") as checker:
            with pytest.raises(PlacementError, match="made_up.py:2: zeros"):
                exec(code, {})
            exec(compile("import torch\ny = torch.zeros(2, device='cpu')\ny.tolist()\n", inside, "exec"), {})
            dist.all_reduce(torch.zeros(2))
        assert checker.collectives["all_reduce"] == 1
        assert checker.host_reads == {"distributed/made_up.py:3": 1}
        # Host reads anywhere in vdit count (the ops' validation too); the device rule is vdit.distributed's.
        elsewhere = os.path.join(os.path.dirname(os.path.dirname(package.__file__)), "ops", "made_up.py")
        with check_placement("cpu") as checker:
            exec(compile("import torch\nx = torch.zeros(2)\nx.tolist()\n", elsewhere, "exec"), {})
        assert checker.host_reads == {"ops/made_up.py:3": 1}
        assert dist.all_reduce is not checker.wrap  # restored on exit
    finally:
        dist.destroy_process_group()


def test_ring_moves_only_the_blocks_a_rank_attends():
    """The ring's routing plan (no process group): a block goes to a rank only when their token ranges share a
    sequence, and, causal, only to ranks after its owner; the steps a rank skips are the ones it is sent nothing
    for."""
    from vdit.distributed.ring import BatchPlan

    cu = [0, 1536, 2304, 2688, 2784]  # the benchmark batch
    plan = BatchPlan(cu, cu)
    needed = plan.needed(8, False, False)
    assert sum(needed[r][o] for r in range(8) for o in range(8) if r != o) == 28  # of 56 relayed before
    assert all(needed[r][r] for r in range(8)) and all(needed[r][o] == needed[o][r] for r in range(8) for o in range(8))
    causal = plan.needed(8, True, False)
    assert all(causal[r][o] == (needed[r][o] and o <= r) for r in range(8) for o in range(8))
    steps = plan.ring_steps(3, 8, False, False, "cpu")
    assert [s is not None for s in steps] == [needed[3][(3 - s) % 8] for s in range(8)]
    assert steps[0].cu_q.dtype == torch.int32 and steps[0].cu_q.device.type == "cpu"


def test_balanced_split_deals_videos_by_tokens():
    from vdit.distributed.sharding import balanced_split

    tokens = [1024, 64, 512, 64, 400, 64]
    split = balanced_split(tokens, 2)
    assert sorted(i for part in split for i in part) == list(range(6)) and all(p == sorted(p) for p in split)
    loads = [sum(tokens[i] for i in part) for part in split]
    assert max(loads) == 1024 + 64 and min(loads) == 1040  # round-robin by count gave 1936 / 192
    assert all(balanced_split([5, 5, 5], 3)) and balanced_split([], 2) == [[], []]


def test_work_layout_balances_ring_attention():
    """Range boundaries by attention work: on the benchmark batch the ranks' query-key pairs are within 1 % of
    each other at 2, 4 and 8 ranks (equal token counts: up to 1.38x the mean); ranges stay contiguous, cover
    every token once, and empty sequences are harmless."""
    cu = [0, 1536, 2304, 2688, 2784]
    for size in (2, 4, 8):
        bounds = shard_bounds(cu, size, "work")
        assert bounds[0] == 0 and bounds[-1] == cu[-1] and bounds == sorted(bounds)
        work = [sum(max(0, min(b, bounds[r + 1]) - max(a, bounds[r])) * (b - a) for a, b in zip(cu, cu[1:]))
                for r in range(size)]
        assert max(work) / (sum(work) / size) < 1.01, (size, work)
    assert shard_bounds([0, 0, 5, 5, 9], 3, "work") == [0, 3, 6, 9]
    causal = shard_bounds(cu, 4, "work", causal=True)  # a query at position i sees i + 1 keys
    work = [sum(sum(i + 1 for i in range(n) if causal[r] <= a + i < causal[r + 1]) for a, n in
                zip(cu, [b - a for a, b in zip(cu, cu[1:])])) for r in range(4)]
    assert max(work) / (sum(work) / 4) < 1.01, work
    assert shard_bounds(cu, 4) == [0, 696, 1392, 2088, 2784]
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_bounds(cu, 2, "heads")


@pytest.mark.parametrize("size", [8, 64])
def test_ring_layers_after_the_first_read_nothing_on_the_host(size):
    """A simulated ring of ``size`` ranks: one rank's steps (vdit.distributed.ring.BatchPlan, one offsets pair
    per ring step) attended twice, as two layers do. The first layer reads each pair's offsets on the host
    once; the second reads nothing anywhere in vdit, also when the ring has more pairs than the offsets
    caches' default sizes (64 and 32 entries)."""
    from vdit._cache import _PER_OFFSETS
    from vdit.distributed.ring import BatchPlan, _block_forward

    lengths = [2, 13 * size + 5, 3]  # a sequence across every rank's range: every ring step has a pair
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    plan = BatchPlan(cu, cu, None, None)
    rank = size // 2
    steps = [s for s in plan.ring_steps(rank, size, causal=False, kv_replicated=False, device="cpu") if s]
    assert len(steps) == size
    bounds = plan.bounds(size)
    q = torch.randn(bounds[rank + 1] - bounds[rank], 2, 16)
    kv = torch.randn(cu[-1] // size + 8, 2, 16)
    with check_placement("cpu") as checker:
        for layer in range(2):
            before = sum(checker.host_reads.values())
            for step in steps:
                n = int(step.cu_k[-1])
                _block_forward(q, kv[:n], kv[:n], step, 0.25)
            reads = sum(checker.host_reads.values()) - before
            if layer == 0:
                assert reads >= len(steps)
            else:
                assert reads == 0, dict(checker.host_reads)
    assert all(cache.size >= cache.default_size + per_pair * size for cache, per_pair in _PER_OFFSETS)

