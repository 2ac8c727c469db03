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


def test_shipped_sparse_weights_are_the_demo_model_with_sliding_tile_attention():
    from vdit.demo.pipeline import SHIPPED_WEIGHTS

    path = SHIPPED_WEIGHTS["sta"]
    assert os.path.getsize(path) <= 30 * 2**20
    sparse, dense = TextToVideo.load(path), TextToVideo.load(DEFAULT_WEIGHTS)
    cfg = sparse.dit.config
    assert (cfg.attention, cfg.tile, cfg.window) == ("sliding_tile", (4, 4, 4), (4, 2, 2))
    assert sparse.state_dict().keys() == dense.state_dict().keys()  # same architecture, fine-tuned weights
    with open(os.path.join(os.path.dirname(path), "training.json")) as f:
        assert json.load(f)["args"]["attention"] == "sliding_tile"
    video, = generate(sparse, ["a red circle moves up on a black background"], frames=4, height=32, width=32,
                      steps=2, progress=False)
    assert video.shape == (3, 4, 32, 32) and torch.isfinite(video).all()


def test_shipped_autoencoder_reconstructs_held_out_videos():
    from vdit.demo.autoencoder import CausalVideoAutoencoder, psnr
    from vdit.demo.data import ShapesDataset
    from vdit.demo.pipeline import SHIPPED_AUTOENCODER

    assert os.path.getsize(os.path.join(SHIPPED_AUTOENCODER, "autoencoder.safetensors")) <= 8 * 2**20
    ae = CausalVideoAutoencoder.load(SHIPPED_AUTOENCODER)
    assert (ae.config.temporal_stride, ae.config.spatial_stride, ae.config.latent_channels) == (4, 4, 16)
    # the defaults of AutoencoderConfig and of vdit-train-autoencoder reproduce the shipped design
    from vdit.demo.autoencoder import AutoencoderConfig
    from vdit.demo.cli import train_autoencoder as trainer

    assert AutoencoderConfig() == ae.config
    assert trainer.model_config(trainer.parse_args(["--out", "unused"])) == ae.config
    videos = ShapesDataset(seed=1_000_003, frame_counts=(9, 17)).__getitem__
    scores = []
    with torch.no_grad():
        for i in range(4):  # a seed never in its training stream (the trainer's held-out videos)
            video = videos(i)[0]
            latent = ae.encode(video[None])
            assert latent.shape[1:] == ae.latent_shape(*video.shape[1:])
            scores.append(psnr(ae.decode(latent).clamp(-1, 1), video[None]))
    # benchmarks/results/cpu-autoencoder.md: 27.9 dB on 24 such videos; a broken file or decoder gives < 15
    assert sum(scores) / len(scores) > 25, scores


def test_shipped_latent_weights_decode_through_the_shipped_autoencoder():
    from vdit.demo.autoencoder import CausalVideoAutoencoder
    from vdit.demo.pipeline import SHIPPED_AUTOENCODER, SHIPPED_WEIGHTS

    path = SHIPPED_WEIGHTS["latent"]
    assert os.path.getsize(path) <= 30 * 2**20
    model = TextToVideo.load(path)
    shipped = CausalVideoAutoencoder.load(SHIPPED_AUTOENCODER)
    assert model.latent is not None and model.latent.autoencoder.config == shipped.config
    for (name, a), b in zip(model.latent.autoencoder.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a, b), name  # the model carries the shipped autoencoder, unchanged
    assert model.dit.config.in_channels == model.dit.config.out_channels == shipped.config.latent_channels
    with open(os.path.join(os.path.dirname(path), "training.json")) as f:
        assert json.load(f)["args"]["autoencoder"].endswith("autoencoder")
    video, = generate(model, ["a red circle moves up on a black background"], frames=5, height=16, width=24,
                      steps=2, progress=False)
    assert video.shape == (3, 5, 16, 24) and torch.isfinite(video).all()
