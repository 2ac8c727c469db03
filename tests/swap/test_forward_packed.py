"""vdit.swap.forward_packed (vdit/swap/packed.py): latents of different (F, H, W) in one packed forward of a
swapped diffusers Wan / HunyuanVideo (tiny random configs, CPU, fp32) equal the per-sample calls, outputs and
parameter gradients (with gradient checkpointing too); block-sparse with a whole-grid window equals dense;
LoRA adapters train through it; bad input raises one line naming the argument and changes nothing."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

import vdit  # noqa: E402
from vdit.swap import forward_packed, swap, unswap  # noqa: E402

SIZES = [(3, 8, 6), (1, 4, 10), (2, 6, 4)]  # (F, H, W), a 1-frame latent among them
TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_wan(layers=2):
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_inputs(padded: bool, sizes=SIZES):
    """Latents, timesteps, the text as the packed call takes it and each sample's text for the per-sample call.
    Padded: one (B, 7, 16) tensor, zero-padded as Wan's pipeline pads prompts; else per-sample lengths."""
    torch.manual_seed(1)
    latents = [torch.randn(4, *s) for s in sizes]
    timestep = torch.tensor([10.0, 500.0, 900.0, 250.0][:len(sizes)])
    if padded:
        text = torch.randn(len(sizes), 7, 16)
        text[1, 3:] = 0
        return latents, timestep, text, list(text)
    texts = [torch.randn(n, 16) for n in (7, 3, 5, 2)[:len(sizes)]]
    return latents, timestep, texts, texts


def wan_alone(model, latents, timestep, texts):
    return [model(x[None], timestep[i:i + 1], texts[i][None], return_dict=False)[0][0] for i, x in enumerate(latents)]


def _weighted_loss(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def _grads(model, outputs, weights):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(_weighted_loss(outputs, weights), params, allow_unused=True)


def assert_grads_close(packed, alone):
    for g, r in zip(packed, alone):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, **GRAD_TOL)


@pytest.mark.parametrize("padded", [True, False], ids=["padded-text", "per-sample-text"])
def test_wan_outputs_equal_per_sample(padded):
    model = tiny_wan().eval()
    latents, timestep, text, texts = wan_inputs(padded)
    with torch.no_grad():
        expected = wan_alone(model, latents, timestep, texts)
        swap(model)
        out = forward_packed(model, latents, timestep, text)
    assert [o.shape for o in out] == [e.shape for e in expected]
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **TOL)
    unswap(model)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_wan_gradients_equal_per_sample(checkpointing):
    model = tiny_wan()
    latents, timestep, text, texts = wan_inputs(False)
    weights = [torch.randn(4, *s) for s in SIZES]
    alone = _grads(model, wan_alone(model, latents, timestep, texts), weights)
    swap(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
        seen = []
        model._gradient_checkpointing_func = _counting(model._gradient_checkpointing_func, seen)
    packed = _grads(model, forward_packed(model, latents, timestep, text), weights)
    assert_grads_close(packed, alone)
    if checkpointing:
        assert len(seen) == len(model.blocks)
    unswap(model)


def _counting(func, seen):
    def checkpointed(fn, *args):
        seen.append(fn)
        return func(fn, *args)
    return checkpointed



def tiny_hunyuan():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 4, 4))


def hunyuan_inputs(padded: bool):
    """Latents, timesteps, text (B, 7, 16), model kwargs; padded: two samples' masks end early."""
    torch.manual_seed(1)
    latents = [torch.randn(4, *s) for s in SIZES]
    mask = torch.ones(3, 7, dtype=torch.long)
    if padded:
        mask[1, 3:] = 0
        mask[2, 5:] = 0
    kwargs = dict(pooled_projections=torch.randn(3, 8), encoder_attention_mask=mask,
                  guidance=torch.tensor([3000.0, 3000.0, 3000.0]))
    return latents, torch.tensor([10.0, 500.0, 900.0]), torch.randn(3, 7, 16), kwargs


def hunyuan_alone(model, latents, timestep, text, kwargs):
    return [model(x[None], timestep[i:i + 1], text[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()},
                  return_dict=False)[0][0] for i, x in enumerate(latents)]


