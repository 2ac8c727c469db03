"""Reference models built from vdit modules."""
from vdit.models.dit import VideoDiT, VideoDiTConfig

__all__ = ["VideoDiT", "VideoDiTConfig"]

_MOVED = ("TextEncoder", "WordTokenizer")  # the demo's text encoder, now vdit.demo.text


def __getattr__(name: str):
    """``vdit.models.TextEncoder`` / ``WordTokenizer``: imported from the demo on first use (through the old
    module path ``vdit.models.text``, see ``vdit._aliases``), so importing the library does not import it."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.text"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
