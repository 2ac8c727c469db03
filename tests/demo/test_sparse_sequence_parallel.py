"""Tile-sparse attention (sliding_tile, topk_tile) under sequence parallelism from the CLIs: vdit-train with
--sequence-parallel 2 --fsdp --activation-checkpointing (topk_tile: selective) under torchrun (2 gloo ranks, device
placement checked) takes the same steps as one process, a checkpoint written by 2 ranks resumes in one process on
the same steps, and vdit-generate on 2 ranks (Ulysses and ring) writes the frames of one process.

What this covers on CPU: the sharding, the collectives' pairing and order (forward, backward, the
activation-checkpointing recompute, FSDP's gathers and reductions) and the arithmetic in fp32. What only NCCL on
GPUs shows: bf16 mixed precision (FSDP's policy), the CUDA / Triton kernels, streams and overlap."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.demo.test_cli import CHECKED, GENERATE, _port, _train
from tests.demo.tiny_model import save_tiny_model
from vdit.demo.checkpoint import load_tensors
from vdit.demo.cli import train

# The tiny TextToVideo of test_cli with every DiT weight random (zero-initialized gates would hide attention):
# patch 2x4x4 on the dataset's 8-16 frames of 32-64 pixels gives token grids of 4-8 x 8-16 x 8-16, in tiles of
# 2x4x4 that is 2-4 tiles per axis, of which a query tile sees a window of 1x2x1 or its top 2.
SLIDING = ["--attention", "sliding_tile", "--tile", "2,4,4", "--window", "1,2,1"]
TOPK = ["--attention", "topk_tile", "--tile", "2,4,4", "--topk", "2"]
STEPS = ["--steps", "4", "--save-every", "2", "--lr", "1e-3"]
PARALLEL = ["--sequence-parallel", "2", "--fsdp", "--activation-checkpointing"]

# Relative tolerance of a loss. The ranks run the same fp32 ops on the same tokens (Ulysses gives each rank
# whole videos for its heads); what differs is the order of a few sums: each rank's share of the loss and of
# every gradient, added over 2 ranks (all-reduce, FSDP's reduce-scatter), a few ulp (1.2e-7) each, carried
# through 4 AdamW steps. 1e-5 is ~100 ulp: room for that, far below what a wrong shard, a missed collective or
# another attention pattern moves a loss (the two patterns here differ by more than 1e-3).
RTOL = 1e-5


def _close(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(abs(x["loss"] - y["loss"]) <= RTOL * max(1.0, abs(x["loss"]))
                                    for x, y in zip(a, b))


def _max_difference(a, b) -> float:
    """Largest absolute difference between two saved weight files (same keys)."""
    w1, w2 = load_tensors(str(a)), load_tensors(str(b))
    assert w1.keys() == w2.keys()
    return max(float((w1[k] - w2[k]).abs().max()) for k in w1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("weights"), random_dit=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, weights):
    """Uninterrupted single-process runs, one per pattern (run on first use): name -> (folder, log records)."""
    runs = {}

    def run(name: str, pattern: list[str]):
        if name not in runs:
            root = tmp_path_factory.mktemp(name)
            runs[name] = root / "run", _train(root / "run", root / "log.jsonl", 1, "--init-weights", weights,
                                              *pattern, *STEPS)
        return runs[name]

    return run


def test_sliding_tile_fsdp_checkpointing_on_two_ranks_matches_one_process(tmp_path, one_process, weights):
    single_dir, single = one_process("sliding", SLIDING)
    two = _train(tmp_path / "two", tmp_path / "two.jsonl", 2, "--init-weights", weights, *SLIDING, *STEPS, *PARALLEL)
    assert [r["step"] for r in two] == [1, 2, 3, 4] and [r["videos"] for r in two] == [r["videos"] for r in single]
    assert _close(single, two), (single, two)
    assert _max_difference(single_dir / "model.safetensors", tmp_path / "two" / "model.safetensors") < 1e-4


def test_topk_tile_under_ulysses_with_selective_checkpointing_matches_one_process(tmp_path, one_process, weights):
    """topk_tile with FSDP and selective activation checkpointing (the blocks keep their attention; FSDP's
    recompute of the rest in the backward finds the block's parameters gathered)."""
    single_dir, single = one_process("topk", TOPK)
    two = _train(tmp_path / "two", tmp_path / "two.jsonl", 2, "--init-weights", weights, *TOPK, *STEPS, *PARALLEL,
                 "selective", "--sp-mode", "ulysses")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and _close(single, two), (single, two)
    assert any(".attn.coarse_gate." in k for k in load_tensors(str(tmp_path / "two" / "model.safetensors")))
    assert _max_difference(single_dir / "model.safetensors", tmp_path / "two" / "model.safetensors") < 1e-4
    # The check has teeth: the attention pattern moves the losses well beyond the tolerance.
    assert not _close(one_process("sliding", SLIDING)[1], single)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path, one_process, weights):
    """Steps 1-2 on 2 sequence-parallel ranks with activation checkpointing, steps 3-4 resumed in one process:
    the resumed steps are the uninterrupted run's. (Without --fsdp: a sharded checkpoint resumes on any number of
    ranks above one, test_cli.test_fsdp_checkpoint_resumes_at_another_world_size, never in one process.)"""
    single_dir, single = one_process("sliding", SLIDING)
    out, log = tmp_path / "run", tmp_path / "log.jsonl"
    first = _train(out, log, 2, "--init-weights", weights, *SLIDING, *STEPS, "--steps", "2",
                   "--sequence-parallel", "2", "--activation-checkpointing")
    assert [r["step"] for r in first] == [1, 2] and _close(single[:2], first)
    resumed = _train(out, log, 1, "--init-weights", weights, *SLIDING, *STEPS)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and _close(single[2:], resumed[2:]), (single, resumed)
    for name in ("model.safetensors", "ema.safetensors"):
        assert _max_difference(single_dir / name, out / name) < 1e-4, name


