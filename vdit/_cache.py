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


class TensorCache:
    """An LRU map from (tensor object, its version, extra key) to a value computed from the tensor.

    Args:
        size: entries kept (least recently used dropped first).
    """

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

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
