"""The demo weights shipped in the package (vdit.demo.pipeline.DEFAULT_WEIGHTS) load, match their config and
generate a finite video."""
import json
import os

import torch

from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo, generate

ASSETS = os.path.dirname(DEFAULT_WEIGHTS)


def test_shipped_weights_load_and_generate():
    assert os.path.getsize(DEFAULT_WEIGHTS) <= 30 * 2**20  # package-data budget
    model = TextToVideo.load(DEFAULT_WEIGHTS)
    cfg = model.dit.config
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored float16, run in float32
    with open(os.path.join(ASSETS, "training.json")) as f:
        assert json.load(f)["step"] > 0
    pt, ph, pw = cfg.patch_size
    video, = generate(model, ["a red circle moves up on a black background"], frames=2 * pt, height=2 * ph,
                      width=2 * pw, steps=2, progress=False)
    assert video.shape == (3, 2 * pt, 2 * ph, 2 * pw) and torch.isfinite(video).all()
