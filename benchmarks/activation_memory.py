"""Activation memory of a VideoDiT block: the bytes autograd keeps for the backward, per token, measured.

Runs one forward of an ``xl``-width VideoDiT (hidden 1152, 16 heads; ``--depth`` blocks, default 2) on one
video of ``--tokens`` patch tokens, fp32 on the CPU, under ``torch.autograd.graph.saved_tensors_hooks``, and
counts every distinct storage autograd saves (a tensor saved by several ops counts once; the weights, which
linear layers save too, left out), for: no
checkpointing, whole-block checkpointing (``enable_activation_checkpointing()``) and selective checkpointing
that keeps self-attention (``keep_attention=True``). The per-block figure is the difference between depth
``--depth`` and depth 1, divided by the extra blocks, so the embedding and final layer drop out.

    python -m benchmarks.activation_memory --tokens 4096
"""
from __future__ import annotations

import argparse

import torch

from vdit.models import VideoDiT, VideoDiTConfig


def saved_bytes(depth: int, tokens: int, mode: str) -> int:
    """Bytes of the distinct storages saved for the backward by one forward (``mode``: none / full / selective)."""
    torch.manual_seed(0)
    cfg = VideoDiTConfig.preset("xl", depth=depth, context_dim=1152, in_channels=16)
    model = VideoDiT(cfg)
    if mode != "none":
        model.enable_activation_checkpointing(keep_attention=mode == "selective")
    side = int(round((tokens // 4) ** 0.5))
    video = torch.randn(16, 4, 2 * side, 2 * side)  # patch 1x2x2: 4 x side x side tokens
    context = torch.randn(16, 1152)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too, but not activations
    storages: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model([video], torch.tensor([0.5]), context, torch.tensor([0, 16], dtype=torch.int32))
    return sum(storages.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--depth", type=int, default=2)
    args = p.parse_args(argv)
    side = int(round((args.tokens // 4) ** 0.5))
    n = 4 * side * side
    print(f"xl width (1152, 16 heads), fp32, one video of {n} tokens; bytes saved for the backward per block\n")
    print("| checkpointing | per block | per token per block | in hidden-size vectors (4 x 1152 B) |")
    print("|---|---:|---:|---:|")
    for mode in ("none", "full", "selective"):
        block = (saved_bytes(args.depth, args.tokens, mode) - saved_bytes(1, args.tokens, mode)) / (args.depth - 1)
        print(f"| {mode} | {block / 2**20:.1f} MiB | {block / n:.0f} B | {block / n / (4 * 1152):.1f} |")


if __name__ == "__main__":
    main()
