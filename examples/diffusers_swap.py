"""Swap vdit kernels into a diffusers video pipeline with one call, then generate.

Nothing is downloaded: the Wan pipeline is built from configs with random weights (a tiny UMT5 text
encoder, a small Wan VAE, a Wan transformer) and a toy tokenizer, so the "video" is noise, but every
step runs exactly as with real weights. With a real checkpoint the same two lines apply:

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    report = vdit.swap.swap(pipe.transformer); print(report)

Run: python examples/diffusers_swap.py [--width 1536 --layers 2 --frames 9 --height 240 --px-width 416]
"""
from __future__ import annotations

import argparse

import torch

from vdit.swap import swap, unswap


class ToyTokenizer:
    """Character-level stand-in for the UMT5 tokenizer (same call signature as the pipeline uses)."""

    def __call__(self, texts, max_length=32, **kwargs):
        ids = [[(ord(c) % 250) + 2 for c in t[:max_length]] for t in texts]
        ids = torch.tensor([row + [0] * (max_length - len(row)) for row in ids])
        return type("Encoding", (), {"input_ids": ids, "attention_mask": (ids > 0).long()})()


def build_pipeline(width: int, layers: int):
    import transformers
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    heads = width // 128
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)).eval()
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()  # Wan's 4x8x8 compression, 16 channels
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                        in_channels=16, out_channels=16, text_dim=64, freq_dim=256,
                                        ffn_dim=width * 35 // 6, num_layers=layers, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).eval()
    return WanPipeline(tokenizer=ToyTokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384, help="transformer width (Wan2.1-1.3B: 1536)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--px-width", type=int, default=192)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = build_pipeline(args.width, args.layers)
    kw = dict(prompt="a red fox running through snow", negative_prompt="blurry", height=args.height,
              width=args.px_width, num_frames=args.frames, num_inference_steps=args.steps, max_sequence_length=32,
              output_type="pt")

    def generate():
        with torch.no_grad():
            return pipe(**kw, generator=torch.Generator().manual_seed(0)).frames

    reference = generate()
    report = swap(pipe.transformer)  # the one call
    frames = generate()
    print(report)  # replacements, skips, and which vdit paths ran (calls)
    print(f"video {tuple(frames.shape)}; max |swapped - original| = {(frames - reference).abs().max():.2e}")
    print("timings: pytest benchmarks/bench_swap.py --benchmark-only")
    unswap(pipe.transformer)


if __name__ == "__main__":
    main()
