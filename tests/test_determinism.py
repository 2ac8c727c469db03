"""Same seed, same bits: generation and the training backward are deterministic on the CPU."""
import torch

from vdit.data.shapes import vocabulary
from vdit.models import VideoDiTConfig
from vdit.pipelines.text_to_video import TextEncoderConfig, TextToVideo, generate
from vdit.training import flow_matching_loss


def _model():
    torch.manual_seed(0)
    return TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32), vocabulary(), TextEncoderConfig(dim=32, depth=1, heads=2))


def test_generation_is_bit_identical_for_a_seed():
    model = _model().eval()
    kwargs = dict(frames=2, height=8, width=12, steps=3, guidance=3.0, seed=7, progress=False)
    a = generate(model, ["a red circle moves up", "a blue square"], **kwargs)
    b = generate(model, ["a red circle moves up", "a blue square"], **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = generate(model, ["a red circle moves up", "a blue square"], **{**kwargs, "seed": 8})
    assert not torch.equal(a[0], c[0])


def test_backward_is_bit_identical():
    model = _model()
    videos = [torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def grads():
        model.zero_grad()
        context, cu = model.encode(["a red circle", "", "a green triangle moves down"])
        flow_matching_loss(model.dit, videos, context, cu, generator=torch.Generator().manual_seed(0)).backward()
        return [p.grad.clone() for p in model.parameters()]

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