@pytest.mark.parametrize("padded", [True, False], ids=["padded-text", "unpadded-text"])
def test_hunyuan_outputs_equal_per_sample(padded):
    model = tiny_hunyuan().eval()
    latents, timestep, text, kwargs = hunyuan_inputs(padded)
    with torch.no_grad():
        expected = hunyuan_alone(model, latents, timestep, text, kwargs)
        swap(model)
        out = forward_packed(model, latents, timestep, text, **kwargs)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **TOL)
    unswap(model)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_hunyuan_gradients_equal_per_sample(checkpointing):
    model = tiny_hunyuan()
    latents, timestep, text, kwargs = hunyuan_inputs(True)
    weights = [torch.randn(4, *s) for s in SIZES]
    alone = _grads(model, hunyuan_alone(model, latents, timestep, text, kwargs), weights)
    swap(model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    packed = _grads(model, forward_packed(model, latents, timestep, text, **kwargs), weights)
    assert_grads_close(packed, alone)
    unswap(model)


def test_hunyuan_text_padding_must_be_a_tail():
    model = tiny_hunyuan()
    swap(model)
    latents, timestep, text, kwargs = hunyuan_inputs(False)
    kwargs["encoder_attention_mask"][0, 2] = 0
    with pytest.raises(ValueError, match="encoder_attention_mask\\[0\\] must keep a prefix"):
        forward_packed(model, latents, timestep, text, **kwargs)
    with pytest.raises(ValueError, match="pooled_projections must be \\(3, P\\)"):
        forward_packed(model, latents, timestep, text, **{**kwargs, "pooled_projections": torch.randn(2, 8)})
    unswap(model)


PATTERNS = {"whole-grid": dict(mode="sliding_tile", window=(9, 9, 9)),
            "sliding": dict(mode="sliding_tile", window=(1, 2, 1)), "topk": dict(mode="topk_tile", topk=2)}


def _pattern(name):
    options = dict(PATTERNS[name])
    return vdit.SparsePattern(options.pop("mode"), (1, 2, 2), **options)


def _model_and_calls(name):
    """(model, packed call, per-sample call) of the tiny model ``name`` with padded text."""
    if name == "wan":
        latents, timestep, text, texts = wan_inputs(True)
        return (tiny_wan().eval(), lambda m: forward_packed(m, latents, timestep, text),
                lambda m: wan_alone(m, latents, timestep, texts))
    latents, timestep, text, kwargs = hunyuan_inputs(True)
    return (tiny_hunyuan().eval(), lambda m: forward_packed(m, latents, timestep, text, **kwargs),
            lambda m: hunyuan_alone(m, latents, timestep, text, kwargs))


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_sparse_packed_equals_sparse_per_sample(name, pattern):
    model, packed_call, alone_call = _model_and_calls(name)
    with torch.no_grad():
        dense = alone_call(model)
        swap(model, sparse=_pattern(pattern))
        alone, out = alone_call(model), packed_call(model)
    for o, a, d in zip(out, alone, dense):
        torch.testing.assert_close(o, a, **TOL)
        if pattern == "whole-grid":  # a window covering every tile is dense attention
            torch.testing.assert_close(o, d, **TOL)
        else:
            assert not torch.allclose(o, d, **TOL)
    unswap(model)


def test_sparse_gradients_equal_per_sample():
    model = tiny_wan()
    latents, timestep, text, texts = wan_inputs(False)
    weights = [torch.randn(4, *s) for s in SIZES]
    swap(model, sparse=_pattern("sliding"))
    alone = _grads(model, wan_alone(model, latents, timestep, texts), weights)
    packed = _grads(model, forward_packed(model, latents, timestep, text), weights)
    assert_grads_close(packed, alone)
    unswap(model)

def _bad_inputs():
    latents, timestep, text, _ = wan_inputs(False)
    yield "latents\\[1\\] has 3 channels", dict(latents=[latents[0], torch.randn(3, 1, 4, 4)], timestep=timestep[:2],
                                                encoder_hidden_states=text[:2])
    yield "latents\\[1\\] size .* not divisible", dict(latents=[latents[0], torch.randn(4, 1, 5, 4)],
                                                       timestep=timestep[:2], encoder_hidden_states=text[:2])
    yield "timestep must have one entry per latent", dict(latents=latents, timestep=timestep[:2],
                                                          encoder_hidden_states=text)
    yield "encoder_hidden_states: 2 text tensors for 3 latents", dict(latents=latents, timestep=timestep,
                                                                      encoder_hidden_states=text[:2])


@pytest.mark.parametrize("match,inputs", list(_bad_inputs()), ids=["channels", "patch", "timestep", "text"])
def test_bad_input_names_the_argument_and_changes_nothing(match, inputs):
    model = tiny_wan()
    swap(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = [x.clone() for x in inputs["latents"]]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        forward_packed(model, **inputs)
    assert "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(inputs["latents"], copies))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    unswap(model)


def test_unswapped_or_unknown_model_is_refused():
    model = tiny_wan()
    latents, timestep, text, _ = wan_inputs(False)
    with pytest.raises(ValueError, match="not swapped; call vdit.swap\\(model\\)"):
        forward_packed(model, latents, timestep, text)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model class Linear has no packed forward"):
        vdit.swap.forward_packed(other, latents, timestep, text)


def test_sample_packed_with_cfg_equals_per_sample_loop():
    from vdit.swap import flow_sigmas, sample_packed
    model = tiny_wan().eval()
    latents, _, text, texts = wan_inputs(False)
    negative = [torch.zeros(2, 16) for _ in latents]
    sigmas, scale = flow_sigmas(2, shift=3.0), 4.0
    expected = []
    with torch.no_grad():  # the per-sample loop: two model calls (conditional, unconditional) per latent and step
        for x, cond, uncond in zip(latents, texts, negative):
            x = x.clone()
            for k in range(2):
                t = torch.full((1,), float(sigmas[k]) * 1000)
                c, u = (model(x[None], t, e[None], return_dict=False)[0][0] for e in (cond, uncond))
                x = x + float(sigmas[k + 1] - sigmas[k]) * (u + scale * (c - u))
            expected.append(x)
    swap(model)
    out = sample_packed(model, latents, text, steps=2, shift=3.0, guidance_scale=scale,
                        negative_encoder_hidden_states=negative)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **TOL)
    unswap(model)


def test_plan_batches_respects_budget_and_balances_attention():
    from vdit.swap import plan_batches
    from vdit.swap.packed_plan import batch_work
    sizes = [(5, 16, 16), (1, 32, 32), (3, 8, 24), (9, 8, 8), (1, 16, 16), (5, 16, 16), (2, 24, 16), (1, 8, 8)]
    plan = plan_batches(sizes, 400)
    assert sorted(i for batch in plan for i in batch) == list(range(len(sizes)))
    work = [batch_work(batch, sizes) for batch in plan]
    assert all(tokens <= 400 for tokens, _ in work)
    assert max(w for _, w in work) <= 2 * min(w for _, w in work)
    assert plan_batches([(1, 64, 64)], 10) == [[0]]  # larger than the budget: a batch of its own
    with pytest.raises(ValueError, match="token_budget must be a positive int"):
        plan_batches(sizes, 0)


def test_lora_adapters_train_through_forward_packed():
    peft = pytest.importorskip("peft")
    model = tiny_wan()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "patch_embedding"]  # a LoRA conv: embedded per video
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    swap(model)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(n.startswith("patch_embedding.") for n in lora)
    latents, timestep, text, texts = wan_inputs(False)
    weights = [torch.randn(4, *s) for s in SIZES]
    alone = _grads(model, wan_alone(model, latents, timestep, texts), weights)
    packed = _grads(model, forward_packed(model, latents, timestep, text), weights)
    assert_grads_close(packed, alone)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.SGD(lora.values(), lr=0.1)
    loss = sum(o.pow(2).mean() for o in forward_packed(model, latents, timestep, text))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in lora.items())
    unswap(model)


def test_hunyuan_per_sample_text_lengths():
    model = tiny_hunyuan().eval()
    latents, timestep, _, kwargs = hunyuan_inputs(False)
    texts = [torch.randn(n, 16) for n in (7, 2, 4)]
    pooled, guidance = kwargs["pooled_projections"], kwargs["guidance"]
    with torch.no_grad():
        expected = [model(x[None], timestep[i:i + 1], texts[i][None], torch.ones(1, len(texts[i]), dtype=torch.long),
                          pooled[i:i + 1], guidance[i:i + 1], return_dict=False)[0][0] for i, x in enumerate(latents)]
        swap(model)
        out = forward_packed(model, latents, timestep, texts, pooled_projections=pooled, guidance=guidance)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **TOL)
    unswap(model)


def test_finetune_example_runs(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "finetune_wan_packed.py"
    spec = importlib.util.spec_from_file_location("finetune_wan_packed", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--steps", "3", "--budget", "256", "--checkpointing", "--out", str(tmp_path)])
    assert len(rows) == 3 and all(r[2] >= 1 and r[3] <= 256 and r[1] > 0 for r in rows)
    assert (tmp_path / "loss.csv").read_text().count("\n") == 4 and (tmp_path / "loss.png").stat().st_size > 0
