"""End-to-end pipelines (text encoder + VideoDiT + sampler)."""
from vdit.pipelines.text_to_video import TextToVideo

__all__ = ["TextToVideo"]
