"""Reference models built from vdit modules."""
from vdit.models.dit import VideoDiT, VideoDiTConfig
from vdit.models.text import TextEncoder, WordTokenizer

__all__ = ["VideoDiT", "VideoDiTConfig", "TextEncoder", "WordTokenizer"]
