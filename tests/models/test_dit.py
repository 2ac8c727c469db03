"""The VideoDiT model (vdit/models): packed batches equal each video alone, kernels equal the reference
backend, gradients, positions (fractional, prompt velocity), training, the flow-matching loss and
sampler, the TextToVideo checkpoint format, torch.compile of a block, and determinism (same seed,
same bits: generation and the training backward on the CPU)."""
import pytest
import torch

import vdit
from tests.conftest import reordered_sum_tolerance
from vdit.demo.checkpoint import CheckpointError
from vdit.demo.data import vocabulary
from vdit.demo.pipeline import TextEncoderConfig, TextToVideo, generate
from vdit.models import VideoDiT, VideoDiTConfig
from vdit.sampling import FlowSampler
from vdit.training import flow_matching_loss


def tiny_model(**overrides) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(VideoDiTConfig.preset("tiny", **overrides))
    for p in model.parameters():  # leave adaLN-Zero / zero-init so every path carries signal
        torch.nn.init.normal_(p, std=0.2)
    return model


def batch(model):
    cfg = model.config
    videos = [torch.randn(3, 2, 8, 12), torch.randn(3, 1, 4, 4), torch.randn(3, 3, 12, 8)]
    context = torch.randn(7, cfg.context_dim)
    cu_ctx = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    return videos, torch.tensor([0.1, 0.5, 0.9]), context, cu_ctx


POSITION_OPTIONS = [{}, {"fractional_positions": True}, {"fractional_positions": True, "prompt_velocity": True}]


@pytest.mark.parametrize("options", POSITION_OPTIONS, ids=["rope-only", "fractional", "prompt-velocity"])
def test_packed_batch_equals_each_video_alone(options):
    model = tiny_model(**options)
    videos, t, context, cu_ctx = batch(model)
    with torch.no_grad():
        packed = model(videos, t, context, cu_ctx)
        for i, v in enumerate(videos):
            s, e = int(cu_ctx[i]), int(cu_ctx[i + 1])
            alone = model([v], t[i:i + 1], context[s:e], torch.tensor([0, e - s], dtype=torch.int32))[0]
            assert packed[i].shape == v.shape
            # GEMMs of another row count may block their inner sums differently; the MLP's is the longest
            tol = reordered_sum_tolerance(torch.float32, 4 * model.config.hidden_size, layers=model.config.depth)
            torch.testing.assert_close(packed[i], alone, **tol)


