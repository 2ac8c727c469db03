"""What the demo's command-line tools share: the device option, the torchrun process group, and errors
reported as one line with exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from vdit.demo.checkpoint import CheckpointError

USAGE_ERROR = 2  # exit status of bad input, as argparse uses


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


class Ranks(NamedTuple):
    """This process's place under torchrun: (rank, world size, device); (0, 1, device) without it."""

    rank: int
    world_size: int
    device: torch.device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: default ``cuda`` when a GPU is available, else ``cpu``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def process_group(device: str | torch.device) -> Iterator[Ranks]:
    """Under torchrun (WORLD_SIZE > 1): start the process group (NCCL for a CUDA ``device``, else gloo) and
    yield this rank's :class:`Ranks`, its device ``cuda:LOCAL_RANK`` for CUDA. On leaving, the ranks wait for
    each other and the group is torn down, on errors too (without waiting): a rank that exits while its
    peers still hold open gloo connections can abort (SIGABRT) during interpreter shutdown. A group that
    was already running is left running. Without torchrun: yields (0, 1, device)."""
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Ranks(0, 1, device)
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        yield Ranks(dist.get_rank(), world_size, device)
        dist.barrier()  # all ranks leave together (errors are raised on every rank alike)
    finally:
        if owned:
            dist.destroy_process_group()


def entry_point(prog: str, main: Callable[[], int]) -> Callable[[], None]:
    """The console-script function of a tool: ``sys.exit(main())``, with a :class:`UsageError` or
    :class:`CheckpointError` printed as ``<prog>: error: <message>`` and exit status 2 (no traceback)."""

    def cli() -> None:
        try:
            status = main()
        except (UsageError, CheckpointError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            status = USAGE_ERROR
        sys.exit(status)

    cli.__doc__ = f"{prog}: run main() and exit with its status (2 on a usage or checkpoint error)."
    return cli
