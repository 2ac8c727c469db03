"""What diffusers' own model tests check, on swapped models (Wan, CogVideoX, HunyuanVideo, LTX-Video; tiny random
configs, CPU): gradient checkpointing after the swap gives the unswapped model's outputs and gradients (default and
attention="all", with and without padded text), save / load round trips, LoRA adapters loaded after the swap,
torch.compile with fullgraph=True and diffusers' compile_repeated_blocks (Wan, HunyuanVideo), compiled swapped
models compiling once (every model; no recompile on the second call), and the report's text. Written against
diffusers' public API."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from tests.swap.test_diffusers import cogvideox, hunyuan, ltx, wan  # noqa: E402  (models and inputs)
from vdit.swap import swap, unswap  # noqa: E402

MODELS = {"wan": (wan, (3, 8, 6)), "cogvideox": (cogvideox, (3, 8, 6)), "hunyuan": (hunyuan, (3, 8, 6)),
          "ltx": (ltx, (2, 4, 4))}


def _build(name, pad):
    build, size = MODELS[name]
    return build(size, pad)[:2]


def _loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attention", [True, "all"], ids=["default", "all"])
@pytest.mark.parametrize("pad", [True, False], ids=["pad", "nopad"])
def test_gradient_checkpointing_after_swap(name, attention, pad):
    model, inputs = _build(name, pad)
    model.train()
    ref_out, ref_grads = _loss_and_grads(model, inputs)
    swap(model, attention=attention)
    model.enable_gradient_checkpointing()
    out, grads = _loss_and_grads(model, inputs)
    unswap(model)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip_after_swap(name, tmp_path):
    model, inputs = _build(name, True)
    model.eval()
    swap(model, attention="all")
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, return_dict=False)[0], out, rtol=2e-5, atol=2e-5)
    unswap(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_loaded_after_swap(name):
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = _build(name, True)
    model.eval()
    torch.manual_seed(0)
    swap(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    with torch.no_grad():
        swapped = model(**inputs, return_dict=False)[0]
        unswap(model)
        plain = model(**inputs, return_dict=False)[0]
        model.disable_adapters()
        base = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(swapped, plain, rtol=2e-5, atol=2e-5)
    assert (plain - base).abs().max() > 1e-4  # the adapter is live


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_compile_fullgraph_and_repeated_blocks_after_swap(name):
    torch._dynamo.reset()
    model, inputs = _build(name, True)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        report = swap(model)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # inductor too: the second call reuses the graph
            torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
        model.compile_repeated_blocks(fullgraph=True)  # finds the host's block classes after the swap
        assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()) >= 2
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
    assert report.paths("patch_embed")
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_swapped_model_compiles_once(name):
    """As diffusers' TorchCompileTesterMixin: the whole model compiled with fullgraph=True and called twice under
    error_on_recompile; then compile_repeated_blocks(fullgraph=True) (models that name repeated blocks) called twice
    with recompile_limit=1, where fullgraph turns a recompile into FailOnRecompileLimitHit. The recompiles came from
    the report's counting hooks (dynamo guards on the counters' keys and length), which the backend does not change:
    aot_eager keeps the test fast on CPU; the inductor test above checks the same second call."""
    torch._dynamo.reset()
    model, inputs = _build(name, True)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        report = swap(model, attention="all")
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch._inductor.utils.fresh_inductor_cache(), torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                torch.testing.assert_close(compiled(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
        assert not report.calls  # nothing is counted inside a compiled graph
        torch._dynamo.reset()
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            with torch._inductor.utils.fresh_inductor_cache(), torch._dynamo.config.patch(recompile_limit=1):
                for _ in range(2):
                    torch.testing.assert_close(model(**inputs, return_dict=False)[0], ref, rtol=1e-5, atol=1e-5)
            assert "run the model to see" not in str(report)  # the model's own forward ran eagerly: a last forward
    assert "(runs under torch.compile are not counted)" in str(report)
    unswap(model)
    torch._dynamo.reset()


def test_report_says_what_ran_and_why_not():
    model, inputs = _build("wan", False)
    report = swap(model)
    assert "(run the model to see which kernels run)" in str(report)
    with torch.no_grad():
        model(**inputs)
    text = str(report)
    assert ("attention: 0 of 4 calls used vdit - 4 fell back: dense (no padding to skip) "
            "(pass attention='all' to route them)") in text
    assert "[norm] blocks.0: WanTransformerBlock (inline LayerNorm + modulation) -> WanTransformerBlock with " \
           "vdit.ops.adaln_modulate, gated_residual (same class name)  [last forward: ran 1x]" in text
    assert "[rope] blocks.1.attn1: WanAttnProcessor -> VditWanAttnProcessor (vdit.ops.rope_3d_qk)  " \
           "[last forward: 1 call(s) used vdit]" in text
    assert "rope: 2 of 2 calls used vdit" in text
    with torch.no_grad():
        model(**inputs)
    assert report.last_forward()["rope"] == 2 and report.calls["rope"] == 4  # last forward vs since the swap
    unswap(model)
    model, inputs = _build("cogvideox", False)
    inputs.pop("image_rotary_emb")  # no RoPE applied by the host: the report says so
    report = swap(model, attention="all")
    with torch.no_grad():
        model(**inputs)
    assert "rope: no call in the last forward" in str(report) and "attention: 2 of 2 calls used vdit" in str(report)
    unswap(model)
