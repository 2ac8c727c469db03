"""Write generated videos as .mp4 / .gif / PNG folders, and contact sheets of their frames.

Videos are float tensors (3, T, H, W) in [-1, 1].
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def save_video(video: torch.Tensor, path: str, fps: int = 8, upscale: int = 4) -> str:
    """Write ``video`` to ``path``: ``.mp4`` (imageio-ffmpeg), ``.gif`` (Pillow), or a folder of PNGs.

    Frames are upscaled by ``upscale`` (nearest) so small demo videos are visible. Returns the path.
    """
    from PIL import Image

    frames = to_uint8_frames(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif suffix == ".mp4":
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise RuntimeError("writing .mp4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); "
                               "or use .gif / a folder") from None
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)
    else:
        os.makedirs(path, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(path, f"frame_{i:03d}.png"))
    return path


def contact_sheet(videos: Sequence[torch.Tensor], path: str, *, labels: Sequence[str] | None = None,
                  max_frames: int = 8, upscale: int = 2, gap: int = 2) -> str:
    """One PNG row per video with up to ``max_frames`` evenly spaced frames (optional text label above)."""
    from PIL import Image, ImageDraw

    rows = []
    for video in videos:
        frames = to_uint8_frames(video)
        pick = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
        tiles = [frames[i].repeat(upscale, 0).repeat(upscale, 1) for i in pick]
        h = tiles[0].shape[0]
        row = np.full((h, sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1), 3), 255, np.uint8)
        x = 0
        for t in tiles:
            row[:, x:x + t.shape[1]] = t
            x += t.shape[1] + gap
        rows.append(row)
    label_h = 14 if labels else 0
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] + label_h + gap for r in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for i, row in enumerate(rows):
        if labels:
            draw.text((2, y + 1), labels[i], fill="black")
        sheet.paste(Image.fromarray(row), (0, y + label_h))
        y += row.shape[0] + label_h + gap
    sheet.save(path)
    return path
