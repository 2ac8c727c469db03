"""CI smoke of the benchmark suite (benchmarks/bench_*.py): every benchmark body runs once
(pytest-benchmark's --benchmark-disable), so the harness, the baselines and the shapes stay correct.
Timing is not checked here."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def test_every_benchmark_runs_once():
    env = {**os.environ, "VDIT_BENCH_QUICK": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks"), "-q", "-x",
                           "-o", "python_files=bench_*.py", "-p", "no:cacheprovider", "--benchmark-disable"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
