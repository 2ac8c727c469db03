"""Native-size batches through diffusers' Wan: packed (:func:`vdit.swap.forward_packed`) against bucketed
same-shape batches and a per-sample loop, tokens/s of the forward, measured side by side in one run.

A stream of latents mixes four shapes (``SHAPES``, patch 1x2x2); :func:`vdit.swap.plan_batches` packs it into
batches under a token budget. The three ways run the same videos on the same swapped model (same kernels):
(a) packed: one ``forward_packed`` per planned batch; (b) bucketed: one ordinary ``model(...)`` call per shape
with all of that shape's videos (what a bucketing trainer runs, but it also has to wait for a bucket to fill:
the second table gives the share of samples a bucket batch of the packed batch's size would drop or delay);
(c) per-sample loop: ``model(...)`` on each video alone. The three are timed round-robin (``--repeats``
rounds, median), so they see the same machine load.

Configs: the tests' tiny Wan, and Wan2.1-T2V-1.3B's width (dim 1536 = 12 heads x 128, FFN 8960, text_dim 4096)
at 2 of its 30 layers, random weights, fp32, 64 text tokens per prompt (the text projection of 512 tokens
would be the same work in all three ways and only dilute the comparison).

    python -m benchmarks.packed_diffusers --out benchmarks/results/cpu-packed-diffusers.md
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.common import quick
from vdit.swap import forward_packed, plan_batches, swap
from vdit.swap.packed_plan import video_tokens

SHAPES = [(1, 16, 16), (5, 8, 16), (3, 16, 8), (9, 8, 8)]  # latent (F, H, W): image, landscape, portrait, long
MIX = [0.3, 0.3, 0.2, 0.2]
PATCH = (1, 2, 2)


def build(config: str):
    """(model, channels, text_dim) of ``config``: ``tiny`` or ``wan-1.3b`` (2 layers)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    if config == "tiny":
        model = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                      out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        channels, text_dim = 4, 16
    else:
        model = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=12, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        channels, text_dim = 16, 4096
    swap(model.eval())
    return model, channels, text_dim


def stream(count: int, channels: int, text_dim: int, text_len: int, seed: int = 0):
    """``count`` (latent, text) pairs, every shape of ``SHAPES`` at least once, the rest drawn with ``MIX``."""
    rng = random.Random(seed)
    shapes = SHAPES + rng.choices(SHAPES, weights=MIX, k=count - len(SHAPES))
    rng.shuffle(shapes)
    return [(torch.randn(channels, *s), torch.randn(text_len, text_dim)) for s in shapes]


def packed(model, items, plan):
    for batch in plan:
        forward_packed(model, [items[i][0] for i in batch], torch.full((len(batch),), 500.0),
                       [items[i][1] for i in batch])


def bucketed(model, items, plan=None):
    for shape in SHAPES:
        group = [it for it in items if tuple(it[0].shape[1:]) == shape]
        if group:
            model(torch.stack([x for x, _ in group]), torch.full((len(group),), 500.0),
                  torch.stack([t for _, t in group]), return_dict=False)


def loop(model, items, plan=None):
    for x, text in items:
        model(x[None], torch.full((1,), 500.0), text[None], return_dict=False)


WAYS = {"packed (forward_packed)": packed, "bucketed same-shape batches": bucketed, "per-sample loop": loop}


def time_ways(model, items, plan, repeats: int) -> dict[str, float]:
    """Median seconds per way over ``repeats`` round-robin rounds (after one warm-up round)."""
    times = {name: [] for name in WAYS}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, way in WAYS.items():
                start = time.perf_counter()
                way(model, items, plan)
                if round_:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bucket_wait_share(batch_size: int, window_batches: int, samples: int = 4096, seed: int = 1) -> float:
    """Share of a stream (``MIX``) that a bucketing trainer with batch size ``batch_size`` cannot put into a
    full same-shape batch within a window of ``window_batches`` batches: delayed to a later window or dropped."""
    rng = random.Random(seed)
    window = batch_size * window_batches
    left = 0
    for _ in range(0, samples - window + 1, window):
        counts = [0] * len(SHAPES)
        for k in rng.choices(range(len(SHAPES)), weights=MIX, k=window):
            counts[k] += 1
        left += sum(c % batch_size for c in counts)
    return left / (samples - samples % window)


CONFIGS = {"tiny": dict(label="tiny Wan (dim 24, 2 layers)", videos=16, budget=512),
           "wan-1.3b": dict(label="Wan2.1-1.3B width (dim 1536, 12 heads, FFN 8960), 2 layers", videos=12, budget=768)}


def run_config(config: str, repeats: int, text_len: int) -> dict:
    """Timings and the batch layout of one config."""
    spec = CONFIGS[config]
    model, channels, text_dim = build(config)
    items = stream(spec["videos"], channels, text_dim, text_len)
    plan = plan_batches([x.shape for x, _ in items], spec["budget"])
    tokens = sum(video_tokens(x.shape, PATCH) for x, _ in items)
    seconds = time_ways(model, items, plan, repeats)
    return dict(config=config, label=spec["label"], videos=len(items), tokens=tokens, plan=plan, seconds=seconds,
                shapes=len({tuple(x.shape[1:]) for x, _ in items}), budget=spec["budget"])


def table(results: list, repeats: int, text_len: int) -> str:
    lines = ["# Native-size batches through diffusers' Wan: packed vs bucketed vs per-sample (CPU, fp32)", "",
             f"`python -m benchmarks.packed_diffusers`: forward (no grad) of the same mixed-shape videos "
             f"({', '.join('x'.join(map(str, s)) for s in SHAPES)} latents, patch 1x2x2, mix {MIX}, "
             f"{text_len} text tokens each) on the same swapped model, three ways timed round-robin, median of "
             f"{repeats} rounds after a warm-up. Tokens/s counts video tokens. Random weights.", "",
             "| config | videos (shapes) | packed batches (token budget) | way | seconds | video tokens/s | vs loop |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        loop_s = r["seconds"]["per-sample loop"]
        for name, s in r["seconds"].items():
            lines.append(f"| {r['label']} | {r['videos']} ({r['shapes']}) | {len(r['plan'])} ({r['budget']}) | "
                         f"{name} | {s:.3f} | {r['tokens'] / s:,.0f} | {loop_s / s:.2f}x |")
    lines += ["", "Bucketing's hidden cost: the share of samples that cannot join a full same-shape batch of the "
              "packed batches' size within a window of batches (delayed to a later window, or dropped), for a "
              f"stream with this mix of {len(SHAPES)} shapes (4,096 samples simulated):", "",
              "| bucket batch size | window of 1 batch | 4 batches | 16 batches |", "|---|---|---|---|"]
    for size in sorted({round(r["videos"] / len(r["plan"])) for r in results}):
        shares = [bucket_wait_share(size, w) for w in (1, 4, 16)]
        lines.append(f"| {size} | " + " | ".join(f"{s:.0%}" for s in shares) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = list(r["seconds"])
        ax.bar(range(len(names)), [r["tokens"] / r["seconds"][n] for n in names], color=["C0", "C1", "C2"])
        ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
        ax.set(ylabel="video tokens/s (forward)", title=r["label"].split(" (")[0] + f", {r['shapes']} shapes")
    fig.suptitle("Wan on mixed-shape latents, CPU fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1 if quick() else 5)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--out", help="write the markdown table here (and the plot next to it as .png)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = [run_config(c, args.repeats, args.text_len) for c in args.configs]
    text = table(results, args.repeats, args.text_len)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        plot(results, args.out.rsplit(".", 1)[0] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
