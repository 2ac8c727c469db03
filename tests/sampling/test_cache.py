"""Step caching in FlowSampler: off is bit-identical, the three-stage model equals its forward, decisions are per
video inside packed batches (and per CFG branch), bad options give one-line errors, the cache is freed."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import reordered_sum_tolerance
from vdit.models import VideoDiT, VideoDiTConfig
from vdit.sampling import FlowSampler, StepCache, reduce_change
from vdit.sampling.cache import CacheRun, per_video_sums

SHAPES = [(3, 2, 8, 12), (3, 1, 4, 4), (3, 3, 12, 8)]


def tiny_model(**overrides) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig.preset("tiny", **overrides))
    for p in model.parameters():  # leave the zero-init so every path carries signal
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def prompts(model, count: int, seed: int = 1):
    """Packed context of ``count`` prompts (lengths 3, 1, 3, ...) and the unconditional one (1 token each)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 if i % 2 == 0 else 1 for i in range(count)]
    context = torch.randn(sum(lengths), model.config.context_dim, generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    uncond = torch.zeros(count, model.config.context_dim)
    return context, cu, uncond, torch.arange(count + 1, dtype=torch.int32)


def sample(model, shapes, cache=None, guidance=1.0, steps=6, method="euler"):
    context, cu, uncond, cu_uncond = prompts(model, len(shapes))
    sampler = FlowSampler(model, steps=steps, method=method, guidance=guidance, progress=False, cache=cache)
    out = sampler(shapes, context, cu, uncond_context=uncond, uncond_cu_seqlens=cu_uncond, seed=3)
    return out, sampler


@pytest.mark.parametrize("attention", ["dense", "sliding_tile"])
def test_three_stages_equal_the_forward_bit_for_bit(attention):
    model = tiny_model(attention=attention, tile=(1, 2, 2), window=(1, 2, 2), fractional_positions=True,
                       prompt_velocity=True)
    videos = [torch.randn(s) for s in SHAPES]
    context, cu, _, _ = prompts(model, len(SHAPES))
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        expected = model(videos, t, context, cu)
        state = model.first_block(videos, t, context, cu)
        got = model.final_layer(state, model.remaining_blocks(state, range(len(videos))))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cache_off_is_bit_identical_and_a_zero_threshold_skips_nothing(guidance):
    model = tiny_model()
    plain, _ = sample(model, SHAPES, guidance=guidance)
    off, sampler = sample(model, SHAPES, cache="none", guidance=guidance)
    assert sampler.cache is None and sampler.cache_stats is None
    never, sampler = sample(model, SHAPES, cache=StepCache(threshold=0.0), guidance=guidance)
    assert sampler.cache_stats.skipped == 0 and sampler.cache_stats.evaluations == 6 * len(SHAPES) * (
        2 if guidance != 1.0 else 1)
    for a, b, c in zip(plain, off, never):
        assert torch.equal(a, b) and torch.equal(a, c)


class Forced(CacheRun):
    """A cache run whose decisions are given: ``plan[video][call]`` (True = skip), for the videos' own indices."""

    plan: dict = {}
    videos: list = []

    def decide(self, state, step):
        batch = len(state.cu_tokens) - 1
        if len(self.residuals) != batch:
            self.residuals, self.skips = [None] * batch, [0] * batch
        call = len(self.decisions)
        return [self.plan[self.videos[i % len(self.videos)]][call] for i in range(batch)]


def forced_sample(model, shapes, plan, names, monkeypatch, guidance=1.0):
    monkeypatch.setattr(Forced, "plan", plan)
    monkeypatch.setattr(Forced, "videos", names)
    monkeypatch.setattr("vdit.sampling.flow.CacheRun", Forced)
    return sample(model, shapes, cache="first_block", guidance=guidance)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_a_video_that_skips_beside_one_that_does_not_equals_each_sampled_alone(monkeypatch, guidance):
    model = tiny_model()
    plan = {"a": [False, True, True, False, True, False], "b": [False] * 6}
    batch, sampler = forced_sample(model, SHAPES[:2], plan, ["a", "b"], monkeypatch, guidance)
    calls = 2 if guidance != 1.0 else 1
    assert sampler.cache_stats.skipped == 3 * calls and sampler.cache_stats.evaluations == 12 * calls
    tol = reordered_sum_tolerance(torch.float32, 4 * model.config.hidden_size, layers=6 * model.config.depth)
    for i, name in enumerate("ab"):
        context, cu, uncond, _ = prompts(model, 2)
        alone_sampler = FlowSampler(model, steps=6, guidance=guidance, progress=False, cache="first_block")
        monkeypatch.setattr(Forced, "videos", [name])
        s, e = int(cu[i]), int(cu[i + 1])
        alone, = alone_sampler([SHAPES[i]], context[s:e], torch.tensor([0, e - s], dtype=torch.int32),
                               uncond_context=uncond[:1], uncond_cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                               seed=3 + i)
        torch.testing.assert_close(batch[i], alone, **tol)
    plain, _ = sample(model, SHAPES[:2], guidance=guidance)
    torch.testing.assert_close(batch[1], plain[1], **tol)  # b, never skipped, is b uncached
    assert not torch.allclose(batch[0], plain[0], atol=1e-3)  # a really reused its residuals


def test_skipping_reuses_the_last_residual_exactly(monkeypatch):
    """One skipped call: the output is the first block's output plus the previous call's residual."""
    model = tiny_model()
    run = CacheRun(StepCache(threshold=1e9, max_skips=5), steps=4)
    videos = [torch.randn(s) for s in SHAPES[:2]]
    context, cu, _, _ = prompts(model, 2)
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        first = model.first_block(videos, t, context, cu)
        full = model.remaining_blocks(first, [0, 1])
        run(model, 1, videos, t, context, cu)  # step 1: no reference yet, computed
        out = run(model, 2, videos, t * 0.9, context, cu)
        assert run.decisions == [[False, False], [True, True]]
        state = model.first_block(videos, t * 0.9, context, cu)
        expected = model.final_layer(state, state.full_hidden() + (full - first.full_hidden()))
    for a, b in zip(out, expected):
        assert torch.equal(a, b)


def test_first_and_last_steps_and_max_skips_bound_the_skipping():
    model = tiny_model()
    _, sampler = sample(model, SHAPES, cache=StepCache(threshold=1e9, max_skips=2, first_steps=2, last_steps=1),
                        steps=8)
    run_skips = sampler.cache_stats
    # steps 0, 1 and 7 computed; in between at most 2 skips in a row: 2..6 -> skip, skip, compute, skip, skip
    assert run_skips.skipped == 4 * len(SHAPES) and run_skips.evaluations == 8 * len(SHAPES)
    assert sampler._run is None  # the cache's tensors are dropped with the run
    assert 0 < run_skips.block_share < run_skips.skipped_share


def test_per_batch_decision_waits_for_the_slowest_video():
    run = CacheRun(StepCache(threshold=0.5, per="batch"), steps=10)

    class State:
        cu_tokens = torch.tensor([0, 2, 4], dtype=torch.int32)
        group = None

    run.prev = torch.ones(4, 1)
    run.residuals, run.skips = [torch.zeros(1), torch.zeros(1)], [0, 0]
    State.first_residual = torch.tensor([[1.0], [1.0], [3.0], [3.0]])  # video 0 unchanged, video 1 changed 200 %
    assert run.decide(State, 3) == [False, False]
    run.cache = StepCache(threshold=0.5, per="video")
    assert run.decide(State, 3) == [True, False]


def test_per_video_sums_and_the_reduction_without_a_group():
    values = torch.arange(10.0).reshape(5, 2)
    sums = per_video_sums(values, torch.tensor([0, 2, 2, 5], dtype=torch.int32))
    assert sums.tolist() == [6.0, 0.0, 39.0]
    diff, norm = reduce_change(sums, sums + 1)
    assert diff is sums and torch.equal(norm, sums + 1)


def test_an_unknown_method_gives_a_one_line_error():
    with pytest.raises(ValueError, match="StepCache.method must be one of") as info:
        FlowSampler(tiny_model(), cache="teacache")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(threshold=-0.1), "threshold"), (dict(method="fast"), "method"), (dict(max_skips=-1), "max_skips"),
    (dict(first_steps=0), "first_steps"), (dict(per="frame"), "per"), (dict(threshold=float("nan")), "threshold"),
])
def test_step_cache_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"StepCache.{field}") as info:
        StepCache(**kwargs)
    assert "\n" not in str(info.value)


