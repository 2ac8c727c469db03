"""vdit.swap on a diffusers Wan transformer: one forward, original vs swapped, measured in the same run.

Model: WanTransformer3DModel with Wan2.1-T2V-1.3B's published config (width 1536 = 12 heads x 128,
FFN 8960, 16 latent channels, patch (1, 2, 2), text width 4096, 512 text tokens) at reduced depth
(2 of its 30 layers), random weights (nothing is downloaded), fp32 on CPU.
Latent: (1, 16, 3, 30, 52), the VAE latent of a 9-frame 240x416 clip -> 1170 video tokens.

Both rows carry the forward's FLOPs (counted on the original: GEMMs and attention), so the table's
"% of roofline" shows how close the original already runs to the machine's matmul ceiling: the
headroom any kernel swap can win at this shape.

The extra_info "vdit_kernels" records which backend each vdit op ran on in this install and
"calls" which swapped paths ran, so the figures say what was measured.

    pytest benchmarks/bench_swap.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from benchmarks.common import quick  # noqa: E402
from vdit.ops import plan  # noqa: E402
from vdit.swap import swap, unswap  # noqa: E402

LAYERS = 1 if quick() else 2
LATENT = (1, 16, 3, 30, 52)
TEXT = 512


def _kernels() -> str:
    ops = ("patch_embed_3d", "varlen_attention", "rope_3d", "adaln_modulate")
    return ", ".join(f"{name}={plan(name, device='cpu', dtype=torch.float32)[0]}" for name in ops)


@pytest.fixture(scope="module")
def wan():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=LAYERS,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                  rope_max_seq_len=1024).eval()
    inputs = dict(hidden_states=torch.randn(LATENT), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, TEXT, 4096), return_dict=False)
    return model, inputs, forward_flops(model, inputs)


def forward_flops(model, inputs) -> int:
    """FLOPs of one forward, counted by torch's FlopCounterMode, plus the CPU flash-attention op it lacks."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})
    with torch.no_grad(), counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("impl", ["diffusers", "vdit.swap"])
def test_wan_forward(benchmark, wan, impl):
    model, inputs, flops = wan
    benchmark.group = f"Wan2.1-1.3B width, {LAYERS} layers, latent {'x'.join(map(str, LATENT[1:]))}, fp32 forward"
    report = None
    if impl != "diffusers":
        report = swap(model)
    try:
        with torch.no_grad():
            benchmark.pedantic(lambda: model(**inputs), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        if report is not None:
            unswap(model)
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    benchmark.extra_info.update(impl="diffusers (original)" if impl == "diffusers" else "vdit cpu (vdit.swap)",
                                tokens=tokens, flops=flops, vdit_kernels=_kernels(),
                                calls=", ".join(f"{k}={v}" for k, v in sorted(report.calls.items())) if report else "")
