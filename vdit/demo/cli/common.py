"""What the demo's command-line tools share: the device option, the torchrun process group, and errors
reported as one line with exit status 2."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from vdit.demo import prompts
from vdit.demo.checkpoint import CheckpointError
from vdit.models import VideoDiTConfig
from vdit.ops import SparsePattern
from vdit.ops.sparse_pattern import MODES
from vdit.sampling import DEFAULT_THRESHOLD, METHODS, StepCache

USAGE_ERROR = 2  # exit status of bad input, as argparse uses
# How long a collective waits for its peers before failing (a rank that never arrives raises instead of hanging).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


class Ranks(NamedTuple):
    """This process's place under torchrun: (rank, world size, device); (0, 1, device) without it."""

    rank: int
    world_size: int
    device: torch.device


def parse_size(text: str, name: str = "--size") -> tuple[int, int]:
    """(height, width) of an ``HxW`` size such as ``64x48`` given to option ``name``; a UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"{name} must look like HxW (e.g. 64x64), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def triple(text: str, name: str) -> tuple[int, int, int]:
    """Three positive ints of ``t,h,w`` (e.g. ``4,4,4``) for option ``name``; a UsageError otherwise."""
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise UsageError(f"{name} must be three positive integers t,h,w (e.g. 4,4,4), got {text!r}")
    return values


def add_attention_arguments(parser: argparse.ArgumentParser, *, default_help: str) -> None:
    """``--attention``, ``--tile``, ``--window``, ``--topk``: the model's self-attention (VideoDiTConfig);
    each option left out keeps ``default_help``'s value."""
    group = parser.add_argument_group("self-attention",
                                      f"spacetime block-sparse attention; unset options: {default_help}")
    group.add_argument("--attention", choices=("dense", *MODES), default=None,
                       help="dense, a sliding window of tiles (STA) or the top-k tiles per query tile (VSA)")
    group.add_argument("--tile", default=None, help="tokens per tile t,h,w (e.g. 4,4,4)")
    group.add_argument("--window", default=None, help="sliding_tile: tiles visible per axis t,h,w (e.g. 4,2,2)")
    group.add_argument("--topk", type=int, default=None, help="topk_tile: key tiles per query tile and head")


def attention_options(args: argparse.Namespace) -> dict:
    """The ``attention`` / ``tile`` / ``window`` / ``topk`` keywords of :func:`vdit.demo.growth.with_attention`
    from the options of :func:`add_attention_arguments` (None where not given); a UsageError naming the option
    on bad values, which :class:`vdit.ops.SparsePattern` checks (over VideoDiTConfig's defaults for the others)."""
    options = {"attention": args.attention, "topk": args.topk,
               "tile": None if args.tile is None else triple(args.tile, "--tile"),
               "window": None if args.window is None else triple(args.window, "--window")}
    given = {key: getattr(VideoDiTConfig, key) if options[key] is None else options[key]
             for key in ("tile", "window", "topk")}
    try:
        for mode in MODES:  # each option as the mode that reads it
            SparsePattern.of(mode, given["tile"], window=given["window"], topk=given["topk"])
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc).replace("SparsePattern.", "--")) from None
    return options


def attention_summary(config) -> str:
    """How a VideoDiTConfig attends: ``attention dense``, or ``attention`` and its SparsePattern's description,
    e.g. ``attention sliding_tile, tile 4x4x4, window 4x2x2``."""
    pattern = config.sparse_pattern()
    return "attention dense" if pattern is None else f"attention {pattern.describe()}"


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache`` and ``--cache-threshold``: step caching in the sampler (vdit.sampling.StepCache)."""
    group = parser.add_argument_group("step caching", "skip the remaining blocks of a video whose first block "
                                      "changed little since its last full step (First-Block Cache)")
    group.add_argument("--cache", choices=METHODS, default="none", help="none (default) or first_block")
    group.add_argument("--cache-threshold", type=float, default=None,
                       help=f"relative change of the first block below which a step is reused (default "
                            f"{DEFAULT_THRESHOLD}; larger is faster and further from the uncached video)")


def cache_option(args: argparse.Namespace):
    """The :class:`vdit.sampling.StepCache` of :func:`add_cache_arguments`'s options (None when off); a
    UsageError naming the option on a bad threshold."""
    if args.cache_threshold is not None and not args.cache_threshold >= 0:
        raise UsageError(f"--cache-threshold must be >= 0, got {args.cache_threshold}")
    return StepCache.of(args.cache, args.cache_threshold)


def add_expand_arguments(parser: argparse.ArgumentParser, *, expand_help: str) -> None:
    """``--expand-prompt`` and ``--expand-method``: short prompts rewritten into the caption grammar
    (vdit.demo.prompts.expand_prompts)."""
    parser.add_argument("--expand-prompt", action="store_true", help=expand_help)
    parser.add_argument("--expand-method", choices=prompts.METHODS, default=prompts.DEFAULT_METHOD,
                        help=f"how --expand-prompt reads a prompt's slots: learned (a small trained tagger) or "
                             f"rules (hand-written tables); default {prompts.DEFAULT_METHOD} "
                             "(benchmarks/results/cpu-prompt-expansion.md compares them)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: default ``cuda`` when a GPU is available, else ``cpu``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def process_group(device: str | torch.device) -> Iterator[Ranks]:
    """Under torchrun (WORLD_SIZE > 1): start the process group and yield this rank's :class:`Ranks`, its
    device ``cuda:LOCAL_RANK`` for CUDA. A CUDA run selects its GPU first (``torch.cuda.set_device``) and
    starts ``cpu:gloo,cuda:nccl``, so that collectives on CUDA tensors use NCCL and any on CPU tensors gloo;
    a CPU run starts gloo. With ``VDIT_CHECK_PLACEMENT=1`` the block runs under
    :func:`vdit.distributed.check_placement` (every collective's tensors on the data's device). On leaving,
    the ranks wait for each other and the group is torn down, on errors too (without waiting): a rank that
    exits while its peers still hold open gloo connections can abort (SIGABRT) during interpreter shutdown.
    A group that was already running is left running. Without torchrun: yields (0, 1, device)."""
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Ranks(0, 1, device)
        return
    import torch.distributed as dist

    from vdit.distributed import check_placement
    from vdit.distributed.placement import placement_checking_requested

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        # On GPUs, device_id binds the NCCL communicator to this rank's GPU and creates it now, on every rank
        # together, and the timeout turns a collective some rank never reaches into an error instead of a hang.
        # CPU runs keep gloo's defaults: with an explicit timeout its ranks aborted at exit (seen in the tests).
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo")
    checking = check_placement(device) if placement_checking_requested() else contextlib.nullcontext()
    try:
        with checking:
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
