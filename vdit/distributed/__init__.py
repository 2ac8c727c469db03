"""Sequence parallelism over torch.distributed: shard a packed batch across ranks, Ulysses / ring /
hybrid attention on the shards."""
from vdit.distributed.attention import SequenceParallel, sequence_parallel_attention
from vdit.distributed.mesh import ParallelMesh, build_mesh
from vdit.distributed.placement import PlacementError, check_placement
from vdit.distributed.sharding import gather_packed, local_offsets, shard_bounds, shard_packed, shard_range

__all__ = ["ParallelMesh", "PlacementError", "SequenceParallel", "build_mesh", "check_placement", "gather_packed",
           "local_offsets", "sequence_parallel_attention", "shard_bounds", "shard_packed", "shard_range"]
