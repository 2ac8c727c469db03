"""vdit-train under torchrun (2 gloo ranks: data parallel, or sequence parallel) takes the same steps as one process."""
import json
import os

import pytest
import socket
import sys
import subprocess

from vdit.checkpoint import load_tensors

TINY = ["--hidden-size", "48", "--depth", "1", "--heads", "2", "--patch-size", "1x4x4", "--tokens-per-batch", "96", "--save-every", "3",
        "--warmup", "1", "--device", "cpu", "--steps", "3", "--caption-dropout", "0.3", "--min-videos", "2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, log, world_size, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world_size == 1:
        cmd = [sys.executable, "-m", "vdit.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "vdit.train"]
    result = subprocess.run(cmd + ["--out", str(out), "--log-file", str(log), *TINY, *extra], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("layout", [["--sequence-parallel", "1"], ["--sequence-parallel", "2", "--sp-mode", "ring"]],
                         ids=["ddp", "sequence-parallel"])
def test_two_ranks_match_one_process(tmp_path, layout):
    single = _train(tmp_path / "one", tmp_path / "one.jsonl", 1)
    ddp = _train(tmp_path / "two", tmp_path / "two.jsonl", 2, *layout)
    assert [r["step"] for r in ddp] == [1, 2, 3] and [r["videos"] for r in ddp] == [r["videos"] for r in single]
    for a, b in zip(single, ddp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (single, ddp)
    w1, w2 = load_tensors(str(tmp_path / "one" / "model.safetensors")), load_tensors(str(tmp_path / "two" / "model.safetensors"))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-4, worst


def _tiny_weights(directory, *, random_dit: bool = False) -> str:
    """Save a tiny TextToVideo (patch 2x4x4) into ``directory``; its weights file. ``random_dit``: replace the DiT's
    zero initializations with random values, so generated videos depend on every layer."""
    import torch

    from vdit.data.shapes import vocabulary
    from vdit.models import VideoDiTConfig
    from vdit.pipelines.text_to_video import TextEncoderConfig, TextToVideo

    torch.manual_seed(0)
    model = TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32, patch_size=(2, 4, 4), hidden_size=96), vocabulary(),
                        TextEncoderConfig(dim=32, depth=1, heads=2))
    if random_dit:
        for p in model.dit.parameters():
            torch.nn.init.normal_(p, std=0.1)
    model.save(str(directory))
    return str(directory / "model.safetensors")


def test_sequence_parallel_generation_matches_one_process(tmp_path):
    args = ["--prompt", "a red circle moves up", "--weights", _tiny_weights(tmp_path / "w", random_dit=True),
            "--frames", "4", "--size", "16x12", "--steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vdit.generate", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), "-m", "vdit.generate", *args, "--sp-mode", "ring",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    # (the whole of the ranks' output: a rank's own error precedes torchrun's long summary)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stdout[-4000:] + two.stderr[-12000:]
    assert "x 2 ranks (ring)" in two.stdout
    frames = sorted(os.listdir(tmp_path / "one"))
    assert len(frames) == 4 and frames == sorted(os.listdir(tmp_path / "two"))
    for f in frames:  # the PNGs hold 8-bit pixels: equal unless an fp32 rounding crosses a level
        a, b = (tmp_path / "one" / f).read_bytes(), (tmp_path / "two" / f).read_bytes()
        if a != b:
            from PIL import Image
            import numpy as np

            diff = np.abs(np.asarray(Image.open(tmp_path / "one" / f), dtype=int) - np.asarray(Image.open(tmp_path / "two" / f), dtype=int))
            assert diff.max() <= 1, diff.max()


def test_sequence_parallel_generation_bad_size_is_a_clean_error(tmp_path):
    """A usage error raised after the process group exists still exits with status 2 on every rank (the group is
    torn down first), never a signal."""
    weights = _tiny_weights(tmp_path / "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), "-m", "vdit.generate", "--prompt", "x",
                          "--weights", weights, "--frames", "4", "--size", "10x12",
                          "--steps", "1", "--out", str(tmp_path / "clip.gif")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode != 0
    assert two.stderr.count("vdit-generate: error: frames x height x width = 4x10x12") == 2, two.stderr[-4000:]
    # (torchrun's own summary carries a traceback of its ChildFailedError; the ranks print only the line above)
    assert "exitcode: 2" in two.stderr and "SIGABRT" not in two.stderr and "Signal 6" not in two.stderr
