"""--cache / --cache-threshold of vdit-generate and vdit-eval-demo, and step caching under sequence parallelism:
2 gloo ranks (torchrun) decide the same per video and generate the same frames as one process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.demo.tiny_model import save_tiny_model
from vdit.demo.pipeline import TextToVideo, generate
from vdit.sampling import DEFAULT_THRESHOLD, StepCache

GENERATE = "vdit.demo.cli.generate"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny demo model with random DiT weights (no zero-init), so every block changes the video."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-cache"), random_dit=True)


def test_generate_prints_what_the_cache_skipped(tmp_path, weights, capsys):
    from vdit.demo.cli.generate import main

    assert main(["--prompt", "a red circle moves up", "--weights", weights, "--frames", "4", "--size", "16x16",
                 "--steps", "8", "--cache", "first_block", "--cache-threshold", "10", "--out",
                 str(tmp_path / "c.gif"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # 8 steps x 2 CFG branches; first and last computed, at most 3 skips in a row: 2 + 3 skips per branch
    assert "step cache first_block (threshold 10): skipped 10/16 video evaluations" in out
    assert "of block evaluations, sampling took" in out


def test_generate_without_cache_prints_no_cache_line(tmp_path, weights, capsys):
    from vdit.demo.cli.generate import main

    assert main(["--prompt", "x", "--weights", weights, "--frames", "2", "--size", "8x8", "--steps", "2",
                 "--out", str(tmp_path / "n.gif"), "--device", "cpu"]) == 0
    assert "step cache" not in capsys.readouterr().out


@pytest.mark.parametrize("module", ["generate", "eval"])
def test_a_negative_threshold_is_a_one_line_error(module, weights, monkeypatch, capsys):
    import importlib

    cli = importlib.import_module(f"vdit.demo.cli.{module}")
    args = ["--weights", weights, "--cache", "first_block", "--cache-threshold", "-0.5"]
    if module == "generate":
        args += ["--prompt", "x", "--out", "/tmp/vdit_cache_bad.gif"]
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as info:
        cli.cli()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--cache-threshold must be >= 0, got -0.5" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unknown_cache_method_is_refused_by_argparse(weights, capsys):
    from vdit.demo.cli.generate import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--prompt", "x", "--cache", "teacache"])
    assert info.value.code == 2 and "--cache: invalid choice: 'teacache'" in capsys.readouterr().err
    assert parse_args(["--prompt", "x"]).cache == "none"


def test_eval_labels_its_cache(weights, capsys):
    from vdit.demo.cli.eval import main

    assert main(["--weights", weights, "--prompts", "1", "--frames", "2", "--size", "16x16", "--steps", "4",
                 "--seed", "0", "--cache", "first_block"]) == 0
    assert f"step cache first_block {DEFAULT_THRESHOLD:g})" in capsys.readouterr().out


def test_generate_with_a_zero_threshold_equals_no_cache(weights):
    model = TextToVideo.load(weights)
    plain = generate(model, ["a red circle"], frames=2, height=16, width=16, steps=4, progress=False)
    stats = []
    cached = generate(model, ["a red circle"], frames=2, height=16, width=16, steps=4, progress=False,
                      cache=StepCache(threshold=0.0), stats=stats)
    assert torch.equal(plain[0], cached[0]) and stats[0].evaluations == 8 and stats[0].skipped == 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sequence_parallel_ranks_decide_alike_and_match_one_process(tmp_path, weights):
    """Each rank sums its part of every video's change over the group before deciding: with a threshold where
    some steps skip, 2 ranks print the same skip count as one process and write the same frames."""
    args = ["--prompt", "a red circle moves up", "--weights", weights, "--frames", "4", "--size", "16x12",
            "--steps", "6", "--cache", "first_block", "--cache-threshold", "0.8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VDIT_CHECK_PLACEMENT": "1"}
    one = subprocess.run([sys.executable, "-m", GENERATE, *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), "-m", GENERATE, *args, "--sp-mode", "ring",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-8000:]
    line = [s for s in one.stdout.splitlines() if s.startswith("step cache")]
    assert len(line) == 1 and "skipped 0/" not in line[0], one.stdout
    assert line[0].split(", sampling took")[0] in two.stdout, (one.stdout, two.stdout)
    frames = sorted(os.listdir(tmp_path / "one"))
    assert len(frames) == 4 and frames == sorted(os.listdir(tmp_path / "two"))
    for f in frames:  # 8-bit pixels: equal unless an fp32 rounding crosses a level
        a = np.asarray(Image.open(tmp_path / "one" / f), dtype=int)
        b = np.asarray(Image.open(tmp_path / "two" / f), dtype=int)
        assert np.abs(a - b).max() <= 1
