"""The vdit demo: a small text-to-video application built on the kernel library.

A word-level text encoder and a :class:`vdit.models.VideoDiT` (:class:`TextToVideo`), trained with flow
matching on a procedural dataset of captioned videos of moving shapes at mixed sizes and durations, with
shipped weights (``assets/``, model card ``assets/README.md``) and three command-line tools:
``vdit-train``, ``vdit-generate`` and ``vdit-eval-demo`` (:mod:`vdit.demo.cli`). It shows the library at
work end to end; the library itself never imports it.

    from vdit.demo import TextToVideo, generate
    model = TextToVideo.load(DEFAULT_WEIGHTS)   # the shipped weights
    video, = generate(model, ["a red circle moves to the left on a black background"])   # (3, 16, 64, 64)

Modules: ``data`` (the shapes dataset), ``text`` (tokenizer and text encoder), ``pipeline`` (TextToVideo,
generate), ``checkpoint`` (safetensors + JSON files, training checkpoints), ``growth`` (adding modules to
trained weights), ``video_io`` (.mp4 / .gif / PNG output, contact sheets).
"""
from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo, generate

__all__ = ["DEFAULT_WEIGHTS", "TextToVideo", "generate"]
