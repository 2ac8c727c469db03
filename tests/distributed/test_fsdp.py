"""vdit.distributed.fsdp in one gloo process: with mixed precision on, the root's float inputs are cast to bf16
by vdit (videos, text), not by FSDP, so the diffusion timesteps reach the time embedding in fp32, unrounded."""

import torch
import torch.distributed as dist

from tests.distributed.ranks import free_port
from vdit.distributed.fsdp import shard_model
from vdit.models import VideoDiT, VideoDiTConfig
from vdit.models.dit import timestep_embedding


def test_mixed_precision_keeps_timesteps_exact():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = VideoDiT(VideoDiTConfig.preset("tiny", heads=4, depth=1))
        shard_model(model, model.blocks, "cpu", mixed_precision=True)
        seen = {}

        def record(module, args):
            seen["embedding"] = args[0]

        model.time_mlp.register_forward_pre_hook(record)
        t = torch.tensor([0.9137, 0.25], dtype=torch.float32)
        assert t[0].to(torch.bfloat16).item() == 0.9140625  # what FSDP's input cast made of it
        videos = [torch.randn(3, 2, 8, 8), torch.randn(3, 1, 4, 4)]
        context = torch.randn(5, model.config.context_dim)
        seen["timesteps_in"] = None
        try:
            model(videos, t, context, torch.tensor([0, 2, 5], dtype=torch.int32))
        except RuntimeError:  # a bf16 CPU kernel later in the model is not what this test is about
            pass
        embedding = seen["embedding"]
        assert embedding.dtype == torch.bfloat16  # computed in bf16 from the text's dtype: inputs were cast
        torch.testing.assert_close(embedding, timestep_embedding(t, 256).to(torch.bfloat16), rtol=0, atol=0)
        rounded = timestep_embedding(t.to(torch.bfloat16), 256).to(torch.bfloat16)
        assert not torch.equal(embedding, rounded)
    finally:
        dist.destroy_process_group()