def _generate(weights, root, world_size, *extra):
    """vdit-generate of one prompt into the folder ``root``: (its stdout, {relative path: bytes} of every file
    written: frames as PNGs, the contact sheet)."""
    args = ["--prompt", "a red circle moves up", "--weights", weights, "--frames", "4", "--size", "16x12",
            "--steps", "2", "--out", str(root / "clip"), *extra]
    root.mkdir()
    launcher = [] if world_size == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
                                           "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    result = subprocess.run([sys.executable, *launcher, "-m", GENERATE, *args], capture_output=True, text=True,
                            env={**os.environ, **CHECKED}, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result.stdout, {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sparse_generation_on_two_ranks_matches_one_process(tmp_path, weights):
    """Token grid 2x4x3 in tiles of 1x2x2 (2x2x2 tiles, the last in w cut short), each seeing its own tile only."""
    sparse = ["--attention", "sliding_tile", "--tile", "1,2,2", "--window", "1,1,1"]
    _, one = _generate(weights, tmp_path / "one", 1, *sparse)
    _, dense = _generate(weights, tmp_path / "dense", 1)
    assert len(one) == 5 and one != dense  # 4 frames and the sheet; sparse attention changes the frames
    for mode in ("ulysses", "ring"):
        stdout, two = _generate(weights, tmp_path / mode, 2, *sparse, "--sp-mode", mode)
        assert f"x 2 ranks ({mode})" in stdout and "attention sliding_tile, tile 1x2x2, window 1x1x1" in stdout
        assert two == one, mode  # 8-bit PNGs: the fp32 videos agree to well within a level here


def test_sparse_generation_with_step_cache_on_two_ranks_matches_one_process(tmp_path, weights):
    """--cache first_block with sliding_tile on 2 ring ranks: the same skipped steps and frames as one process (the
    threshold makes the cache skip some evaluations and compute the rest, on the videos' tile-ordered shards)."""
    sparse = ["--attention", "sliding_tile", "--tile", "1,2,2", "--window", "1,1,1", "--cache", "first_block",
              "--cache-threshold", "1.5", "--steps", "4", "--batch", "2"]
    out_one, one = _generate(weights, tmp_path / "one", 1, *sparse)
    out_two, two = _generate(weights, tmp_path / "two", 2, *sparse, "--sp-mode", "ring")
    summaries = [next(line for line in out.splitlines() if line.startswith("step cache")) for out in (out_one, out_two)]
    assert "skipped 0/" not in summaries[0] and summaries[0].split(",")[0] == summaries[1].split(",")[0], summaries
    assert len(one) == 9 and two == one  # two videos' 4 frames and the contact sheet


def test_selective_checkpointing_option_trains_the_same_steps(tmp_path, weights):
    """One process: --activation-checkpointing selective (and the bare flag, full) take the steps of no
    checkpointing, bit for bit (the same ops, recomputed deterministically)."""
    torch.set_num_threads(1)
    assert train.parse_args(["--out", "x", "--activation-checkpointing"]).activation_checkpointing == "full"
    logs = []
    for flag in ([], ["--activation-checkpointing"], ["--activation-checkpointing", "selective"]):
        log = tmp_path / f"log{len(logs)}.jsonl"
        assert train.main(["--out", str(tmp_path / f"run{len(logs)}"), "--init-weights", weights, *TOPK, *STEPS,
                           "--steps", "2", "--device", "cpu", "--tokens-per-batch", "96", *flag,
                           "--log-file", str(log)]) == 0
        logs.append([json.loads(line)["loss"] for line in log.read_text().splitlines()])
    assert len(logs[0]) == 2 and logs[0] == logs[1] == logs[2], logs
