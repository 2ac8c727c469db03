"""LoRA fine-tuning of diffusers' Wan on native-size latents: every step one packed batch of mixed shapes.

Nothing is downloaded: a tiny randomly initialised WanTransformer3DModel and a stream of random latents stand
in for a checkpoint and a VAE-encoded dataset. The stream mixes four shapes (``SHAPES``: an image, a short
landscape clip, a portrait clip and a long small clip; weights ``MIX``); each latent is a fixed per-shape
pattern plus noise, so there is something to learn and the loss falls. Per step the planner
(:func:`vdit.swap.plan_batches`) fills a token budget from a pool of drawn videos, and one
:func:`vdit.swap.forward_packed` call computes the flow-matching loss of all of them (no bucketing, no padding).
LoRA layers come from peft (``model.add_adapter(LoraConfig(...))``); only they train.

Writes ``<out>/loss.csv`` (step, loss, videos, tokens per step) and ``<out>/loss.png`` (loss against steps).
With a real checkpoint: ``WanTransformer3DModel.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
subfolder="transformer")`` and latents from its VAE.

Run: python examples/finetune_wan_packed.py [--steps 60 --budget 768 --checkpointing --out runs/finetune_wan_packed]
"""
from __future__ import annotations

import argparse
import csv
import os
import random

import torch

from vdit.swap import forward_packed, plan_batches, swap
from vdit.swap.packed_plan import video_tokens

CHANNELS, TEXT_DIM, PATCH = 16, 32, (1, 2, 2)
SHAPES = [(1, 16, 16), (5, 8, 16), (3, 16, 8), (9, 8, 8)]  # latent (F, H, W): image, landscape, portrait, long
MIX = [0.3, 0.3, 0.2, 0.2]


def build_model(gradient_checkpointing: bool):
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=PATCH, num_attention_heads=4, attention_head_dim=16,
                                  in_channels=CHANNELS, out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=32,
                                  ffn_dim=128, num_layers=2, rope_max_seq_len=64)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    swap(model)
    return model


class LatentStream:
    """Random (latent, text) pairs with the shape mix ``MIX``; latent = the shape's fixed pattern + noise."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.patterns = [torch.randn(CHANNELS, *s, generator=gen) for s in SHAPES]

    def draw(self):
        k = self.rng.choices(range(len(SHAPES)), weights=MIX)[0]
        latent = self.patterns[k] + 0.1 * torch.randn_like(self.patterns[k])
        text = torch.randn(self.rng.randint(3, 12), TEXT_DIM)  # per-sample prompt lengths
        return latent, text


def packed_step(model, videos, texts) -> torch.Tensor:
    """Flow-matching loss of one packed batch: the mean over videos of each video's MSE to the velocity, so
    every video counts the same whatever its size."""
    sigma = torch.rand(len(videos))
    noise = [torch.randn_like(x) for x in videos]
    noisy = [(1 - s) * x + s * n for x, n, s in zip(videos, noise, sigma)]
    pred = forward_packed(model, noisy, sigma * 1000, texts)
    return sum(((p - (n - x)) ** 2).mean() for p, n, x in zip(pred, noise, videos)) / len(videos)


def next_batch(stream: LatentStream, pool: list, budget: int):
    """Top the pool up, plan it under the token budget and take the first planned batch."""
    while len(pool) < 12:
        pool.append(stream.draw())
    plan = plan_batches([x.shape for x, _ in pool], budget, PATCH)
    batch = [pool[i] for i in plan[0]]
    for i in sorted(plan[0], reverse=True):
        pool.pop(i)
    return [x for x, _ in batch], [t for _, t in batch]


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="flow-matching loss", title="LoRA on Wan, packed mixed shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list:
    from tqdm import tqdm
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--budget", type=int, default=768, help="tokens per packed batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing per block")
    parser.add_argument("--out", default="runs/finetune_wan_packed")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    stream, pool, rows = LatentStream(), [], []
    os.makedirs(args.out, exist_ok=True)
    for step in (bar := tqdm(range(args.steps), desc="packed LoRA")):
        videos, texts = next_batch(stream, pool, args.budget)
        loss = packed_step(model, videos, texts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens = sum(video_tokens(x.shape, PATCH) for x in videos)
        rows.append((step, loss.item(), len(videos), tokens))
        bar.set_postfix(loss=f"{loss.item():.3f}", videos=len(videos))
    with open(os.path.join(args.out, "loss.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss", "videos", "tokens"), *rows])
    plot(rows, os.path.join(args.out, "loss.png"))
    print(f"trainable (LoRA) parameters: {sum(p.numel() for p in params)}; "
          f"loss {rows[0][1]:.3f} -> {sum(r[1] for r in rows[-10:]) / 10:.3f} (last 10 mean); wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