def test_reference_backend_equals_kernel_backends():
    model = tiny_model()
    videos, t, context, cu_ctx = batch(model)
    with torch.no_grad():
        auto = model(videos, t, context, cu_ctx)
        with vdit.use_backend("torch"):
            ref = model(videos, t, context, cu_ctx)
    for a, r in zip(auto, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", POSITION_OPTIONS, ids=["rope-only", "fractional", "prompt-velocity"])
def test_gradients_reach_every_parameter(options):
    model = tiny_model(**options)
    videos, _, context, cu_ctx = batch(model)
    loss = flow_matching_loss(model, videos, context, cu_ctx, generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_prompt_velocity_moves_each_clips_positions_with_time():
    from vdit.models.dit import PromptVelocity

    velocity = PromptVelocity(context_dim=2)
    with torch.no_grad():
        velocity.proj.weight.copy_(torch.eye(2))  # velocity (h, w) = tanh(the pooled prompt)
    fractions = torch.tensor([[0.25, 0.5, 0.5], [0.75, 0.5, 0.5], [0.5, 0.3, 0.6]])
    pooled = torch.atanh(torch.tensor([[0.0, 0.4], [0.5, -0.5]]))  # clip 0: frame moving right; clip 1: another
    moved = velocity(fractions, pooled, torch.tensor([2, 1]))
    # Clip 0: the frame moves 0.4 of the width per clip, so a still point drifts back in it: w - 0.4 (t - 1/2).
    expected = [[0.25, 0.5, 0.6], [0.75, 0.5, 0.4], [0.5, 0.3, 0.6]]  # clip 1 at t = 1/2: no shift
    torch.testing.assert_close(moved, torch.tensor(expected))
    with pytest.raises(ValueError, match="prompt_velocity .* needs fractional_positions"):
        VideoDiTConfig.preset("tiny", prompt_velocity=True)


def test_grid_fractions_place_tokens_within_their_own_clip():
    from vdit.packing import grid_fractions, grid_positions

    fractions = grid_fractions(torch.tensor([[2, 1, 2], [1, 2, 1]]))
    expected = [[0.25, 0.5, 0.25], [0.25, 0.5, 0.75], [0.75, 0.5, 0.25], [0.75, 0.5, 0.75], [0.5, 0.25, 0.5],
                [0.5, 0.75, 0.5]]
    torch.testing.assert_close(fractions, torch.tensor(expected))
    grids = torch.tensor([[3, 2, 5], [1, 4, 2]])
    assert torch.equal(grid_fractions(grids, grid_positions(grids)), grid_fractions(grids))


def train_briefly(model, steps: int = 30) -> tuple[float, float]:
    """The summed flow-matching loss on 4 fixed noise seeds before and after ``steps`` AdamW steps."""
    videos, _, context, cu_ctx = batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_at(seed):
        return flow_matching_loss(model, videos, context, cu_ctx, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(4))
    for step in range(steps):
        opt.zero_grad()
        loss_at(100 + step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(4))
    return before, after


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    before, after = train_briefly(VideoDiT(VideoDiTConfig.preset("tiny")))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("attention", ["sliding_tile", "topk_tile"])
def test_tile_sparse_attention_model_trains_and_samples(attention):
    """VideoDiTConfig(attention=...) permutes to tile order once and back once; the model trains and samples."""
    torch.manual_seed(0)
    cfg = VideoDiTConfig.preset("tiny", attention=attention, tile=(1, 1, 2), window=(1, 2, 2), topk=2)
    model = VideoDiT(cfg)
    before, after = train_briefly(model)
    assert after < 0.9 * before, (before, after)  # top-2 of a handful of tiles sees little: a slower start
    if attention == "topk_tile":
        assert model.blocks[0].attn.coarse_gate.weight.abs().sum() > 0  # the coarse path trains
    _, _, context, cu_ctx = batch(model)
    shapes = [(3, 2, 8, 12), (3, 1, 4, 4)]
    samples = FlowSampler(model, steps=2, progress=False)(shapes, context[:4], cu_ctx[:3], seed=1)
    assert [tuple(x.shape) for x in samples] == shapes and all(torch.isfinite(x).all() for x in samples)


def test_config_validates_its_sparse_attention_through_sparse_pattern():
    """The config keeps its keys; a block-sparse one is one SparsePattern, checked at construction, errors naming
    the config field; each mode reads its own fields."""
    assert VideoDiTConfig.preset("tiny").sparse_pattern() is None
    cfg = VideoDiTConfig.preset("tiny", attention="sliding_tile", tile=[1, 2, 2], window=[2, 1, 3], topk=0)
    assert cfg.sparse_pattern() == vdit.SparsePattern("sliding_tile", (1, 2, 2), window=(2, 1, 3))
    assert cfg.tile == (1, 2, 2) and cfg.window == (2, 1, 3)  # saved as before
    topk = VideoDiTConfig.preset("tiny", attention="topk_tile", window=(0, 0, 0), topk=3).sparse_pattern()
    assert topk == vdit.SparsePattern("topk_tile", (4, 4, 4), topk=3)
    assert VideoDiT(VideoDiTConfig.preset("tiny", attention="topk_tile", topk=3)).blocks[0].attn.pattern == topk
    with pytest.raises(ValueError, match="attention must be one of"):
        VideoDiTConfig.preset("tiny", attention="local")
    with pytest.raises(ValueError, match=r"VideoDiTConfig.tile must be 3 positive ints"):
        VideoDiTConfig.preset("tiny", attention="sliding_tile", tile=(0, 2, 2))
    with pytest.raises(ValueError, match=r"VideoDiTConfig.window sizes must be >= 1"):
        VideoDiTConfig.preset("tiny", attention="sliding_tile", window=(0, 2, 2))
    with pytest.raises(ValueError, match=r"VideoDiTConfig.topk must be an int >= 1"):
        VideoDiTConfig.preset("tiny", attention="topk_tile", topk=0)


def test_whole_grid_window_model_equals_the_dense_model():
    torch.manual_seed(0)
    dense = VideoDiT(VideoDiTConfig.preset("tiny"))
    torch.nn.init.normal_(dense.unembed.weight)
    sparse = VideoDiT(VideoDiTConfig.preset("tiny", attention="sliding_tile", tile=(1, 2, 2), window=(8, 8, 8)))
    sparse.load_state_dict(dense.state_dict())  # same parameters, same state_dict keys
    videos, t, context, cu_ctx = batch(dense)
    with torch.no_grad():
        for a, b in zip(dense(videos, t, context, cu_ctx), sparse(videos, t, context, cu_ctx)):
            # the longest video's 96 keys per query, in tile order against raster order, through every block
            torch.testing.assert_close(a, b, **reordered_sum_tolerance(torch.float32, 96, layers=dense.config.depth))


def test_sampler_shapes_and_determinism():
    model = tiny_model()
    _, _, context, cu_ctx = batch(model)
    shapes = [(3, 2, 8, 12), (3, 1, 4, 4), (3, 3, 12, 8)]
    sampler = FlowSampler(model, steps=3, guidance=2.0, progress=False)
    a = sampler(shapes, context, cu_ctx, uncond_context=context[:3],
                uncond_cu_seqlens=torch.tensor([0, 1, 2, 3], dtype=torch.int32), seed=5)
    b = sampler(shapes, context, cu_ctx, uncond_context=context[:3],
                uncond_cu_seqlens=torch.tensor([0, 1, 2, 3], dtype=torch.int32), seed=5)
    assert [tuple(x.shape) for x in a] == shapes
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    heun_sampler = FlowSampler(model, steps=3, method="heun", shift=None, guidance=1.0, progress=False)
    heun = heun_sampler(shapes, context, cu_ctx, seed=5)
    assert all(torch.isfinite(x).all() for x in heun)
    with pytest.raises(ValueError, match="method must be"):
        FlowSampler(model, method="ddim")


def test_text_to_video_round_trip(tmp_path):
    cfg = VideoDiTConfig.preset("tiny", context_dim=32)
    model = TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=32, depth=1, heads=2))
    model.save(str(tmp_path))
    loaded = TextToVideo.load(str(tmp_path / "model.safetensors"))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    video, = generate(loaded, ["a red circle moves up"], frames=2, height=8, width=8, steps=2, progress=False)
    assert video.shape == (3, 2, 8, 8) and video.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of the patch size"):
        generate(loaded, ["x"], frames=2, height=6, width=8, steps=1)


