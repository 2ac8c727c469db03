"""Selective activation checkpointing under sequence parallelism (gloo, 2 processes): a VideoDiT whose blocks keep
their self-attention (``enable_activation_checkpointing(keep_attention=True)``) sends exactly the bytes of a run
without checkpointing (the backward repeats no attention collective; whole-block checkpointing sends more), and its
outputs and gradients equal both, bit for bit (dense, sliding_tile and topk_tile; Ulysses and ring)."""
import functools

import torch

from tests.distributed.ranks import case_worker, spawn_ranks
from vdit.distributed import SequenceParallel
from vdit.distributed.stats import count_communication

MODES = ("none", "full", "selective")


def _model(attention):
    from vdit.models import VideoDiT, VideoDiTConfig

    torch.manual_seed(0)
    config = VideoDiTConfig.preset("tiny", heads=4, depth=1, attention=attention, tile=(1, 2, 2), window=(1, 2, 2),
                                   topk=2)
    model = VideoDiT(config).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # zero-initialized gates would hide attention
    return model


def _step(model, sp, checkpointing):
    """One forward + backward over ``sp`` with ``checkpointing`` (one of MODES): (outputs, gradients, bytes sent)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 8, 8), (1, 4, 4), (2, 4, 8)]
    videos = [torch.randn(3, t, h, w, generator=g, dtype=torch.float64) for t, h, w in shapes]
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    context = torch.randn(7, 32, generator=g, dtype=torch.float64)
    cu_ctx = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    model.enable_activation_checkpointing(checkpointing != "none", keep_attention=checkpointing == "selective")
    model.zero_grad()
    with count_communication() as sent:
        out = model(videos, t, context, cu_ctx, sequence_parallel=sp)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}, sent


def _check(attention, mode):
    model, sp = _model(attention), SequenceParallel(mode=mode)
    runs = {checkpointing: _step(model, sp, checkpointing) for checkpointing in MODES}
    out, grads, sent = runs["none"]
    assert sent.total > 0
    assert runs["selective"][2] == sent, (runs["selective"][2], sent)  # every kind of collective, byte for byte
    assert runs["full"][2].total > sent.total, (runs["full"][2], sent)  # the recompute replays attention
    for checkpointing in ("full", "selective"):
        other_out, other_grads, _ = runs[checkpointing]
        assert all(torch.equal(a, b) for a, b in zip(out, other_out)), checkpointing
        assert all(torch.equal(other_grads[n], grads[n]) for n in grads), checkpointing
    assert len(grads) == len(list(model.parameters())) and all(g.abs().max() > 0 for g in grads.values())


def _check_case(case):
    _check(*case)


def test_selective_checkpointing_repeats_no_collective():
    cases = [("dense", "ulysses"), ("sliding_tile", "ring"), ("topk_tile", "ulysses")]
    spawn_ranks(functools.partial(case_worker, _check_case), 2, cases)
