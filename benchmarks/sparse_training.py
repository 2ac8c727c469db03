"""Training from scratch with dense and with top-k tile attention: the same model, data, seed and steps.

``--run`` trains both (``vdit-train``, resumable: rerunning continues them) side by side, one process and one
thread each, so that both see the same machine load; without it, the existing logs are only plotted. The
plot shows the loss (a moving average) against optimizer steps and against the wall-clock seconds the
steps took, and the table the mean loss over the last steps and the total time.

    python -m benchmarks.sparse_training --run --work runs/scratch --out benchmarks/results/cpu-sparse-training
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODEL = ["--hidden-size", "128", "--depth", "4", "--heads", "4", "--patch-size", "1x4x4"]
DATA = ["--sides", "48,64", "--tokens-per-batch", "4096", "--seed", "3", "--warmup", "50", "--save-every", "25"]
RUNS = {"dense": [], "topk_tile": ["--attention", "topk_tile", "--tile", "4,4,4", "--topk", "8"]}


def train_both(work: str, steps: int) -> None:
    """Run (or continue) both trainings to ``steps`` at the same time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for name, extra in RUNS.items():
        out = os.path.join(work, name)
        cmd = [sys.executable, "-m", "vdit.demo.cli.train", "--out", out, "--steps", str(steps), *MODEL, *DATA,
               *extra, "--log-file", out + ".log"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out + ".err", "a")))
    if any(p.wait() for p in procs):
        raise SystemExit(f"a training run failed; see {work}/*.err")


def read_log(path: str) -> list[dict]:
    """The log's lines, the last one per step (a resumed run may repeat the steps after its checkpoint)."""
    by_step = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_and_table(work: str, out: str, width: int = 25) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {name: read_log(os.path.join(work, name + ".log")) for name in RUNS}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = ["| attention | steps | mean loss, last 50 steps | wall-clock seconds | seconds per step |",
             "|---|---|---|---|---|"]
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        loss = moving_average([r["loss"] for r in rows], width)
        seconds, elapsed = [], 0.0
        for r in rows:
            elapsed += r.get("seconds", float("nan"))
            seconds.append(elapsed)
        axes[0].plot(steps, loss, label=name)
        axes[1].plot(seconds, loss, label=name)
        tail = [r["loss"] for r in rows[-50:]]
        lines.append(f"| {name} | {steps[-1]} | {sum(tail) / len(tail):.4f} | {elapsed:.0f} "
                     f"| {elapsed / len(rows):.2f} |")
    for ax, xlabel in zip(axes, ("optimizer step", "wall-clock seconds (2-core CPU, both runs side by side)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"flow-matching loss ({width}-step moving average)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("From scratch, dense vs top-k tile attention (same model, data, seed)")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/scratch")
    p.add_argument("--out", default="benchmarks/results/cpu-sparse-training", help="writes <out>.png and <out>.md")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--run", action="store_true", help="train (or continue) both runs first")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if args.run:
        train_both(args.work, args.steps)
    text = plot_and_table(args.work, args.out)
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write("# From scratch: dense vs top-k tile attention\n\n"
                f"`python -m benchmarks.sparse_training --run --steps {args.steps}`: VideoDiT of width 128, depth 4, "
                "4 heads, 1x4x4 patches on the shapes dataset at 48 and 64 pixels (grids up to 16x16x16 tokens), "
                "4096 tokens per batch, seed 3; top-k: tiles of 4x4x4 tokens, 8 key tiles per query tile and head "
                "plus the gated coarse pass. Both runs trained side by side, one thread each.\n\n"
                f"![loss curves]({os.path.basename(args.out)}.png)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
