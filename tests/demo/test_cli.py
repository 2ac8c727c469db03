"""The demo CLIs vdit-train and vdit-generate (vdit/demo/cli): end to end, resume, init weights and added
modules, timestep sampling and learning-rate schedule, bad input, sparse attention options; and under torchrun
(2 gloo ranks: data parallel or sequence parallel, with the device-placement checker on) they take the same
steps / generate the same frames as one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import reordered_sum_tolerance
from tests.demo.tiny_model import save_tiny_model
from vdit.demo import growth
from vdit.demo.checkpoint import load_tensors
from vdit.demo.cli import train
from vdit.demo.pipeline import TextToVideo
from vdit.models import VideoDiTConfig
from vdit.ops import SparsePattern

TINY_TRAIN = ["--hidden-size", "48", "--depth", "1", "--heads", "2", "--patch-size", "1x4x4",
              "--tokens-per-batch", "48", "--save-every", "2", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


TRAIN, GENERATE = "vdit.demo.cli.train", "vdit.demo.cli.generate"


def run_cli(module, *args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def test_generate_end_to_end(tmp_path, tiny_weights):
    out = tmp_path / "clip.gif"
    result = run_cli(GENERATE, "--prompt", "a red circle moves up", "--weights", tiny_weights, "--frames", "4",
                     "--size", "16x8", "--steps", "2", "--batch", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clip_0.gif").stat().st_size > 0 and (tmp_path / "clip_1.gif").stat().st_size > 0
    assert (tmp_path / "clip_sheet.png").stat().st_size > 0
    assert "generated 2 video(s) of 4x16x8" in result.stdout
    frames = tmp_path / "frames"
    result = run_cli(GENERATE, "--prompt", "x", "--weights", tiny_weights, "--frames", "2", "--size", "8x8",
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
    base = ["--prompt", "a red circle", "--weights", tiny_weights, "--frames", "2", "--steps", "1",
            "--out", "/tmp/vdit_bad.gif"]
    result = run_cli(GENERATE, *base, *args)
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


@pytest.mark.parametrize("args,message", [
    (["--sequence-parallel", "3"], "--sequence-parallel (3) must divide the 1 ranks"),
    (["--min-videos", "0"], "--min-videos (0) must be >= the number of data-parallel groups (1)"),
])
def test_train_bad_rank_grid_is_one_line(tmp_path, args, message):
    result = run_cli(TRAIN, "--out", str(tmp_path / "run"), *TINY_TRAIN, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"vdit-train: error: {message}") and len(result.stderr.strip().splitlines()) == 1


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
    grown = growth.with_added_modules(loaded, **{added: True}).eval()
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
    new = [p.grad for name, p in grown.named_parameters() if name.startswith(growth.ADDED_MODULES)]
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
    assert {".".join(n.split(".")[:2]) for n in added_names} == {"dit.prompt_velocity", "text_encoder.skip"}
    assert {n for n, _ in model.named_parameters()} == set(names) and len(names) == len(set(names))


# ---- under torchrun (2 gloo ranks) ----------------------------------------------------------------

TINY_TORCHRUN = ["--hidden-size", "48", "--depth", "1", "--heads", "2", "--patch-size", "1x4x4",
                 "--tokens-per-batch", "96", "--save-every", "3", "--warmup", "1", "--device", "cpu", "--steps", "3",
                 "--caption-dropout", "0.3", "--min-videos", "2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The torchrun runs check device placement (vdit.distributed.check_placement), as NCCL would on GPUs.
CHECKED = {"OMP_NUM_THREADS": "1", "VDIT_CHECK_PLACEMENT": "1"}


def _train(out, log, world_size, *extra):
    env = {**os.environ, **CHECKED}
    if world_size == 1:
        cmd = [sys.executable, "-m", TRAIN]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", TRAIN]
    result = subprocess.run(cmd + ["--out", str(out), "--log-file", str(log), *TINY_TORCHRUN, *extra],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("grid", [["--sequence-parallel", "1"], ["--sequence-parallel", "2", "--sp-mode", "ring"],
                                    ["--fsdp"], ["--fsdp", "--sequence-parallel", "2"],
                                    ["--fsdp", "--activation-checkpointing"]],
                         ids=["ddp", "sequence-parallel", "fsdp", "fsdp-sequence-parallel", "fsdp-checkpointing"])
def test_two_ranks_match_one_process(tmp_path, grid):
    single = _train(tmp_path / "one", tmp_path / "one.jsonl", 1)
    ddp = _train(tmp_path / "two", tmp_path / "two.jsonl", 2, *grid)
    assert [r["step"] for r in ddp] == [1, 2, 3] and [r["videos"] for r in ddp] == [r["videos"] for r in single]
    for a, b in zip(single, ddp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (single, ddp)
    w1, w2 = (load_tensors(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VDIT_SLOW_TESTS"), reason="20 launches of 4 ranks: set VDIT_SLOW_TESTS=1")
def test_hybrid_inside_data_parallel_groups_never_hangs(tmp_path):
    """4 ranks = 2 data-parallel groups x 2 sequence-parallel ranks with hybrid attention, launched 20 times:
    every launch finishes (groups made up front on every rank; lazily made ones hung or reset 3 of 5)."""
    for i in range(20):
        records = _train(tmp_path / f"run{i}", tmp_path / f"run{i}.jsonl", 4, "--sequence-parallel", "2",
                         "--sp-mode", "hybrid", "--ulysses-size", "1", "--steps", "1")
        assert [r["step"] for r in records] == [1]


def test_sparse_sequence_parallel_fsdp_checkpointing_matches_one_process_and_resumes(tmp_path):
    """vdit-train --attention sliding_tile --sequence-parallel 2 --fsdp --activation-checkpointing on 2 ranks takes
    the same steps as one process with the same attention; its sharded checkpoint resumes on 4 ranks (2 data-
    parallel groups of 2) and takes the same next step as one process."""
    sparse = ["--attention", "sliding_tile", "--tile", "1,2,2", "--window", "1,3,3"]
    single = _train(tmp_path / "one", tmp_path / "one.jsonl", 1, *sparse, "--min-videos", "4", "--steps", "4")
    out, log = tmp_path / "sp", tmp_path / "sp.jsonl"
    first = _train(out, log, 2, *sparse, "--sequence-parallel", "2", "--fsdp", "--activation-checkpointing",
                   "--min-videos", "4", "--steps", "2")
    resumed = _train(out, log, 4, *sparse, "--sequence-parallel", "2", "--fsdp", "--activation-checkpointing",
                     "--min-videos", "4", "--steps", "4")
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(single, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (single, resumed)


def test_fsdp_checkpoint_resumes_at_another_world_size(tmp_path):
    """A sharded checkpoint written by 4 ranks resumes on 2 and takes the same next step as one process."""
    out, log = tmp_path / "sharded", tmp_path / "sharded.jsonl"
    _train(out, log, 4, "--fsdp", "--steps", "2", "--min-videos", "4")
    assert (out / "state.json").exists() and any(p.name.startswith("sharded-") for p in out.iterdir())
    resumed = _train(out, log, 2, "--fsdp", "--min-videos", "4")
    single = _train(tmp_path / "one4", tmp_path / "one4.jsonl", 1, "--min-videos", "4")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert abs(resumed[2]["loss"] - single[2]["loss"]) <= 1e-5 * max(1.0, abs(single[2]["loss"])), (resumed, single)
    w1, w2 = load_tensors(str(tmp_path / "one4" / "ema.safetensors")), load_tensors(str(out / "ema.safetensors"))
    assert w1.keys() == w2.keys() and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    result = run_cli(TRAIN, "--out", str(out), *TINY_TORCHRUN, "--steps", "4")  # not the way it was saved
    assert result.returncode == 2 and "resume it the way it was saved" in result.stderr



def test_sequence_parallel_generation_matches_one_process(tmp_path):
    args = ["--prompt", "a red circle moves up", "--weights", save_tiny_model(tmp_path / "w", random_dit=True),
            "--frames", "4", "--size", "16x12", "--steps", "3"]
    env = {**os.environ, **CHECKED}
    one = subprocess.run([sys.executable, "-m", GENERATE, *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), "-m", GENERATE, *args, "--sp-mode", "ring",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    # (the whole of the ranks' output: a rank's own error precedes torchrun's long summary)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stdout[-4000:] + two.stderr[-12000:]
    assert "x 2 ranks (ring)" in two.stdout
    frames = sorted(os.listdir(tmp_path / "one"))
    assert len(frames) == 4 and frames == sorted(os.listdir(tmp_path / "two"))
    for f in frames:  # the PNGs hold 8-bit pixels: equal unless an fp32 rounding crosses a level
        a, b = (tmp_path / "one" / f).read_bytes(), (tmp_path / "two" / f).read_bytes()
        if a != b:
            import numpy as np
            from PIL import Image

            pixels_one, pixels_two = (np.asarray(Image.open(tmp_path / run / f), dtype=int) for run in ("one", "two"))
            diff = np.abs(pixels_one - pixels_two)
            assert diff.max() <= 1, diff.max()


def test_sequence_parallel_generation_bad_size_is_a_clean_error(tmp_path):
    """A usage error raised after the process group exists still exits with status 2 on every rank (the group is
    torn down first), never a signal."""
    weights = save_tiny_model(tmp_path / "w")
    env = {**os.environ, **CHECKED}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), "-m", GENERATE, "--prompt", "x",
                          "--weights", weights, "--frames", "4", "--size", "10x12",
                          "--steps", "1", "--out", str(tmp_path / "clip.gif")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode != 0
    assert two.stderr.count("vdit-generate: error: frames x height x width = 4x10x12") == 2, two.stderr[-4000:]
    # (torchrun's own summary carries a traceback of its ChildFailedError; the ranks print only the line above)
    assert "exitcode: 2" in two.stderr and "SIGABRT" not in two.stderr and "Signal 6" not in two.stderr


# ---- spacetime block-sparse attention in the demo -------------------------------------------------

SPARSE = ["--attention", "topk_tile", "--tile", "2,4,4", "--topk", "2"]


def _velocity(model, videos, prompts=("a red circle moves up",)):
    with torch.no_grad():
        return model(videos, torch.tensor([0.7] * len(videos)), list(prompts))[0]


def test_with_attention_carries_the_weights_over(tiny_weights):
    dense = TextToVideo.load(tiny_weights)
    torch.manual_seed(0)
    for parameter in dense.parameters():  # trained-like: the zero-initialized gates and output off zero
        parameter.data.normal_(0, 0.2)
    videos = [torch.randn(3, 8, 32, 48)]  # token grid 4 x 8 x 12: 2 x 2 x 3 tiles of (2, 4, 4)
    sliding = growth.with_attention(dense, attention="sliding_tile", tile=(2, 4, 4), window=(1, 1, 1))
    assert sliding.dit.config.attention == "sliding_tile" and not sliding.training
    assert sliding.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(sliding.state_dict().values(), dense.state_dict().values()))
    assert (_velocity(sliding, videos) - _velocity(dense, videos)).abs().max() > 1e-3  # it attends less
    whole = growth.with_attention(sliding, window=(9, 9, 9))  # other fields kept
    assert whole.dit.config.tile == (2, 4, 4)
    # 384 keys per query (4 x 8 x 12 tokens) summed in tile order against raster order, through every block
    tol = reordered_sum_tolerance(torch.float32, 4 * 8 * 12, layers=dense.dit.config.depth)
    torch.testing.assert_close(_velocity(whole, videos), _velocity(dense, videos), **tol)
    topk = growth.with_attention(dense, attention="topk_tile", tile=(2, 4, 4), topk=12)  # all 12 tiles
    gates = [k for k in topk.state_dict() if ".attn.coarse_gate." in k]
    assert gates and all(topk.state_dict()[k].abs().max() == 0 for k in gates)  # added at zero
    torch.testing.assert_close(_velocity(topk, videos), _velocity(dense, videos), **tol)
    back = growth.with_attention(topk, attention="dense")
    assert back.state_dict().keys() == dense.state_dict().keys()
    assert growth.with_attention(dense) is dense and growth.with_attention(dense, attention="dense") is dense
    as_pattern = growth.with_attention(dense, attention=SparsePattern("sliding_tile", (2, 4, 4), window=(1, 1, 1)))
    assert as_pattern.dit.config == sliding.dit.config
    assert growth.with_attention(sliding, attention=sliding.dit.config.sparse_pattern()) is sliding
    with pytest.raises(ValueError, match="sets tile, window and topk"):
        growth.with_attention(dense, attention=SparsePattern("topk_tile", (2, 4, 4)), topk=2)
    with pytest.raises(ValueError, match="holds one window"):
        growth.with_attention(dense, attention=SparsePattern("sliding_tile", (2, 4, 4), window=[[1, 1, 1]] * 4))


def test_generate_with_sparse_attention(tmp_path, tiny_weights):
    out = tmp_path / "clip.gif"
    result = run_cli(GENERATE, "--prompt", "a red circle moves up", "--weights", tiny_weights, "--frames", "8",
                     "--size", "32x48", "--steps", "2", "--out", str(out), "--attention", "sliding_tile",
                     "--tile", "2,4,4", "--window", "1,2,1")
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    assert "attention sliding_tile, tile 2x4x4, window 1x2x1" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--attention", "sliding_tile", "--tile", "2,4"], "--tile must be three positive integers t,h,w"),
    (["--attention", "sliding_tile", "--window", "0,1,1"], "--window must be three positive integers"),
    (["--attention", "topk_tile", "--topk", "0"], "--topk must be an int >= 1"),
])
def test_bad_attention_options_are_one_line(args, message, tiny_weights):
    base = ["--prompt", "a red circle", "--weights", tiny_weights, "--frames", "2", "--steps", "1",
            "--out", "/tmp/vdit_bad.gif"]
    result = run_cli(GENERATE, *base, *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("vdit.demo.cli.eval", "--weights", tiny_weights, "--prompts", "1", *args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_attention_options_are_checked_by_sparse_pattern():
    """Each given option is checked by SparsePattern, the error naming the option; left-out ones stay None."""
    import argparse

    from vdit.demo.cli import common

    def options(**given):
        return common.attention_options(argparse.Namespace(**{**dict.fromkeys(("attention", "tile", "window",
                                                                              "topk")), **given}))

    assert options(window="4,2,2") == {"attention": None, "tile": None, "window": (4, 2, 2), "topk": None}
    assert options(attention="topk_tile", tile="2x4x4", topk=3)["tile"] == (2, 4, 4)
    with pytest.raises(common.UsageError, match="^--topk must be an int >= 1, got 0$"):
        options(attention="sliding_tile", topk=0)  # checked whichever mode reads it
    parser = argparse.ArgumentParser()
    common.add_attention_arguments(parser, default_help="dense")
    assert parser.parse_args(["--attention", "topk_tile"]).attention == "topk_tile"
    cfg = VideoDiTConfig.preset("tiny", attention="sliding_tile", tile=(2, 4, 4), window=(1, 2, 1))
    assert common.attention_summary(cfg) == f"attention {cfg.sparse_pattern().describe()}"
    assert common.attention_summary(VideoDiTConfig.preset("tiny")) == "attention dense"


def test_eval_with_sparse_attention_writes_json(tmp_path, tiny_weights):
    from vdit.demo.cli.eval import main

    path = tmp_path / "eval.json"
    assert main(["--weights", tiny_weights, "--prompts", "2", "--frames", "8", "--size", "32x48", "--steps", "1",
                 "--seed", "0", "--json", str(path), *SPARSE]) == 0
    record = json.loads(path.read_text())
    assert record["attention"] == {"attention": "topk_tile", "tile": [2, 4, 4], "window": [3, 3, 3], "topk": 2}
    assert record["size"] == [32, 48] and record["summary"] == "attention topk_tile, tile 2x4x4, top 2"
    assert record["pooled"]["prompts"] == 2 and len(record["per_seed"][0]["rows"]) == 2


def test_sparse_fine_tune_resumes_exactly(tmp_path, tiny_weights):
    torch.set_num_threads(1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = ["--init-weights", tiny_weights, *SPARSE, "--sides", "32,48", "--frame-counts", "8",
               "--tokens-per-batch", "200", "--warmup", "1", "--save-every", "2", "--device", "cpu"]
    assert train.main(["--out", str(straight), "--steps", "4", *options]) == 0
    assert train.main(["--out", str(resumed), "--steps", "2", *options]) == 0
    assert train.main(["--out", str(resumed), "--steps", "4", *options]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_tensors(str(straight / name)), load_tensors(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    weights = load_tensors(str(straight / "model.safetensors"))
    assert any(".attn.coarse_gate." in k for k in weights)  # the gate joined and trained
    assert any(weights[k].abs().max() > 0 for k in weights if ".attn.coarse_gate." in k)
    config = TextToVideo.load(str(straight / "model.safetensors")).dit.config
    assert (config.attention, config.tile, config.topk) == ("topk_tile", (2, 4, 4), 2)


def test_train_sizes_options_choose_the_videos(tmp_path):
    from vdit.demo.data import ShapesDataset

    args = train.parse_args(["--out", str(tmp_path), "--sides", "48,64", "--frame-counts", "12"])
    dataset = ShapesDataset(seed=0, **train.dataset_sizes(args))
    specs = [dataset.spec(i)[0] for i in range(20)]
    assert {s.frames for s in specs} == {12} and {s.height for s in specs} | {s.width for s in specs} == {48, 64}
    with pytest.raises(train.UsageError, match="--sides must be comma-separated positive integers"):
        train.dataset_sizes(train.parse_args(["--out", str(tmp_path), "--sides", "48,x"]))


def test_square_crops_train_on_the_centre_square_of_each_video(tmp_path):
    args = train.parse_args(["--out", str(tmp_path), "--sides", "32,48", "--frame-counts", "8", "--square-crops"])
    dataset = train.training_dataset(args)
    native = [dataset.native_spec(i)[0] for i in range(12)]
    assert any(s.height != s.width for s in native)
    batch = train.next_batch(dataset, 0, 4096, (1, 8, 8), 0, 0.0)
    assert len(batch.videos) > 1
    for i, video in zip(batch.indices, batch.videos):
        spec = dataset.native_spec(i)[0]
        assert video.shape[1:] == (8, min(spec.height, spec.width), min(spec.height, spec.width))
    assert not train.training_dataset(train.parse_args(["--out", str(tmp_path)])).square_crops


def test_activation_checkpointing_trains_the_same_steps(tmp_path):
    torch.set_num_threads(1)
    logs = []
    for flag in ([], ["--activation-checkpointing"]):
        log = tmp_path / f"log{len(logs)}.jsonl"
        assert train.main(["--out", str(tmp_path / f"run{len(logs)}"), "--steps", "2", *TINY_TRAIN, *flag,
                           "--log-file", str(log)]) == 0
        logs.append([json.loads(line)["loss"] for line in log.read_text().splitlines()])
    assert logs[0] == pytest.approx(logs[1], rel=1e-5, abs=1e-7)


def test_console_scripts_wait_passively_unless_told(monkeypatch):
    """The console scripts (vdit_cli) set OMP_WAIT_POLICY=passive before torch loads (libgomp reads it only
    then) unless the user set a policy, and run each CLI's ``cli``; importing vdit_cli loads no torch."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import vdit_cli

    out = subprocess.run([sys.executable, "-c", "import sys, vdit_cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    seen = []

    class Module:
        @staticmethod
        def cli():
            seen.append(os.environ["OMP_WAIT_POLICY"])

    modules = []
    monkeypatch.setattr(vdit_cli.importlib, "import_module", lambda name: modules.append(name) or Module)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    vdit_cli.generate()
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    vdit_cli.train()
    assert seen == ["passive", "active"] and modules == [GENERATE, TRAIN]
    with open(os.path.join(os.path.dirname(vdit_cli.__file__), "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for name, target in scripts.items():  # every entry point names a function that exists
        module, _, function = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name