def test_a_model_without_the_three_stages_is_refused_by_name():
    with pytest.raises(TypeError, match="first_block, remaining_blocks and final_layer"):
        FlowSampler(lambda *a: a, cache="first_block")
    assert FlowSampler(lambda *a: a, cache=None).cache is None


@pytest.mark.parametrize("attention", ["dense", "sliding_tile"])
def test_remaining_blocks_on_some_videos_equal_their_rows_of_the_whole_batch(attention):
    model = tiny_model(attention=attention, tile=(1, 2, 2), window=(1, 2, 2))
    videos = [torch.randn(s) for s in SHAPES]
    context, cu, _, _ = prompts(model, len(SHAPES))
    with torch.no_grad():
        state = model.first_block(videos, torch.tensor([0.2, 0.5, 0.9]), context, cu)
        whole = model.remaining_blocks(state, [0, 1, 2])
        some = model.remaining_blocks(state, [0, 2])
    offsets = state.cu.tolist()
    expected = torch.cat([whole[offsets[0]:offsets[1]], whole[offsets[2]:offsets[3]]])
    tol = reordered_sum_tolerance(torch.float32, 4 * model.config.hidden_size, layers=model.config.depth)
    assert some.shape == expected.shape
    torch.testing.assert_close(some, expected, **tol)
