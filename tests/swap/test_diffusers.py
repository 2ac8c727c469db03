"""vdit.swap on diffusers' video transformers (vdit/swap/diffusers.py; tiny random configs, CPU,
fp32): swapped outputs equal the originals for several input sizes with and without text padding,
unswap is bit-identical, the report lists the expected replacements, and the vdit paths actually ran
(report.calls); one row of the adapter table is what supports a model class."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from vdit.swap import swap, unswap  # noqa: E402

B = 2


def _text_mask(S, pad):
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[1, S // 2:] = 0
    return mask


def wan(size, pad):
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    T, H, W = size
    text = torch.randn(B, 7, 16)
    if pad:  # Wan's pipeline zero-pads prompt embeddings and passes no mask
        text[1, 3:] = 0
    inputs = dict(hidden_states=torch.randn(B, 4, T, H, W), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=text)
    expected = {"patch_embed": ["patch_embedding"], "rope": ["blocks.0.attn1", "blocks.1.attn1"],
                "norm": ["blocks.0", "blocks.1"], "attention": [""]}
    return model, inputs, expected, {"rope": 2}


def cogvideox(size, pad):
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8, use_rotary_positional_embeddings=True)
    T, H, W = size
    cos, sin = get_3d_rotary_pos_embed(16, crops_coords=((0, 0), (H // 2, W // 2)), grid_size=(H // 2, W // 2),
                                       temporal_size=T, device="cpu")
    text = torch.randn(B, 8, 16)
    if pad:
        text[1, 4:] = 0
    inputs = dict(hidden_states=torch.randn(B, T, 4, H, W), encoder_hidden_states=text, timestep=torch.tensor([3, 700]),
                  image_rotary_emb=(cos, sin))
    expected = {"patch_embed": ["patch_embed.proj"], "rope": [""], "attention": [""],
                "norm": [f"transformer_blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)]}
    return model, inputs, expected, {"rope": 4}  # q and k in 2 layers


def hunyuan(size, pad):
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(2, 4, 4))
    T, H, W = size
    inputs = dict(hidden_states=torch.randn(B, 4, T, H, W), timestep=torch.tensor([3, 700]),
                  encoder_hidden_states=torch.randn(B, 7, 16), pooled_projections=torch.randn(B, 8),
                  encoder_attention_mask=_text_mask(7, pad), guidance=torch.tensor([3000.0, 3000.0]))
    expected = {"patch_embed": ["x_embedder.proj"], "rope": [""], "attention": [""],
                "norm": ["transformer_blocks.0.norm1", "transformer_blocks.0.norm1_context",
                         "single_transformer_blocks.0.norm"]}
    return model, inputs, expected, {"rope": 4, "attention.varlen": 2 if pad else 0}


def ltx(size, pad):
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       num_layers=2, caption_channels=16)
    T, H, W = size
    inputs = dict(hidden_states=torch.randn(B, T * H * W, 8), encoder_hidden_states=torch.randn(B, 7, 16),
                  timestep=torch.tensor([3, 700]), encoder_attention_mask=_text_mask(7, pad), num_frames=T, height=H,
                  width=W)
    expected = {"attention": [""]}
    return model, inputs, expected, {"attention.varlen": 2 if pad else 0}


MODELS = {"wan": (wan, [(3, 8, 6), (1, 4, 10)]), "cogvideox": (cogvideox, [(3, 8, 6), (2, 4, 8)]),
          "hunyuan": (hunyuan, [(3, 8, 6), (2, 4, 2)]), "ltx": (ltx, [(2, 4, 4), (3, 2, 5)])}
CASES = [pytest.param(name, size, pad, id=f"{name}-{'x'.join(map(str, size))}-{'pad' if pad else 'nopad'}")
         for name, (_, sizes) in MODELS.items() for size in sizes for pad in (True, False)]


@pytest.mark.parametrize("name,size,pad", CASES)
def test_swapped_equals_original(name, size, pad):
    model, inputs, expected, calls = MODELS[name][0](size, pad)
    model.eval()
    state = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        report = swap(model, attention="all")
        for kind, paths in expected.items():
            assert sorted(report.paths(kind)) == sorted(paths), (kind, str(report))
        assert {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()} == state
        out = model(**inputs, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        for key, count in calls.items():
            assert report.calls[key] == count, (key, dict(report.calls))
        assert not [k for k in report.calls if k.startswith("rope.fallback")], dict(report.calls)
        assert report.calls["attention.dense"] + report.calls["attention.varlen"] > 0
        unswap(model)
        assert torch.equal(model(**inputs, return_dict=False)[0], ref)


def test_default_attention_takes_masked_calls_only():
    model, inputs, _, _ = hunyuan((2, 4, 4), True)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        report = swap(model)
        out = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert report.calls["attention.varlen"] == 2 and report.calls["attention.dense"] == 0
    unswap(model)
    from vdit.swap.attention import vdit_attention_kernel
    model, inputs, _, _ = hunyuan((2, 4, 4), False)  # all-valid masks: dense calls
    model.eval()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        report = swap(model, attention="auto")
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], ref, rtol=2e-5, atol=2e-5)
    assert (report.calls["attention.dense"] > 0) == (vdit_attention_kernel("cpu") != "torch")
    unswap(model)


def test_skipped_parts_are_reported():
    model, *_ = ltx((2, 2, 2), False)
    report = swap(model)
    reasons = {s.kind: s.reason for s in report.skipped}
    assert "frequency schedule" in reasons["rope"] and "nn.Linear" in reasons["patch_embed"]
    unswap(model)


def test_apply_rotary_emb_restored_outside_forward():
    from diffusers.models import embeddings
    original = embeddings.apply_rotary_emb
    model, inputs, _, _ = cogvideox((2, 4, 4), False)
    swap(model)
    assert embeddings.apply_rotary_emb is original
    with torch.no_grad():
        model(**inputs)
    assert embeddings.apply_rotary_emb is original
    unswap(model)


def test_pipeline_still_runs():
    """A Wan pipeline with a swapped transformer generates (tiny random components, 2 steps)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    transformers = pytest.importorskip("transformers")
    text_cfg = transformers.UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8)
    text_encoder = transformers.UMT5EncoderModel(text_cfg).eval()

    class Tokenizer:  # no tokenizer files can be downloaded: a toy one with the call signature the pipeline uses
        def __call__(self, texts, max_length=8, **kw):
            ids = torch.tensor([[(ord(c) % 60) + 2 for c in t[:max_length]] + [0] * (max_length - len(t[:max_length]))
                                for t in texts])
            return type("Enc", (), {"input_ids": ids, "attention_mask": (ids > 0).long()})()

    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=Tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    kw = dict(prompt="a cat", negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=2,
              max_sequence_length=8, output_type="pt", generator=torch.Generator().manual_seed(0))
    ref = pipe(**kw).frames
    report = swap(pipe.transformer)
    kw["generator"] = torch.Generator().manual_seed(0)
    out = pipe(**kw).frames
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert report.calls["rope"] > 0
    unswap(pipe.transformer)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_within_bf16_tolerance(name):
    model, inputs, _, _ = MODELS[name][0]((3, 8, 6) if name != "ltx" else (2, 4, 4), True)
    model = model.to(torch.bfloat16).eval()
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0].float()
        report = swap(model, attention="all")
        out = model(**inputs, return_dict=False)[0].float()
        unswap(model)
    assert report.calls["rope"] + report.calls["attention.varlen"] + report.calls["attention.dense"] > 0
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_a_model_class_is_supported_by_one_adapter_row(monkeypatch):
    from vdit.swap.diffusers import ADAPTERS
    assert [n for n, a in ADAPTERS.items() if a.sparse_sites] == ["WanTransformer3DModel",
                                                                  "HunyuanVideoTransformer3DModel"]
    assert [n for n, a in ADAPTERS.items() if a.skip_padded_queries] == ["HunyuanVideoTransformer3DModel"]
    model, inputs, expected, _ = wan((3, 8, 6), False)
    model.__class__ = type("MyWan", (WanTransformer3DModel,), {})  # a class the table does not name
    report = swap(model)
    assert any(s.kind == "model" and "MyWan has no model-specific" in s.reason for s in report.skipped)
    assert not report.paths("rope") and not report.paths("norm")
    unswap(model)
    monkeypatch.setitem(ADAPTERS, "MyWan", ADAPTERS["WanTransformer3DModel"])
    report = swap(model)
    assert sorted(report.paths("rope")) == expected["rope"] and sorted(report.paths("norm")) == expected["norm"]
    with torch.no_grad():
        model(**inputs)
    assert report.calls["rope"] == 2
    unswap(model)
