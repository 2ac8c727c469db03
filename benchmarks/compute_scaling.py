"""Quality against training compute: one demo configuration trained from scratch at C, 4C and 32C steps.

Sora shows one sample at base, 4x and 32x training compute. This study trains the same small configuration of the
demo model (width 192, depth 4, 3 heads, 1024 patch tokens per batch, the shipped model's text and position
modules) three times from scratch, each run with its own schedule (100 warm-up steps, a linear cool-down over its
last fifth), and reports for each:

- the held-out flow-matching loss on a fixed set of (video, noise, t): 64 videos of a dataset seed never trained
  on, each with its own noise and a timestep on the training distribution, the same for every run;
- training FLOPs (forward + backward: 6 x DiT parameters x tokens + 12 x depth x width x sum of squared video
  lengths for attention, counted from the run's own data stream) and a power-law fit of the loss against them;
- colour / motion accuracy on the 36 held-out prompts at 3 seeds (``vdit.demo.evaluation.evaluate``, 48x48);
- one contact sheet of the same prompts and seeds at each budget.

    python -m benchmarks.compute_scaling train --out runs/scale           # resumable: rerun the same command
    python -m benchmarks.compute_scaling report --out runs/scale          # table, plot and sheet
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from vdit.demo.data import ShapesDataset
from vdit.demo.evaluation import evaluate, held_out_prompts
from vdit.demo.pipeline import TextToVideo, generate
from vdit.demo.video_io import contact_sheet
from vdit.sampling import time_shift
from vdit.training import flow_matching_loss

BUDGETS = (500, 2000, 16000)  # C, 4C, 32C optimizer steps
TOKENS_PER_BATCH = 1024
SHIFT = 8.0
TRAIN_ARGS = ["--hidden-size", "192", "--depth", "4", "--heads", "3", "--patch-size", "1x8x8",
              "--tokens-per-batch", str(TOKENS_PER_BATCH), "--warmup", "100", "--save-every", "250", "--seed", "0",
              "--fractional-positions", "--prompt-velocity", "--text-embedding-skip",
              "--timestep-shift", str(SHIFT), "--timestep-sampling", "uniform"]
HELD_OUT_SEED, HELD_OUT_VIDEOS = 1_000_003, 64
SHEET_PROMPTS = 4
RESULTS = "benchmarks/results/cpu-compute-scaling"


def train_command(out: str, steps: int) -> list[str]:
    """The vdit-train arguments of the run with ``steps`` optimizer steps under ``out``."""
    return ["--out", os.path.join(out, f"scale-{steps}"), "--steps", str(steps), "--decay-steps", str(steps // 5),
            *TRAIN_ARGS]


def train(out: str) -> None:
    """Train (or resume) the three runs one after the other."""
    from vdit.demo.cli.train import main as train_main

    for steps in BUDGETS:
        code = train_main(train_command(out, steps))
        if code:
            raise SystemExit(code)


def held_out_loss(model: TextToVideo) -> float:
    """Mean flow-matching loss over the fixed held-out (video, noise, t) set (the same for every model)."""
    dataset = ShapesDataset(seed=HELD_OUT_SEED)
    total = elements = 0.0
    with torch.no_grad():
        for i in range(HELD_OUT_VIDEOS):
            video, caption, _ = dataset[i]
            g = torch.Generator().manual_seed(i)
            t = time_shift(torch.tensor([(i + 0.5) / HELD_OUT_VIDEOS]), SHIFT)
            noise = [torch.randn(video.shape, generator=g)]
            context, cu = model.encode([caption])
            loss = flow_matching_loss(model.dit, [video], context, cu, t=t, noise=noise)
            total += float(loss) * video.numel()
            elements += video.numel()
    return total / elements


def training_flops(steps: int, params: int, depth: int, width: int, patch=(1, 8, 8)) -> float:
    """Forward + backward FLOPs of the first ``steps`` batches of the training stream (seed 0)."""
    dataset = ShapesDataset(seed=0)
    index, flops = 0, 0.0
    for _ in range(steps):
        tokens, squares, count = 0, 0, 0
        while True:
            spec, _ = dataset.spec(index)
            n = (spec.frames // patch[0]) * (spec.height // patch[1]) * (spec.width // patch[2])
            if count and tokens + n > TOKENS_PER_BATCH:
                break
            tokens, squares, count, index = tokens + n, squares + n * n, count + 1, index + 1
        flops += 6 * params * tokens + 12 * depth * width * squares
    return flops


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares fit log y = log a + b log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return math.exp(my - b * mx), b


def finished(out: str, steps: int) -> bool:
    """Whether the run of ``steps`` steps under ``out`` has saved its last step."""
    path = os.path.join(out, f"scale-{steps}", "state.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f)["step"] >= steps


def measure(out: str, steps: int, seeds) -> dict:
    """Loss, FLOPs and accuracy of the run with ``steps`` steps (its final, non-EMA weights)."""
    run = os.path.join(out, f"scale-{steps}")
    model = TextToVideo.load(os.path.join(run, "model.safetensors"))
    cfg = model.dit.config
    params = sum(p.numel() for p in model.dit.parameters())
    row = {"steps": steps, "params": params, "loss": held_out_loss(model),
           "flops": training_flops(steps, params, cfg.depth, cfg.hidden_size)}
    results = [evaluate(model, held_out_prompts(36, s), size=(48, 48), seed=s, progress=False) for s in seeds]
    for key in ("colour_accuracy", "motion_accuracy", "object_in_every_frame"):
        row[key] = sum(r[key] for r in results) / len(results)
    return row


def sheet(out: str, path: str) -> None:
    """The same held-out prompts and seeds (16x48x48) at each budget, one row per (prompt, budget)."""
    prompts = [p for p, *_ in held_out_prompts(SHEET_PROMPTS, 0)]
    models = {steps: TextToVideo.load(os.path.join(out, f"scale-{steps}", "model.safetensors")) for steps in BUDGETS}
    videos, labels = [], []
    for i, prompt in enumerate(prompts):
        for steps, model in models.items():
            video, = generate(model, [prompt], frames=16, height=48, width=48, seed=i, progress=False)
            videos.append(video)
            labels.append(f"{steps // BUDGETS[0]}C ({steps} steps): {prompt}")
    contact_sheet(videos, path, labels=labels, upscale=2)


def report(rows: list[dict], path: str) -> None:
    """Markdown table and the loss-against-FLOPs plot of ``rows``."""
    a, b = power_law([r["flops"] for r in rows], [r["loss"] for r in rows])
    lines = ["# Quality against training compute (demo configuration, CPU)\n",
             f"Width 192, depth 4, {rows[0]['params'] / 1e6:.2f}M DiT parameters, {TOKENS_PER_BATCH} patch tokens per "
             "batch; each budget trained from scratch with its own schedule. Generated by "
             "`benchmarks/compute_scaling.py`.\n",
             "| budget | steps | training FLOPs | held-out loss | colour acc. | motion acc. | object in every frame |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps'] // rows[0]['steps']}C | {r['steps']} | {r['flops']:.3g} | {r['loss']:.4f} | "
                     f"{r['colour_accuracy']:.0%} | {r['motion_accuracy']:.0%} | {r['object_in_every_frame']:.0%} |")
    lines.append(f"\nPower-law fit: held-out loss = {a:.3g} x FLOPs^{b:.4f}.\n")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, (a, b), path + ".png")


def plot(rows: list[dict], fit: tuple[float, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["flops"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(xs, [r["loss"] for r in rows], "o", label="held-out flow-matching loss")
    grid = [xs[0] * (xs[-1] / xs[0]) ** (i / 20) for i in range(21)]
    ax.loglog(grid, [fit[0] * x ** fit[1] for x in grid], "--", label=f"fit: exponent {fit[1]:.3f}")
    for r in rows:
        ax.annotate(f"{r['steps'] // rows[0]['steps']}C", (r["flops"], r["loss"]))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("train", "report"))
    p.add_argument("--out", default="runs/scale", help="directory of the three runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--results", default=RESULTS, help="path stem of the table (.md), plot (.png) and sheet")
    args = p.parse_args(argv)
    if args.action == "train":
        train(args.out)
        return
    rows_path = args.results + ".json"
    measured = {}
    if os.path.exists(rows_path):  # a budget measured once is not measured again (its run is final)
        with open(rows_path) as f:
            measured = {r["steps"]: r for r in json.load(f)}
    for steps in BUDGETS:
        if steps not in measured and finished(args.out, steps):
            measured[steps] = measure(args.out, steps, args.seeds)
            with open(rows_path, "w") as f:
                json.dump([measured[s] for s in BUDGETS if s in measured], f, indent=1)
    rows = [measured[s] for s in BUDGETS if s in measured]
    if len(rows) < 2:
        raise SystemExit(f"{len(rows)} of {len(BUDGETS)} budgets trained to the end: a fit needs two")
    report(rows, args.results)
    if len(rows) == len(BUDGETS):
        sheet(args.out, args.results + "-sheet.png")


if __name__ == "__main__":
    main()
