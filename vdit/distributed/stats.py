"""Accounting of the bytes each rank sends, for the communication-volume figures in docs/distributed.md.

    with count_communication() as sent:
        out = sequence_parallel_attention(...)
    sent.total   # bytes this rank put on the wire, by the usual algorithms (see `record` call sites)
"""
from __future__ import annotations

import collections
import contextlib

_active: list[collections.Counter] = []


@contextlib.contextmanager
def count_communication():
    """Count bytes sent by this rank inside the block, by collective kind (a Counter with a .total)."""
    counter = _Counter()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


class _Counter(collections.Counter):
    @property
    def total(self) -> int:
        return sum(self.values())


def record(kind: str, nbytes: int) -> None:
    """Add ``nbytes`` sent by this rank for collective ``kind`` to every active counter."""
    for counter in _active:
        counter[kind] += int(nbytes)
