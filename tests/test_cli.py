"""vdit-train and vdit-generate from the command line: end to end, resume, bad input."""
import os
import subprocess
import sys

import pytest
import torch

from vdit import train
from vdit.checkpoint import load_tensors
from vdit.data.shapes import vocabulary
from vdit.models import VideoDiTConfig
from vdit.pipelines.text_to_video import TextEncoderConfig, TextToVideo

TINY_TRAIN = ["--hidden-size", "48", "--depth", "1", "--heads", "2", "--patch-size", "1x4x4", "--tokens-per-batch", "48", "--save-every", "2",
              "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32, patch_size=(2, 4, 4), hidden_size=96), vocabulary(),
                        TextEncoderConfig(dim=32, depth=1, heads=2))
    model.save(str(directory))
    return str(directory / "model.safetensors")


def run_cli(module, *args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_generate_end_to_end(tmp_path, tiny_weights):
    out = tmp_path / "clip.gif"
    result = run_cli("vdit.generate", "--prompt", "a red circle moves up", "--weights", tiny_weights, "--frames", "4",
                     "--size", "16x8", "--steps", "2", "--batch", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clip_0.gif").stat().st_size > 0 and (tmp_path / "clip_1.gif").stat().st_size > 0
    assert (tmp_path / "clip_sheet.png").stat().st_size > 0
    assert "generated 2 video(s) of 4x16x8" in result.stdout
    frames = tmp_path / "frames"
    result = run_cli("vdit.generate", "--prompt", "x", "--weights", tiny_weights, "--frames", "2", "--size", "8x8",
                     "--steps", "1", "--out", str(frames))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(frames)) == ["frame_000.png", "frame_001.png"]


@pytest.mark.parametrize("args,message", [
    (["--size", "64by64"], "--size must look like HxW"),
    (["--size", "10x8"], "must be positive multiples of the patch size"),
    (["--weights", "/nonexistent/w.safetensors"], "weights file not found"),
    (["--out", "/nonexistent-dir/x.gif"], "is not writable"),
    (["--shift", "0"], "--shift must be positive"),
])
def test_generate_bad_input_is_one_line(args, message, tiny_weights):
    base = ["--prompt", "a red circle", "--weights", tiny_weights, "--frames", "2", "--steps", "1", "--out", "/tmp/vdit_bad.gif"]
    result = run_cli("vdit.generate", *base, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [[], ["--prompt-velocity", "--text-embedding-skip", "--added-lr-scale", "5"]],
                         ids=["plain", "added-modules"])
def test_train_resumes_exactly(tmp_path, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torch.set_num_threads(1)
    assert train.main(["--out", str(straight), "--steps", "4", *TINY_TRAIN, *extra]) == 0
    assert train.main(["--out", str(resumed), "--steps", "2", *TINY_TRAIN, *extra]) == 0
    assert train.main(["--out", str(resumed), "--steps", "4", *TINY_TRAIN, *extra]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_tensors(str(straight / name)), load_tensors(str(resumed / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_train_init_weights_starts_from_them(tmp_path, tiny_weights):
    out = tmp_path / "finetune"
    torch.set_num_threads(1)
    assert train.main(["--out", str(out), "--steps", "1", "--init-weights", tiny_weights, "--tokens-per-batch", "64",
                       "--save-every", "1", "--warmup", "1", "--device", "cpu"]) == 0
    start, after = load_tensors(tiny_weights), load_tensors(str(out / "model.safetensors"))
    assert start.keys() == after.keys()  # the architecture came from the init weights' config
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert moved and all((start[k] - after[k]).abs().max() < 0.01 for k in start)  # one small step away


@pytest.mark.parametrize("added", ["fractional_positions", "prompt_velocity", "embedding_skip"])
def test_added_modules_join_init_weights_without_changing_them(tmp_path, tiny_weights, added):
    loaded = TextToVideo.load(tiny_weights)
    grown = train.with_added_modules(loaded, **{added: True}).eval()
    config, grown_config = loaded.config_dict(), grown.config_dict()
    section = "text_encoder" if added == "embedding_skip" else "dit"
    assert grown_config[section][added] and not config[section][added]
    grown_config[section][added] = False
    if added == "prompt_velocity":  # needs (and brings) the fractional positions it moves
        assert grown_config["dit"]["fractional_positions"]
        grown_config["dit"]["fractional_positions"] = False
    assert grown_config == config  # nothing else changed
    videos, context_prompts = [torch.randn(3, 4, 8, 12)], ["a red circle moves up"]
    with torch.no_grad():
        torch.testing.assert_close(grown(videos, torch.tensor([0.7]), context_prompts)[0],
                                   loaded(videos, torch.tensor([0.7]), context_prompts)[0], rtol=0, atol=0)
    out = tmp_path / "run"
    flag = "--" + {"embedding_skip": "text-embedding-skip"}.get(added, added.replace("_", "-"))
    assert train.main(["--out", str(out), "--steps", "1", "--init-weights", tiny_weights, flag,
                       "--tokens-per-batch", "48", "--warmup", "1", "--device", "cpu"]) == 0
    assert TextToVideo.load(str(out / "model.safetensors")).config_dict()[section][added]
    # The new module learns although it starts at zero (once the layers after it are trained, off zero).
    torch.nn.init.normal_(grown.dit.unembed.weight, std=0.1)
    if grown.dit.position_embed is not None:
        torch.nn.init.normal_(grown.dit.position_embed.proj.weight, std=0.1)
    grown(videos, torch.tensor([0.7]), context_prompts)[0].square().sum().backward()
    new = [p.grad for name, p in grown.named_parameters() if name.startswith(train.ADDED_MODULES)]
    assert new and all(g is not None and g.abs().max() > 0 for g in new)


def test_timestep_shift_moves_training_towards_noise():
    videos = [torch.zeros(3, 2, 8, 8) for _ in range(64)]
    plain, noise = train.per_video_noise(0, range(64), videos, "cpu")
    shifted, noise_shifted = train.per_video_noise(0, range(64), videos, "cpu", shift=3.0)
    assert all(torch.equal(a, b) for a, b in zip(noise, noise_shifted))  # same noise, only t moves
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert (shifted > plain).all() and (shifted < 1).all()


def test_uniform_timestep_sampling_follows_the_shifted_sampler_grid():
    videos = [torch.zeros(3, 2, 8, 8) for _ in range(4000)]
    t, _ = train.per_video_noise(0, range(4000), videos, "cpu", shift=8.0, sampling="uniform")
    u = t / (8 - 7 * t)  # inverse of time_shift(u, 8): uniform on (0, 1) if t was drawn as the sampler's grid is
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02 and abs((u < 0.25).float().mean().item() - 0.25) < 0.02
    logit_normal, _ = train.per_video_noise(0, range(4000), videos, "cpu", shift=8.0)
    assert (t > 0.98).float().mean() > 2 * (logit_normal > 0.98).float().mean()  # more training near t = 1


def test_train_saves_its_timestep_shift_for_sampling(tmp_path):
    torch.set_num_threads(1)
    assert train.main(["--out", str(tmp_path), "--steps", "1", "--timestep-shift", "6", *TINY_TRAIN]) == 0
    assert TextToVideo.load(str(tmp_path / "model.safetensors")).sampling_shift == 6.0


def test_learning_rate_warms_up_holds_and_cools_down():
    args = train.parse_args(["--out", "x", "--steps", "100", "--lr", "1e-3", "--warmup", "10", "--decay-steps", "20"])
    lrs = [train.learning_rate(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warm-up
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:81])  # constant until the last 20 steps
    assert lrs[90] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(0.05e-3)  # linear to 0 at --steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    constant = train.parse_args(["--out", "x", "--steps", "100", "--warmup", "10"])
    assert train.learning_rate(99, constant) == constant.lr  # --decay-steps 0: no cool-down


def test_added_modules_get_their_own_learning_rate():
    # The model has fractional positions (--prompt-velocity brings them), but only the modules this command
    # names get the scaled rate: a position embedding trained earlier keeps the base one.
    args = train.parse_args(["--out", "unused", "--prompt-velocity", "--text-embedding-skip", "--added-lr-scale", "10",
                             "--hidden-size", "48", "--depth", "1", "--heads", "2", "--patch-size", "1x4x4"])
    model = train.new_model(args)
    assert model.dit.position_embed is not None
    opt, names = train.optimizer(model, args)
    base, added = opt.param_groups
    assert (base["lr_scale"], added["lr_scale"]) == (1.0, 10.0)
    added_names = names[len(base["params"]):]
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in added_names} == {"dit.prompt_velocity", "text_encoder.skip"}
    assert {n for n, _ in model.named_parameters()} == set(names) and len(names) == len(set(names))
