"""Launching gloo ranks in tests: a free port, and spawned processes whose failures reach the test."""
import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(worker, rank, size, port, args, errors, done) -> None:
    worker(rank, size, port, *args, errors)
    done.put(rank)
    # Leave without interpreter teardown: about one run in ten, a gloo background thread still joinable there
    # aborts the process (std::terminate, "terminate called without an active exception") after the rank's work
    # and its process group's destruction have completed; the test has nothing left to check by then.
    os._exit(0)


def spawn_ranks(worker, size: int, *args, timeout: float = 240) -> None:
    """Run ``worker(rank, size, port, *args, errors)`` in ``size`` spawned processes and assert that every one
    returned and exited 0 with nothing put on ``errors`` (a queue for the workers' tracebacks)."""
    ctx = mp.get_context("spawn")
    errors, done = ctx.SimpleQueue(), ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, r, size, port, args, errors, done)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    messages, finished = [], []
    while not errors.empty():
        messages.append(errors.get())
    while not done.empty():
        finished.append(done.get())
    codes = [p.exitcode for p in procs]  # None: still running after the timeout
    assert codes == [0] * size and sorted(finished) == list(range(size)) and not messages, (
        f"exit codes {codes}, ranks that returned {sorted(finished)}\n" + "\n".join(messages))


def case_worker(check, rank, size, port, cases, errors) -> None:
    """A rank that runs ``check(case)`` for every case under vdit's placement checker, reporting each failing
    case on ``errors`` and going on with the others (every rank must take part in the same collectives); for
    :func:`spawn_ranks` as ``functools.partial(case_worker, check)``."""
    import traceback

    import torch.distributed as dist

    from vdit.distributed import check_placement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        with check_placement("cpu"):
            for case in cases:
                try:
                    check(case)
                except AssertionError:
                    errors.put(f"rank {rank}, {case}: {traceback.format_exc()}")
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
