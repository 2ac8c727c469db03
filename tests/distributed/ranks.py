"""Launching gloo ranks in tests: a free port, and spawned processes whose failures reach the test."""
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, size: int, *args, timeout: float = 240) -> None:
    """Run ``worker(rank, size, port, *args, errors)`` in ``size`` spawned processes and assert that every one
    exited 0 with nothing put on ``errors`` (a queue for the workers' tracebacks)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, size, port, *args, errors)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert all(p.exitcode == 0 for p in procs) and not messages, "\n".join(messages)