def test_sampling_shift_is_saved_and_is_the_generate_default(tmp_path):
    import json

    torch.manual_seed(0)
    model = TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32), vocabulary(),
                        TextEncoderConfig(dim=32, depth=1, heads=2), sampling_shift=8.0)
    torch.nn.init.normal_(model.dit.unembed.weight, std=0.1)  # a zero-initialized output makes every shift agree
    model.save(str(tmp_path))
    loaded = TextToVideo.load(str(tmp_path / "model.safetensors"))
    assert loaded.sampling_shift == 8.0
    kwargs = dict(frames=2, height=8, width=8, steps=3, progress=False)
    default, = generate(loaded, ["a red circle moves up"], **kwargs)
    at_8, = generate(loaded, ["a red circle moves up"], shift=8.0, **kwargs)
    at_3, = generate(loaded, ["a red circle moves up"], shift=3.0, **kwargs)
    assert torch.equal(default, at_8) and not torch.allclose(default, at_3)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["sampling_shift"]  # configs from before the key: trained and sampled at 3
    assert TextToVideo.from_config(config).sampling_shift == TextToVideo.DEFAULT_SAMPLING_SHIFT == 3.0
    with pytest.raises(CheckpointError, match="sampling_shift must be > 0"):
        TextToVideo.from_config({**config, "sampling_shift": 0})


def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = VideoDiTConfig.preset("tiny", context_dim=32)
    model = TextToVideo(cfg, vocabulary(), TextEncoderConfig(dim=32, depth=1, heads=2))
    model.save(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        TextToVideo.load(str(truncated), str(tmp_path / "config.json"))
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    config["dit"]["depth"] = 3
    (tmp_path / "deeper.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the model"):
        TextToVideo.load(str(weights), str(tmp_path / "deeper.json"))
    config["dit"]["depth"] = 2
    config["dit"]["flash"] = True
    (tmp_path / "unknown.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown VideoDiTConfig keys"):
        TextToVideo.load(str(weights), str(tmp_path / "unknown.json"))
    with pytest.raises(CheckpointError, match="weights file not found"):
        TextToVideo.load(str(tmp_path / "missing.safetensors"), str(tmp_path / "config.json"))


def test_block_compiles_fullgraph():
    """A DiT block traces into one graph through the vdit ops (torch.library custom ops)."""
    from vdit.models.dit import BlockInputs
    from vdit.packing import grid_positions

    model = tiny_model()
    block = model.blocks[0]
    videos, t, context, cu_ctx = batch(model)
    x, cu, grids = model.patch_embed(videos)
    c = model.conditioning(t, context, cu_ctx)
    inputs = BlockInputs(c, cu, int((cu[1:] - cu[:-1]).max()), grid_positions(grids), model.rope, context, cu_ctx, 3)
    args = (x, inputs)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), block(*args), rtol=1e-5, atol=1e-5)


def test_config_warns_when_tokens_are_narrower_than_patches():
    with pytest.warns(UserWarning, match="cannot represent every pixel's noise"):
        VideoDiTConfig(in_channels=3, patch_size=(2, 8, 8), hidden_size=256)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideoDiTConfig(in_channels=3, patch_size=(1, 8, 8), hidden_size=256)


# ---- determinism ---------------------------------------------------------------------------------

def _text_to_video():
    torch.manual_seed(0)
    return TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32), vocabulary(),
                       TextEncoderConfig(dim=32, depth=1, heads=2))


def test_generation_is_bit_identical_for_a_seed():
    model = _text_to_video().eval()
    kwargs = dict(frames=2, height=8, width=12, steps=3, guidance=3.0, seed=7, progress=False)
    a = generate(model, ["a red circle moves up", "a blue square"], **kwargs)
    b = generate(model, ["a red circle moves up", "a blue square"], **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = generate(model, ["a red circle moves up", "a blue square"], **{**kwargs, "seed": 8})
    assert not torch.equal(a[0], c[0])


def test_backward_is_bit_identical():
    model = _text_to_video()
    videos = [torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def grads():
        model.zero_grad()
        context, cu = model.encode(["a red circle", "", "a green triangle moves down"])
        flow_matching_loss(model.dit, videos, context, cu, generator=torch.Generator().manual_seed(0)).backward()
        return [p.grad.clone() for p in model.parameters()]

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
