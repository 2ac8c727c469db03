"""Generation on shared cores: the demo's sampling time quiet and with busy processes on the same cores.

On a shared machine, other processes take part of every core. Each parallel region then waits for threads
that are descheduled, and an OpenMP runtime that spin-waits burns the time slices its own threads need. This
benchmark times one demo generation (8 frames of 64x64, 10 Euler steps, the shipped weights) in a fresh process
per configuration, quiet and with ``--busy`` background processes busy-looping in Python, for:

- the backend: vdit's kernels (auto) or the pure-PyTorch reference ops (``VDIT_BACKEND=torch``), which run
  the model as many small ATen ops;
- the thread policy: torch's defaults, ``OMP_WAIT_POLICY=passive`` (libgomp reads it when it loads, so it must
  be in the environment before ``import torch``), or one thread.

Each configuration runs once per round, interleaved, after a one-step warm-up generation in the same process;
the table gives the median over rounds and the slowdown busy / quiet.

    python -m benchmarks.contended_generation --busy 2 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

FRAMES, SIZE, STEPS = 8, 64, 10
BACKENDS = {"vdit": None, "torch": "torch"}
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "passive"}, "1 thread": {"VDIT_BENCH_THREADS": "1"}}


def worker() -> dict:
    """Load the demo model, warm up, time one generation; returns seconds and the thread count."""
    import time

    import torch

    if "VDIT_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["VDIT_BENCH_THREADS"]))
    from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo, generate

    model = TextToVideo.load(DEFAULT_WEIGHTS)
    prompt = ["a red circle moves to the right on a black background"]
    generate(model, prompt, frames=FRAMES, height=SIZE, width=SIZE, steps=1, progress=False)
    start = time.perf_counter()
    generate(model, prompt, frames=FRAMES, height=SIZE, width=SIZE, steps=STEPS, progress=False)
    return {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}


def run(backend: str, policy: str) -> dict:
    """One worker process of (backend, policy); its result."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "VDIT_BACKEND")}
    env.update(POLICIES[policy])
    if BACKENDS[backend]:
        env["VDIT_BACKEND"] = BACKENDS[backend]
    out = subprocess.run([sys.executable, "-m", "benchmarks.contended_generation", "--worker"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(configs: list[tuple[str, str]], busy: int, rounds: int) -> dict:
    """{(backend, policy, load): [seconds per round]} with load "quiet" and "busy" interleaved per round."""
    times: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for load in ("quiet", "busy"):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy if load ==
                                                                                               "busy" else 0)]
            try:
                for backend, policy in configs:
                    seconds = run(backend, policy)["seconds"]
                    times.setdefault((backend, policy, load), []).append(seconds)
                    print(f"round {r + 1} {load} {backend} {policy}: {seconds:.2f} s", file=sys.stderr, flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    return times


def table(configs: list[tuple[str, str]], times: dict, busy: int) -> str:
    """Markdown table: per (backend, policy) the median quiet and busy seconds and their ratio."""
    import torch

    lines = [f"Demo generation, {FRAMES} frames {SIZE}x{SIZE}, {STEPS} Euler steps, {os.cpu_count()} cores, "
             f"ISA {torch.backends.cpu.get_cpu_capability()}, {busy} busy-looping processes; median of "
             f"{len(times[(*configs[0], 'quiet')])} rounds (s)", "",
             "| backend | threads | quiet | busy | busy / quiet |", "|---|---|---:|---:|---:|"]
    for backend, policy in configs:
        quiet = statistics.median(times[(backend, policy, "quiet")])
        loaded = statistics.median(times[(backend, policy, "busy")])
        lines.append(f"| {backend} | {policy} | {quiet:.2f} | {loaded:.2f} | {loaded / quiet:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=2, help="busy-looping background processes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backends", default="vdit,torch")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return
    for name, choices in ((args.backends, BACKENDS), (args.policies, POLICIES)):
        for n in name.split(","):
            if n not in choices:
                p.error(f"unknown {n!r}: choose from {', '.join(choices)}")
    configs = [(b, q) for b in args.backends.split(",") for q in args.policies.split(",")]
    print(table(configs, measure(configs, args.busy, args.rounds), args.busy))


if __name__ == "__main__":
    main()
