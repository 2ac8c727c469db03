"""Block-sparse attention swapped into diffusers' Wan and HunyuanVideo: forward time against the original
forward in the same run, and the output's relative L2 distance from it (random weights have no quality to
judge; the distance says how much the sparsity changes what the model computes).

Cases:
    tiny random configs (the swap tests' models) on a 5x16x12-token grid;
    Wan2.1-T2V-1.3B's published width (1536 = 12 heads x 128, FFN 8960, text 4096 x 512 tokens) at 2 of its
    30 layers, random weights, fp32, on a 21x30x52-token grid (32,760 tokens: an 81-frame 480x832 clip).
Each case times the original forward and the swapped one alternately (``--repeats`` each, median), so
both see the same machine load.

    python -m benchmarks.swap_sparse --out benchmarks/results/cpu-swap-sparse.md
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from vdit.ops import SparsePattern
from vdit.ops.tiles import tile_layout
from vdit.swap import swap, unswap


def tiny_wan(grid):
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    T, H, W = grid
    return model, dict(hidden_states=torch.randn(1, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 7, 16))


def tiny_hunyuan(grid):
    from diffusers import HunyuanVideoTransformer3DModel
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(2, 4, 4))
    T, H, W = grid
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return model, dict(hidden_states=torch.randn(1, 4, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 7, 16), pooled_projections=torch.randn(1, 8),
                       encoder_attention_mask=mask, guidance=torch.tensor([3000.0]))


def wan_1_3b(grid, layers=2):
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                  rope_max_seq_len=1024)
    T, H, W = grid
    return model, dict(hidden_states=torch.randn(1, 16, T, 2 * H, 2 * W), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 512, 4096))


# name -> (builder, token grid, sparse pattern)
CASES = {
    "tiny Wan, sliding_tile": (tiny_wan, (5, 16, 12), SparsePattern("sliding_tile", (1, 4, 4), window=(3, 3, 3))),
    "tiny Wan, topk_tile": (tiny_wan, (5, 16, 12), SparsePattern("topk_tile", (1, 4, 4), topk=8)),
    "tiny HunyuanVideo, sliding_tile": (tiny_hunyuan, (5, 16, 12),
                                        SparsePattern("sliding_tile", (1, 4, 4), window=(3, 3, 3))),
    "Wan2.1-1.3B width, 2 layers, sliding_tile": (wan_1_3b, (21, 30, 52),
                                                  SparsePattern("sliding_tile", (3, 6, 4), window=(3, 3, 5))),
}


def visible_share(grid, pattern: SparsePattern) -> float:
    """The share of (query, key) pairs the pattern computes on one video of ``grid`` tokens."""
    grids = torch.tensor([grid], dtype=torch.int32)
    if pattern.mode == "topk_tile":
        return min(1.0, pattern.topk * math.prod(pattern.tile) / math.prod(grid))
    layout = tile_layout(grids, pattern.tile)
    sizes = (layout.offsets[1:] - layout.offsets[:-1]).long()
    lists = pattern.window_tiles(grids).long()[:, 0]
    visible = torch.where(lists >= 0, sizes[lists.clamp_min(0)], 0).sum(1)
    return float((sizes * visible).sum()) / float(sizes.sum()) ** 2


def run_case(name: str, repeats: int) -> str:
    build, grid, pattern = CASES[name]
    torch.manual_seed(0)
    model, inputs = build(grid)
    model.eval()
    times = {"original": [], "swapped": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(repeats):
            for which in ("original", "swapped"):
                report = swap(model, patch_embed=False, rope=False, norm=False, sparse=pattern) if which == "swapped" \
                    else None
                start = time.perf_counter()
                outputs[which] = model(**inputs, return_dict=False)[0]
                times[which].append(time.perf_counter() - start)
                if report is not None:
                    calls = report.calls["attention.sparse"]
                    unswap(model)
    error = float((outputs["swapped"] - outputs["original"]).norm() / outputs["original"].norm())
    original, swapped = statistics.median(times["original"]), statistics.median(times["swapped"])
    share = visible_share(grid, pattern)
    detail = pattern.describe().split(", ", 1)[1]
    return (f"| {name} | {'x'.join(map(str, grid))} | {detail} | {share:.0%} | {calls} | {original:.3f} | "
            f"{swapped:.3f} | {original / swapped:.2f}x | {error:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lines = ["| model | token grid | sparse attention | attended key share | sparse calls | original s | "
             "swapped s | speed-up | relative L2 vs original |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.only:
        lines.append(run_case(name, 1 if "1.3B" in name else args.repeats))
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# vdit.swap with block-sparse attention (CPU, fp32, random weights)\n\n"
                    "`python -m benchmarks.swap_sparse`: original diffusers forward against the same model swapped "
                    "with `attention=\"sliding_tile\"` / `\"topk_tile\"` (only the attention routed: patch embedding, "
                    "RoPE and norms left to diffusers, so the ratio is the attention's), timed alternately in one "
                    "process (median of 3; the 1.3B-width case once each). The relative L2 distance is between the two "
                    "outputs: random weights have no quality to judge.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
