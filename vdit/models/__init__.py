"""Reference models built from vdit modules."""
from vdit.models.dit import VideoDiT, VideoDiTConfig

__all__ = ["VideoDiT", "VideoDiTConfig"]

