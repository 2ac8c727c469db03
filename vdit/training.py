"""Flow-matching (rectified flow) training objective.

Convention: x_t = (1 - t) * x_0 + t * noise, t in [0, 1] (t = 1 is pure noise); the model predicts the
velocity v = noise - x_0, so sampling integrates dx/dt = v from t = 1 down to t = 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_timesteps(n: int, *, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                     device=None) -> torch.Tensor:
    """(n,) logit-normal timesteps: sigmoid(N(mean, std)), which favours the middle of the path (SD3)."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * std + mean)


def noisy_inputs(videos: Sequence[torch.Tensor], t: torch.Tensor, noise: Sequence[torch.Tensor]):
    """x_t for each video and the velocity target noise - x_0."""
    xt = [(1 - ti) * x + ti * n for x, ti, n in zip(videos, t.tolist(), noise)]
    target = [n - x for x, n in zip(videos, noise)]
    return xt, target


def flow_matching_loss(model, videos: Sequence[torch.Tensor], context: torch.Tensor, cu_seqlens_context: torch.Tensor,
                       *, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                       noise: Sequence[torch.Tensor] | None = None, normalizer: int | None = None) -> torch.Tensor:
    """Mean squared velocity error over every element of every video (so larger videos weigh more).

    Args:
        model: callable ``model(videos, t, context, cu_seqlens_context) -> list of velocities``, or returning
            this rank's share of them under sequence parallelism (a :class:`vdit.models.shard.ShardedVelocity`,
            :meth:`VideoDiT.forward_shard`): the loss is then this rank's share of the sum, and the ranks' shares
            add up to the loss (reduce one scalar instead of gathering the velocities).
        videos: list of B clean videos (C, Ti, Hi, Wi).
        context, cu_seqlens_context: packed text embeddings of the B prompts.
        generator: draws t and noise when they are not given.
        t: (B,) timesteps; noise: B tensors like the videos (e.g. drawn per video for data parallelism).
        normalizer: element count to divide by (default: this batch's); data-parallel ranks pass the
            global count so the sum over ranks is the global mean.
    Returns:
        Scalar loss.
    """
    if t is None:
        t = sample_timesteps(len(videos), generator=generator, device=videos[0].device)
    if noise is None:
        noise = [torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype) for v in videos]
    xt, target = noisy_inputs(videos, t, noise)
    pred = model(xt, t, context, cu_seqlens_context)
    if hasattr(pred, "target_tokens"):  # this rank's patches only
        squared = ((pred.tokens.float() - pred.target_tokens(target).float()) ** 2).sum()
    else:
        squared = sum(((p.float() - y.float()) ** 2).sum() for p, y in zip(pred, target))
    return squared / (normalizer or sum(v.numel() for v in videos))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
