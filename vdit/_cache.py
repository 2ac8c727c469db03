"""Results derived from a tensor's values (its checks, a work list), cached per tensor object.

The key is the tensor object itself (held by a weak reference, so the cache never keeps it alive and an
entry dies with it) together with its version counter, which every in-place write bumps (also writes
through views, which share the counter). A new tensor that happens to reuse a freed tensor's memory is a
different object, and a modified tensor has a new version, so a cached result never describes values
the tensor no longer holds. Writes that bypass autograd's version counter (through ``.data`` or raw
pointers) are not seen; vdit never writes offsets that way.

Under ``torch.compile`` nothing is cached (the values are not known at trace time); callers take their
compile-time path instead.
"""
from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Hashable

import torch

# The caches keyed by packed-sequence offsets, with their entries per (cu_seqlens_q, cu_seqlens_k) pair.
_PER_OFFSETS: list[tuple[TensorCache, int]] = []


class TensorCache:
    """An LRU map from (tensor object, its version, extra key) to a value computed from the tensor.

    Args:
        size: entries kept (least recently used dropped first).
        per_offsets_pair: entries one (cu_seqlens_q, cu_seqlens_k) pair of offsets tensors takes, for a cache
            keyed by offsets (0: not one); :func:`reserve_offsets` grows such a cache.
    """

    def __init__(self, size: int = 64, per_offsets_pair: int = 0):
        self.size = self.default_size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()
        if per_offsets_pair:
            _PER_OFFSETS.append((self, per_offsets_pair))

    def get(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, compute: Callable[[], object]):
        """The value for ``tensors`` (all must be unchanged since it was computed) and ``extra``; computes
        and stores it on a miss."""
        key = (tuple(id(t) for t in tensors), extra)
        versions = tuple(t._version for t in tensors)
        entry = self._entries.get(key)
        if entry is not None:
            refs, cached_versions, value = entry
            if cached_versions == versions and all(r() is t for r, t in zip(refs, tensors)):
                self._entries.move_to_end(key)
                return value
        value = compute()
        self._entries[key] = (tuple(weakref.ref(t) for t in tensors), versions, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def reserve_offsets(pairs: int) -> None:
    """Let every cache keyed by offsets hold ``pairs`` (cu_seqlens_q, cu_seqlens_k) pairs besides its default
    size. A ring of W ranks calls attention on W pairs per layer; an LRU cache of fewer entries than a layer
    uses misses on every call (the pairs come back in the same cyclic order), and each miss reads the offsets
    on the host again. Caches only grow, so the largest ring in use decides."""
    for cache, per_pair in _PER_OFFSETS:
        cache.size = max(cache.size, cache.default_size + per_pair * pairs)

