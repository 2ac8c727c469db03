"""Process groups of a data-parallel x sequence-parallel rank grid, created up front on every rank.

``torch.distributed.new_group`` must be entered by every rank of the world, with the same rank lists, in
the same order, even by ranks that will not be members; a group created lazily by the ranks that need it
hangs (or fails) the others. :func:`build_mesh` therefore creates every group of the grid at once:

    ranks (world W = dp * sp, sp = ring * ulysses), row-major over (dp, ring, ulysses):
      sequence-parallel group g: ranks g*sp .. g*sp + sp - 1 (adjacent token ranges of one batch share);
      Ulysses groups: ulysses consecutive ranks inside it; ring groups: the ranks of equal Ulysses index;
      data-parallel groups: the ranks of equal sequence-parallel index.

It uses ``torch.distributed.device_mesh`` (the mesh FSDP2 takes as well): two meshes, (dp, ring, ulysses)
then (dp, sp), each creating all of its groups on every rank in the same order. Nothing else in
vdit.distributed creates a group: hybrid attention takes its Ulysses and ring groups from here
(``SequenceParallel.subgroups``) and raises without them.

Every group it makes then runs one collective that all its ranks join (:func:`warm_up`). NCCL creates a
group's communicator lazily and collectively, at the group's first call; were that call a ring step's
``batch_isend_irecv``, a rank with nothing to send or receive at that step (its token range starts and ends on
video boundaries) would sit it out and the other ranks would block in the communicator's set-up.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vdit.distributed.attention import MODES, SequenceParallel
from vdit.distributed.sharding import LAYOUTS


@dataclasses.dataclass(frozen=True)
class ParallelMesh:
    """This rank's groups in a dp x sp rank grid (see the module docstring).

    Attributes:
        mesh: DeviceMesh over (dp, ring, ulysses); sp_mesh: DeviceMesh over (dp, sp).
        dp_group: this rank's data-parallel group (its peers holding the same token ranges of other batches).
        sequence_parallel: what the model's attention takes (None for sp == 1).
    """

    mesh: DeviceMesh | None
    sp_mesh: DeviceMesh | None
    dp_group: object
    sequence_parallel: SequenceParallel | None

    @classmethod
    def single_process(cls) -> ParallelMesh:
        """The grid of a run without torch.distributed: one rank, dp = sp = 1, no process groups."""
        return cls(None, None, None, None)

    @property
    def dp_size(self) -> int:
        return 1 if self.sp_mesh is None else self.sp_mesh.size(0)

    @property
    def sp_size(self) -> int:
        return 1 if self.sp_mesh is None else self.sp_mesh.size(1)

    @property
    def dp_rank(self) -> int:
        return 0 if self.sp_mesh is None else self.sp_mesh.get_local_rank(0)

    @property
    def world_size(self) -> int:
        """Ranks in the grid: dp_size * sp_size."""
        return self.dp_size * self.sp_size


def warm_up(groups, device_type: str) -> None:
    """One all-reduce on each of ``groups`` (this rank's groups, each joined by all its ranks in the same order),
    so that every communicator exists before any point-to-point traffic (module docstring)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    token = torch.zeros(1, device=device)
    for group in groups:
        if dist.get_world_size(group) > 1:  # a group of one has no peer to set a communicator up with
            dist.all_reduce(token, group=group)


def build_mesh(device_type: str, sp: int = 1, mode: str = "ulysses", ulysses_size: int | None = None,
               layout: str = "tokens") -> ParallelMesh:
    """Every process group of a dp x sp rank grid over the whole world, created now on every rank in the same
    order and each warmed up with one collective (all ranks must call this together).

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (the data's device type).
        sp: ranks per sequence-parallel group (divides the world size); dp = world // sp.
        mode: sequence-parallel scheme (``ulysses``, ``ring``, ``hybrid``).
        ulysses_size: hybrid: Ulysses ranks per ring position (divides sp); default: all sp ranks (ulysses),
            1 (ring).
        layout: how a batch's tokens are split over the sequence-parallel ranks (``"tokens"``, ``"work"``:
            :mod:`vdit.distributed.sharding`).
    Raises:
        ValueError on a grid the world cannot hold, or an unknown ``layout`` / ``mode``.
    """
    world = dist.get_world_size()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sp < 1 or world % sp:
        raise ValueError(f"sp ({sp}) must divide the world size {world}")
    u = {"ulysses": sp, "ring": 1}.get(mode, ulysses_size)
    if u is None or u < 1 or sp % u:
        raise ValueError(f"hybrid needs ulysses_size dividing sp ({sp}), got {ulysses_size}")
    dp = world // sp
    mesh = init_device_mesh(device_type, (dp, sp // u, u), mesh_dim_names=("dp", "ring", "ulysses"))
    sp_mesh = init_device_mesh(device_type, (dp, sp), mesh_dim_names=("dp", "sp"))
    # Dimension by dimension: the groups of one dimension partition the world, so no rank waits on a group
    # whose other ranks are warming up a different one.
    warm_up([mesh.get_group(name) for name in ("ulysses", "ring", "dp")] + [sp_mesh.get_group("sp")], device_type)
    sequence_parallel = None
    if sp > 1:
        subgroups = (mesh.get_group("ulysses"), mesh.get_group("ring")) if mode == "hybrid" else None
        sequence_parallel = SequenceParallel(sp_mesh.get_group("sp"), mode, u if mode == "hybrid" else None,
                                             subgroups=subgroups, layout=layout)
    return ParallelMesh(mesh, sp_mesh, sp_mesh.get_group("dp"), sequence_parallel)
