"""The GPU checks' logic on CPU (benchmarks/gpu_check.sh, gpu_sparse_check.py, gpu_dense_lse_check.py): timing
statistics, tolerances and comparisons, the sparse cases and the cost model's prediction, the report, the
sparse smoke test on the CPU kernels, and the step selection of gpu_check.sh with a stand-in Python."""
import math
import os
import stat
import subprocess

import pytest
import torch

from vdit.bench import sparse_gpu as S
from vdit.bench.accuracy import installed_kernels, max_error, mismatch, tolerance
from vdit.bench.gpu_timing import cuda_times, percentile, slug, summarize, training_step
from vdit.ops.tiles import sliding_window_tiles, tile_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = S.SmokeCase(grids=((3, 5, 4), (2, 4, 6)), global_tokens=(2, 0), tile=(2, 2, 2), window=(1, 2, 2), topk=2,
                   heads=(2, 1), head_dim=16)


# ---- timing statistics --------------------------------------------------------------------------------

def test_percentile_interpolates_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 10) == pytest.approx(1.3)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 37) == 7.0
    with pytest.raises(ValueError, match="values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile(values, 101)


def test_summarize_gives_median_and_spread_of_all_runs():
    times = [float(t) for t in range(1, 22)]  # 21 runs
    assert summarize(times) == dict(median=11.0, p10=3.0, p90=19.0, runs=21)


def test_cuda_times_refuses_no_runs_before_touching_the_gpu():
    with pytest.raises(ValueError, match="reps must be >= 1"):
        cuda_times(lambda: None, reps=0)


def test_cuda_times_warms_up_then_times_each_run_between_two_events(monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = len(log)

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):
            return float(end.at - self.at)  # the steps between the two events

    monkeypatch.setattr(torch.cuda, "Event", Event)
    times = cuda_times(lambda: log.append("step"), warmup=2, reps=3)
    assert times == [1.0, 1.0, 1.0]  # one step inside each pair of events
    assert log == ["step", "step"] + ["step", "sync"] * 3


def test_slug_names_result_files():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("  ") == "gpu"


def test_training_step_runs_the_backward_only_when_asked():
    x = torch.randn(5, requires_grad=True)
    forward = training_step(lambda: x * 2, (x,), backward=False)()
    assert not forward.requires_grad  # nothing saved for a backward
    out = training_step(lambda: (x * x).sum(0, keepdim=True), (x,), backward=True)()
    assert out.requires_grad and x.grad is None  # gradients computed, not accumulated into .grad


# ---- tolerances and comparisons ----------------------------------------------------------------------------

def test_tolerances_follow_the_test_suite_scaled_per_result():
    assert tolerance(torch.bfloat16, "out") == pytest.approx(3.2e-2)
    assert tolerance(torch.float16, "grad") == pytest.approx(1.6e-2)
    assert tolerance(torch.float16, "lse") == tolerance(torch.bfloat16, "lse") == 1e-3
    with pytest.raises(ValueError, match="what must be"):
        tolerance(torch.float16, "dq")
    with pytest.raises(ValueError, match="dtype must be"):
        tolerance(torch.int32, "out")


def test_mismatch_names_shape_nan_infinity_and_error():
    ref = torch.tensor([[1.0, float("-inf")], [2.0, 3.0]])
    assert mismatch(ref.clone(), ref, 1e-3) is None
    assert mismatch(ref + 1e-4, ref, 1e-3) is None
    assert "shape (2, 2, 1)" in mismatch(ref[..., None], ref, 1e-3)
    assert "NaN" in mismatch(torch.where(ref == 2, float("nan"), ref), ref, 1e-3)
    assert "infinities" in mismatch(ref.nan_to_num(neginf=-1e4), ref, 1e-3)
    assert "infinities" in mismatch(ref.abs(), ref, 1e-3)  # +inf where -inf belongs
    assert "max |err| 0.1" in mismatch(ref + torch.tensor([[0.0, 0.0], [0.0, 0.1]]), ref, 1e-3)
    assert max_error(ref + 0.5, ref) == pytest.approx(0.5)


def test_installed_kernels_asks_the_registry():
    kernels = installed_kernels("sliding_tile_attention", "cpu", torch.float16, 16)
    assert list(kernels) == ["triton", "cpu"]  # the op's declared order
    assert kernels["cpu"] is None and kernels["triton"] is None  # triton: the interpreter (conftest)
    dense = installed_kernels("varlen_attention", "cpu", torch.float16, 16)
    assert "cuda" in dense["flash-attn"] and "cuda" in dense["torch-varlen"]


# ---- the sparse cases --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", S.SPARSITIES)
@pytest.mark.parametrize("tiles", [(8, 12, 20), (5, 6, 10), (6, 8, 13), (4, 4, 7)])
def test_window_for_sparsity_hits_the_visible_fraction(tiles, sparsity):
    window = S.window_for_sparsity(tiles, sparsity)
    assert all(1 <= w <= n for w, n in zip(window, tiles))
    visible = math.prod(window) / math.prod(tiles)
    assert abs(math.log(visible / (1 - sparsity))) <= math.log(1.1)
    # shaped like the grid: no axis is squeezed to far below the others
    fractions = [w / n for w, n in zip(window, tiles)]
    assert max(fractions) / min(fractions) < 3


def test_window_and_topk_extremes():
    assert S.window_for_sparsity((8, 12, 20), 0.0) == (8, 12, 20)
    assert S.window_for_sparsity((1, 1, 2), 0.9) == (1, 1, 1)  # nothing within 10 %: the closest
    assert S.topk_for_sparsity((8, 12, 20), 0.9) == 192
    assert S.topk_for_sparsity((2, 2, 2), 0.99) == 1
    for bad in (S.window_for_sparsity, S.topk_for_sparsity):
        with pytest.raises(ValueError, match="sparsity"):
            bad((8, 8, 8), 1.0)


def test_timing_cases_cover_patterns_sparsities_tiles_and_batches():
    cases = S.timing_cases()
    assert len(cases) == 2 * 2 * 2 * 5
    assert {c.sparsity for c in cases} == set(S.SPARSITIES) and len(S.SPARSITIES) == 5
    assert {c.tile for c in cases} == {(4, 4, 4), (6, 8, 8)}
    assert S.BATCHES["one video"] == ((30, 48, 80),) and len(set(S.BATCHES["four videos"])) == 4
    topk = next(c for c in cases if c.batch == "four videos" and c.pattern == "topk" and c.tile == (4, 4, 4))
    assert topk.largest_tiles == (6, 8, 13) and topk.describe() == f"topk top-{topk.topk}"


# ---- the cost model's prediction ---------------------------------------------------------------------------

def test_issued_area_rounds_each_listed_pair_to_whole_blocks():
    sizes = torch.tensor([64, 16])
    lists = torch.tensor([[[0, 1]], [[1, -1]]])  # tile 0 sees both, tile 1 itself
    assert S.issued_area(sizes, lists, 64, 64) == 64 * 128 + 64 * 64
    assert S.issued_area(sizes, lists, 1, 1) == 64 * 80 + 16 * 16  # the useful area


@pytest.mark.parametrize("tile, loop", [((4, 4, 4), "flat"), ((6, 8, 8), "nested")])
def test_model_of_a_whole_grid_window_is_the_dense_time(tile, loop):
    grids = ((12, 16, 16),)  # divisible by both tiles: every block full
    layout = tile_layout(torch.tensor(grids, dtype=torch.int32), tile)
    lists = sliding_window_tiles(layout, torch.tensor([[99, 99, 99]]))
    figures = S.model_figures(grids, tile, lists, 90, 128, "bf16")
    assert figures["visible"] == pytest.approx(1.0)
    assert figures["ratio"]["fwd"] == pytest.approx(1.0) and figures["ratio"]["fwd+bwd"] == pytest.approx(1.0)
    assert figures["useful_rows"] == 1.0 and figures["loop"] == loop


def test_model_charges_partial_tiles_whole_blocks():
    grids = ((30, 48, 80),)  # 4x4x4: the last time tile holds 2 of 4 frames
    layout = tile_layout(torch.tensor(grids, dtype=torch.int32), (4, 4, 4))
    lists = sliding_window_tiles(layout, torch.tensor([S.window_for_sparsity((8, 12, 20), 0.9)]))
    figures = S.model_figures(grids, (4, 4, 4), lists, 90, 128, "bf16")
    assert figures["useful_rows"] == pytest.approx(0.9375)  # docs/sparse-gpu-cost-model.md
    assert 0.09 < figures["visible"] < 0.11
    assert figures["ratio"]["fwd"] > figures["visible"]  # idle rows of the half tiles cost time


# ---- the report ----------------------------------------------------------------------------------------------

def _summary(ms):
    return dict(median=ms, p10=ms * 0.9, p90=ms * 1.1, runs=20)


def test_report_puts_the_model_beside_each_measured_time():
    rows = [dict(batch="one video", kernel="dense triton", times={"fwd": _summary(10.0), "fwd+bwd": None}),
            dict(batch="one video", tile="4x4x4", kernel="sliding_tile window 4x5x10", sparsity=0.9, visible=0.104,
                 times={"fwd": _summary(1.5), "fwd+bwd": _summary(4.0)}, model={"fwd": 1.2, "fwd+bwd": 4.0},
                 useful_rows=0.9375, loop="flat")]
    text = S.report("NVIDIA H100", "bf16", rows)
    lines = text.splitlines()
    assert lines[0] == "# Block-sparse attention on NVIDIA H100"
    assert "| one video | - | dense triton | 0% | 100.0% | 10.00 ±10% | - | - | - | - | - |" in lines
    assert ("| one video | 4x4x4 | sliding_tile window 4x5x10 | 90% | 10.4% | 1.50 ±10% | 1.20 (1.25x) | 4.00 ±10% "
            "| 4.00 (1.00x) | 93.8% | flat |") in lines
    assert "- tile 4x4x4 fwd: 1.25x over 1 rows" in lines and "- tile 4x4x4 fwd+bwd: 1.00x over 1 rows" in lines
    assert all(line.count("|") == 12 for line in lines if line.startswith("| one video"))


def test_cells_without_a_measurement():
    assert S.time_cell(None) == "-" and S.model_cell(None, None) == "-"
    assert S.model_cell(None, 2.0) == "2.00"  # the model without a measurement


# ---- the smoke test on the CPU kernels -----------------------------------------------------------------------

@pytest.mark.parametrize("pattern", S.PATTERNS)
def test_sparse_smoke_passes_on_the_cpu_kernels(pattern):
    rows = S.check_smoke(pattern, TINY, "cpu", torch.float16)  # every installed kernel: C++ and interpreted Triton
    rows += S.check_smoke(pattern, TINY, "cpu", torch.bfloat16, backends=["cpu"])  # no bf16 dot in the interpreter
    assert [(r[1], r[2]) for r in rows] == [("triton", "float16"), ("cpu", "float16"), ("cpu", "bfloat16")]
    assert all(r[3] is None for r in rows), rows


def test_sparse_smoke_reports_a_wrong_output_and_gradient(monkeypatch):
    real = S.sliding_tile_attention

    def off_by_a_bit(q, k, v, *args, backend, **kwargs):
        out, lse = real(q, k, v, *args, backend=backend, **kwargs)
        return (out if backend == "torch" else out + 0.05 * q), lse

    monkeypatch.setattr(S, "sliding_tile_attention", off_by_a_bit)
    [(_, backend, _, problem)] = S.check_smoke("sliding_tile", TINY, "cpu", torch.float16, backends=["cpu"])
    assert backend == "cpu" and problem.startswith("out max |err|") and "dq max |err|" in problem
    assert "lse" not in problem and "dk " not in problem


def test_sparse_smoke_reports_a_kernel_that_raises(monkeypatch):
    real = S.block_sparse_attention

    def fails_to_launch(*args, backend, **kwargs):
        if backend != "torch":
            raise RuntimeError("out of resources: shared memory")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(S, "block_sparse_attention", fails_to_launch)
    rows = S.check_smoke("topk", TINY, "cpu", torch.float16, backends=["cpu"])
    assert rows == [("topk", "cpu", "float16", "raised RuntimeError: out of resources: shared memory")]


# ---- gpu_check.sh ------------------------------------------------------------------------------------------

def test_gpu_check_runs_the_named_steps_with_the_quarantine_exported(tmp_path):
    """A stand-in python records each call and the quarantine variable; no compute-sanitizer on PATH."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$* | ${{VDIT_KERNEL_QUARANTINE:-unset}}" >> {calls}\necho fake-gpu\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "VDIT_RESULTS": str(tmp_path / "results")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "dense-lse", "sparse-smoke",
                           "sparse-memcheck"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran = [line for line in calls.read_text().splitlines() if line.startswith("benchmarks/")]
    quarantine = f"{tmp_path}/results/fake-gpu-quarantine.json"
    assert ran == [f"benchmarks/gpu_dense_lse_check.py --out {tmp_path}/results --quarantine {quarantine} | unset",
                   f"benchmarks/gpu_sparse_check.py smoke | {quarantine}",
                   f"benchmarks/gpu_sparse_check.py smoke | {quarantine}"]
    assert "| sparse-memcheck | pass (compute-sanitizer not found) |" in proc.stdout
    assert "| build | not run |" in proc.stdout and "| tests | not run |" in proc.stdout
    typo = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "sparse-smok"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "no step 'sparse-smok'" in typo.stderr


# ---- the scripts' wiring on CPU kernels ------------------------------------------------------------------------

def test_sparse_timing_script_writes_the_report(monkeypatch, tmp_path):
    """gpu_sparse_check.py timing end to end on tiny CPU batches: the C++ sparse kernels, dense vdit Triton in
    the interpreter as the model's baseline, each step run once and 'timed' by a stand-in for CUDA events."""
    from benchmarks import gpu_sparse_check as script

    steps = []

    def fake_times(step, warmup, reps):
        steps.append(step())
        return [2.0] * reps  # every kernel takes 2 ms

    monkeypatch.setattr(script, "cuda_times", fake_times)
    monkeypatch.setattr(script, "arch_of", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(script, "DEVICE", "cpu")
    monkeypatch.setattr(script, "SPARSE_BACKEND", "cpu")
    monkeypatch.setattr(script, "DTYPE", torch.float16)
    monkeypatch.setattr(script, "HEADS", 1)
    monkeypatch.setattr(script, "HEAD_DIM", 16)
    monkeypatch.setattr(S, "BATCHES", {"one video": ((4, 8, 8),), "two videos": ((4, 8, 8), (3, 4, 6))})
    monkeypatch.setattr(S, "TILES", ((2, 4, 4),))
    monkeypatch.setattr(S, "SPARSITIES", (0.75,))
    assert script.timing(str(tmp_path), 20) == 0
    assert len(steps) == 2 * (1 + 2) * 2  # batches x (dense triton + two patterns) x modes
    lines = (tmp_path / "fake-gpu-sparse.md").read_text().splitlines()
    assert lines[0] == "# Block-sparse attention on Fake GPU" and lines[2].startswith("fp16, 1 heads, head dim 16")
    assert "| one video | - | dense triton | 0% | 100.0% | 2.00 ±0% | - | 2.00 ±0% | - | - | - |" in lines
    sparse = [line for line in lines if "| 2x4x4 |" in line]
    assert [line.split(" | ")[2] for line in sparse] == ["sliding_tile window 1x1x2", "topk top-2"] * 2
    for line in sparse:  # the model's time beside the measured one: dense 2 ms x issued area / dense area
        assert "2.00 ±0% | " in line and "x) | " in line and line.endswith("| flat |")
    assert any(line.startswith("- tile 2x4x4 fwd: ") for line in lines)
