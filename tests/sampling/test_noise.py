"""Initial noise of FlowSampler: independent by default and bit-identical to one randn per video; the shared
modes crop or resample one canvas per seed, stay i.i.d. N(0, 1), and work in packed batches of several sizes."""
from __future__ import annotations

import pytest
import torch

from tests.sampling.test_cache import prompts, tiny_model
from vdit.sampling import FlowSampler, InitialNoise, sample_timesteps_schedule
from vdit.sampling.noise import crop, resample, seeds_of

SIZES = [(3, 2, 8, 16), (3, 2, 16, 8), (3, 2, 8, 8)]  # landscape, portrait, square: the tiny model's patch 1x2x2


def old_noise(shapes, seed):
    """What the sampler drew before it had noise modes: one randn of the video's shape from seed + i."""
    return [torch.randn(tuple(s), generator=torch.Generator().manual_seed(seed + i), dtype=torch.float32)
            for i, s in enumerate(shapes)]


def run(model, shapes, noise=None, seed=3, steps=3, same_prompt=False):
    context, cu, uncond, cu_uncond = prompts(model, len(shapes))
    if same_prompt:  # every video gets the first prompt: each video of a packed batch is then comparable alone
        one, _, _, _ = prompts(model, 1)
        context = one.repeat(len(shapes), 1)
        cu = torch.arange(len(shapes) + 1, dtype=torch.int32) * len(one)
    sampler = FlowSampler(model, steps=steps, guidance=2.0, progress=False, noise=noise)
    return sampler(shapes, context, cu, uncond_context=uncond, uncond_cu_seqlens=cu_uncond, seed=seed)


def test_default_noise_is_bit_identical_to_one_draw_per_video():
    for noise in (None, "independent", InitialNoise()):
        drawn = InitialNoise.of(noise).draw(SIZES, seeds_of(5, len(SIZES)))
        assert all(torch.equal(a, b) for a, b in zip(drawn, old_noise(SIZES, 5)))


