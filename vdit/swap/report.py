"""SwapReport: what :func:`vdit.swap.swap` replaced, what it left alone and why, and what ran since."""
from __future__ import annotations

import collections
import dataclasses

# Call counters of the routed functions: (kind, prefix of the keys that used vdit, prefix of fallbacks).
_ROUTED = {"attention": (("attention.varlen", "attention.dense", "attention.sparse"),
                        ("attention.fallback:", "attention.sparse_fallback:")),
           "rope": (("rope",), ("rope.fallback:",))}
_NOT_COUNTED = "runs under torch.compile are not counted"
_HINTS = {"dense (no padding to skip)": "pass attention='all' to route them"}


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One replacement: ``path`` is the module path in the model ("" for the root), ``kind`` one of
    ``patch_embed``, ``attention``, ``rope``, ``norm``; ``original`` and ``replacement`` describe what
    was there and what runs now."""
    path: str
    kind: str
    original: str
    replacement: str


@dataclasses.dataclass(frozen=True)
class Skip:
    """A candidate the swap recognized but left alone, with the reason."""
    path: str
    kind: str
    reason: str


@dataclasses.dataclass
class SwapReport:
    """Result of :func:`vdit.swap.swap`.

    ``replacements`` and ``skipped`` are fixed at swap time. ``calls`` counts, since the swap, how often each
    routed function took the vdit path (``"attention.varlen"``, ``"attention.dense"``, ``"attention.sparse"``,
    ``"rope"``) or fell back to the original (``"attention.fallback:<why>"``, ``"rope.fallback:<why>"``), and
    how often each replaced module ran (``"module:<path>"``); :meth:`last_forward` is the same for the model's
    last forward only. ``str(report)`` says per replaced site whether vdit ran in the last forward and ends
    with one summary line per routed kind (e.g. ``attention: 0 of 12 calls used vdit - dense (no padding to
    skip); pass attention='all' to route them``).

    Only eager runs are counted: inside a torch.compile'd graph (the whole model, or its blocks through
    ``compile_repeated_blocks``) the counting hooks do nothing, so that a second call never recompiles.
    """
    model: str
    replacements: list[Replacement] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _forward_start: collections.Counter | None = dataclasses.field(default=None, repr=False)

    def add(self, path: str, kind: str, original: str, replacement: str) -> None:
        self.replacements.append(Replacement(path, kind, original, replacement))

    def skip(self, path: str, kind: str, reason: str) -> None:
        self.skipped.append(Skip(path, kind, reason))

    def paths(self, kind: str | None = None) -> list[str]:
        """Module paths replaced (of one kind if given)."""
        return [r.path for r in self.replacements if kind is None or r.kind == kind]

    def forward_started(self) -> None:
        """Called when the model's forward begins: :meth:`last_forward` counts from here."""
        self._forward_start = collections.Counter(self.calls)

    def last_forward(self) -> collections.Counter:
        """``calls`` of the last forward (since it began; recomputation of checkpointed blocks in its backward
        included); empty before the first forward."""
        if self._forward_start is None:
            return collections.Counter()
        return collections.Counter({k: v - self._forward_start.get(k, 0) for k, v in self.calls.items()
                                    if v - self._forward_start.get(k, 0) > 0})

    def summary(self, kind: str) -> str | None:
        """One line on a routed ``kind`` (``attention``, ``rope``) in the last forward, or None if nothing of
        that kind was called."""
        used_keys, fallback_prefixes = _ROUTED[kind]
        last = self.last_forward()
        used = sum(last[k] for k in used_keys)
        reasons = collections.Counter({k.split(":", 1)[1]: v for k, v in last.items()
                                       if k.startswith(fallback_prefixes)})
        total = used + sum(reasons.values())
        if total == 0:
            return None
        line = f"{kind}: {used} of {total} calls used vdit"
        if reasons:
            why = "; ".join(f"{n} fell back: {r}" + (f" ({_HINTS[r]})" if r in _HINTS else "")
                            for r, n in reasons.most_common())
            line += f" - {why}"
        return line

    def _site_status(self, r: Replacement, last: collections.Counter) -> str:
        if r.kind in ("patch_embed", "norm"):
            n = last[f"module:{r.path}"]
            return f"ran {n}x" if n else "did not run"
        if r.kind == "attention" and r.path:
            n = last[f"sparse:{r.path}"]
            return f"{n} call(s) sparse" if n else "no call sparse"
        if r.kind == "rope" and r.path:  # a per-module RoPE (Wan's processors)
            n = last[f"rope:{r.path}"]
            return f"{n} call(s) used vdit" if n else "no call used vdit"
        summary = self.summary(r.kind) if r.kind in _ROUTED else None
        return summary.split(": ", 1)[1] if summary else "not called"

    def __len__(self) -> int:
        return len(self.replacements)

    def __str__(self) -> str:
        lines = [f"vdit.swap({self.model}): {len(self.replacements)} replacement(s), {len(self.skipped)} skipped"]
        ran = self._forward_start is not None
        last = self.last_forward()
        for r in self.replacements:
            status = f"  [last forward: {self._site_status(r, last)}]" if ran else ""
            lines.append(f"  [{r.kind}] {r.path or '<root>'}: {r.original} -> {r.replacement}{status}")
        for s in self.skipped:
            lines.append(f"  [{s.kind}] {s.path or '<root>'}: skipped ({s.reason})")
        if ran:
            kinds = sorted({r.kind for r in self.replacements} & set(_ROUTED))
            summaries = [self.summary(kind) or f"{kind}: no call in the last forward" for kind in kinds]
            lines += [f"  {line}" for line in summaries]
        else:
            lines.append("  (run the model to see which kernels run)")
        if self.calls:
            lines.append("  calls since the swap: " + ", ".join(f"{k}={v}" for k, v in sorted(self.calls.items())))
        lines.append(f"  ({_NOT_COUNTED})")
        return "\n".join(lines)
