"""SwapReport: what :func:`vdit.swap.swap` replaced, what it left alone and why, and what ran since."""
from __future__ import annotations

import collections
import dataclasses


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

    ``replacements`` and ``skipped`` are fixed at swap time. ``calls`` counts, while the swapped model
    runs, how often each routed function took the vdit path (``"attention.varlen"``,
    ``"attention.dense"``, ``"rope"``) or fell back to the original (``"attention.fallback:<why>"``,
    ``"rope.fallback:<why>"``); it tells which kernels actually ran.
    """
    model: str
    replacements: list[Replacement] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, path: str, kind: str, original: str, replacement: str) -> None:
        self.replacements.append(Replacement(path, kind, original, replacement))

    def skip(self, path: str, kind: str, reason: str) -> None:
        self.skipped.append(Skip(path, kind, reason))

    def paths(self, kind: str | None = None) -> list[str]:
        """Module paths replaced (of one kind if given)."""
        return [r.path for r in self.replacements if kind is None or r.kind == kind]

    def __len__(self) -> int:
        return len(self.replacements)

    def __str__(self) -> str:
        lines = [f"vdit.swap({self.model}): {len(self.replacements)} replacement(s), {len(self.skipped)} skipped"]
        for r in self.replacements:
            lines.append(f"  [{r.kind}] {r.path or '<root>'}: {r.original} -> {r.replacement}")
        for s in self.skipped:
            lines.append(f"  [{s.kind}] {s.path or '<root>'}: skipped ({s.reason})")
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k}={v}" for k, v in sorted(self.calls.items())))
        return "\n".join(lines)