def test_default_sampler_output_is_bit_identical_to_integrating_the_old_noise():
    model = tiny_model()
    got = run(model, SIZES)

    class FromOldNoise(FlowSampler):  # the old starting point, the same integration
        def __call__(self, shapes, context, cu, *, seed, **kw):
            ts = sample_timesteps_schedule(self.steps, self.shift).tolist()
            return self._integrate(old_noise(shapes, seed), ts, (context, cu, kw["uncond_context"],
                                                                  kw["uncond_cu_seqlens"]))

    context, cu, uncond, cu_uncond = prompts(model, len(SIZES))
    want = FromOldNoise(model, steps=3, guidance=2.0, progress=False)(
        SIZES, context, cu, uncond_context=uncond, uncond_cu_seqlens=cu_uncond, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_shared_noise_agrees_where_two_sizes_overlap():
    wide, tall = InitialNoise("shared", (4, 20, 20)).draw([(3, 4, 8, 16), (3, 2, 16, 8)], [7, 7])
    # canvas rows 6..13 / cols 2..17 for the wide crop, rows 2..17 / cols 6..13 for the tall one
    assert torch.equal(wide[:, :2, :, 4:12], tall[:, :, 4:12, :])
    other_seed, = InitialNoise("shared", (4, 20, 20)).draw([(3, 4, 8, 16)], [8])
    assert not torch.equal(wide, other_seed)


def test_shared_noise_of_a_size_does_not_depend_on_the_rest_of_the_batch():
    noise = InitialNoise("shared", (2, 16, 16))
    alone, = noise.draw([(3, 2, 8, 16)], [1])
    in_batch = noise.draw([(3, 2, 16, 8), (3, 2, 8, 16)], [1, 1])[1]
    assert torch.equal(alone, in_batch)


def test_shared_canvas_defaults_to_the_bounding_box_of_the_sizes():
    assert InitialNoise("shared").canvas_for(SIZES) == (2, 16, 16)
    one, = InitialNoise("shared").draw([SIZES[0]], [4])  # a lone size is its own canvas: the independent draw
    assert torch.equal(one, old_noise([SIZES[0]], 4)[0])


def test_resample_sums_disjoint_blocks_divided_by_the_square_root_of_their_count():
    canvas = torch.randn(1, 1, 5, 3, generator=torch.Generator().manual_seed(0))
    out = resample(canvas, (1, 1, 2, 3))  # rows 0-2 -> 0 (k * 2 // 5 = 0, 0, 0), rows 3-4 -> 1
    torch.testing.assert_close(out[0, 0, 0], canvas[0, 0, :3].sum(0) / 3 ** 0.5)
    torch.testing.assert_close(out[0, 0, 1], canvas[0, 0, 3:].sum(0) / 2 ** 0.5)
    assert torch.equal(resample(canvas, canvas.shape), canvas)


@pytest.mark.parametrize("mode", ["shared", "resampled"])
def test_shared_modes_stay_iid_standard_normal(mode):
    noise = InitialNoise(mode, (4, 180, 180))
    out = noise.draw([(3, 4, 72, 40), (3, 2, 48, 48)], [0, 0])
    for x in out:
        x = x.double()
        assert abs(x.mean().item()) < 4 / x.numel() ** 0.5  # 4 standard errors
        assert abs(x.var().item() - 1) < 4 * (2 / x.numel()) ** 0.5
        for dim in (2, 3):  # neighbours are uncorrelated: the resample's blocks are disjoint
            a, b = x.narrow(dim, 0, x.shape[dim] - 1), x.narrow(dim, 1, x.shape[dim] - 1)
            corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
            assert abs(corr.item()) < 4 / a.numel() ** 0.5


def test_resampled_noise_keeps_the_canvas_layout_at_every_size():
    """Region sums of the canvas survive the resample (up to the block scale), so two sizes agree on them."""
    canvas = torch.randn((3, 1, 180, 180), generator=torch.Generator().manual_seed(0))
    wide, tall = InitialNoise("resampled", (1, 180, 180)).draw([(3, 1, 45, 90), (3, 1, 90, 45)], [0, 0])
    coarse = torch.nn.functional.avg_pool2d(canvas[:, 0], 36).flatten()
    for video, pool in ((wide, (9, 18)), (tall, (18, 9))):
        regions = torch.nn.functional.avg_pool2d(video[:, 0], pool).flatten()
        assert torch.corrcoef(torch.stack([coarse, regions]))[0, 1] > 0.999


def test_crop_centres_height_and_width_and_starts_at_the_first_frame():
    canvas = torch.arange(1 * 3 * 6 * 6, dtype=torch.float32).view(1, 3, 6, 6)
    assert torch.equal(crop(canvas, (1, 2, 2, 4)), canvas[:, :2, 2:4, 1:5])


def test_packed_batch_of_several_sizes_with_shared_noise_matches_each_size_alone():
    model = tiny_model()
    noise = InitialNoise("shared", (2, 16, 16))
    packed = run(model, SIZES, noise, seed=[9, 9, 9], same_prompt=True)
    for shape, video in zip(SIZES, packed):
        alone, = run(model, [shape], noise, seed=9, same_prompt=True)
        assert video.shape == shape
        torch.testing.assert_close(video, alone, rtol=1e-4, atol=1e-4)


def test_bad_noise_options_name_the_argument():
    with pytest.raises(ValueError, match="noise mode"):
        InitialNoise("crop")
    with pytest.raises(ValueError, match="noise canvas"):
        InitialNoise("shared", (2, 16))
    with pytest.raises(ValueError, match="noise canvas 2x8x8 .* does not contain the size 2x8x16"):
        InitialNoise("resampled", (2, 8, 8)).draw([(3, 2, 8, 16)], [0])
    with pytest.raises(TypeError, match="noise must be"):
        InitialNoise.of(3)
    with pytest.raises(ValueError, match="seed must be"):
        seeds_of([1, 2], 3)


def test_generate_cli_noise_flags(tmp_path):
    from vdit.demo.cli.common import UsageError
    from vdit.demo.cli.generate import parse_args, plan

    out = str(tmp_path / "v.gif")
    assert plan(parse_args(["--prompt", "a", "--out", out])).noise is None
    job = plan(parse_args(["--prompt", "a", "--out", out, "--noise", "resampled", "--size", "32x64",
                           "--frames", "8", "--noise-canvas", "72x72"]))
    assert job.noise == InitialNoise("resampled", (8, 72, 72))
    with pytest.raises(UsageError, match="--noise-canvas 32x32 must contain --size 32x64"):
        plan(parse_args(["--prompt", "a", "--out", out, "--noise", "shared", "--size", "32x64",
                         "--noise-canvas", "32x32"]))
