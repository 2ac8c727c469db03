"""The demo's causal video autoencoder (vdit/demo/autoencoder.py) and its trainer
(vdit/demo/cli/train_autoencoder.py): shapes at mixed sizes and images, causality in time, errors, save/load,
training steps lower the loss, and a resumed run takes the same steps as an uninterrupted one."""
import dataclasses
import json
import math
import os

import pytest
import torch

from vdit.demo.autoencoder import (
    AutoencoderConfig,
    CausalVideoAutoencoder,
    kl_divergence,
    lfq_penalties,
    psnr,
    quantize,
)
from vdit.demo.checkpoint import CheckpointError
from vdit.demo.cli import train_autoencoder as trainer
from vdit.demo.cli.common import UsageError

TINY = AutoencoderConfig(spatial_stride=8, width=8, blocks=1, latent_channels=4, refine=4, expand=0)
TINY_ARGS = ["--spatial-stride", "8", "--expand", "0", "--width", "8", "--blocks", "1", "--refine", "4",
             "--latent-channels", "4", "--sides", "16,24",
             "--frame-counts", "5", "--batch", "2", "--warmup", "1", "--lr", "3e-3", "--eval-videos", "2",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalVideoAutoencoder(TINY).eval()


@pytest.mark.parametrize("frames,height,width", [(1, 16, 16), (5, 16, 32), (9, 32, 16), (13, 24, 24)])
def test_shapes_of_videos_and_images(model, frames, height, width):
    video = torch.rand(2, 3, frames, height, width) * 2 - 1
    z = model.encode(video)
    assert z.shape == (2, 4, 1 + (frames - 1) // 4, height // 8, width // 8)
    assert model.latent_shape(frames, height, width) == z.shape[1:]
    assert model.decode(z).shape == video.shape


def test_list_of_sizes_codes_each_alone(model):
    videos = [torch.rand(3, 1, 8, 8), torch.rand(3, 5, 16, 32), torch.rand(3, 9, 32, 16)]
    latents = model.encode(videos)
    assert [z.shape for z in latents] == [(4, 1, 1, 1), (4, 2, 2, 4), (4, 3, 4, 2)]
    torch.testing.assert_close(latents[1], model.encode(videos[1][None])[0])
    assert [x.shape for x in model.decode(latents)] == [v.shape for v in videos]
    sampled = model.encode(videos[1][None], generator=torch.Generator().manual_seed(0))
    assert sampled.shape == latents[1][None].shape and not torch.equal(sampled, latents[1][None])
    logvar = CausalVideoAutoencoder(TINY).moments(videos[1][None])[1]
    assert -8 < logvar.mean().item() < -4  # a new encoder starts nearly deterministic (LOGVAR_INIT)


def test_causal_in_time(model):
    """Latent frame j sees frames 0..4j only; the first frame is coded as the image it is alone."""
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    z = model.encode(video)
    changed = video.clone()
    changed[:, :, 5] = -changed[:, :, 5]
    z2 = model.encode(changed)
    torch.testing.assert_close(z2[:, :, :2], z[:, :, :2], rtol=1e-5, atol=1e-5)
    assert (z2[:, :, 2] - z[:, :, 2]).abs().max() > 1e-4  # frame 5 belongs to latent frame 2
    changed[:, :, 4] = -changed[:, :, 4]
    assert (model.encode(changed)[:, :, 1] - z[:, :, 1]).abs().max() > 1e-4
    torch.testing.assert_close(model.encode(video[:, :, :1])[:, :, 0], z[:, :, 0], rtol=1e-5, atol=1e-5)
    # the decoder is causal too: latent frame 0 alone decodes to the first frame
    torch.testing.assert_close(model.decode(z[:, :, :1])[:, :, 0], model.decode(z)[:, :, 0], rtol=1e-5, atol=1e-5)


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match=r"video: frame count must be 1 \+ 4k.*got 4"):
        model.encode(torch.rand(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="video: height and width must be positive multiples of 8, got 12x16"):
        model.encode(torch.rand(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="video must have 3 channels, got 4"):
        model.encode(torch.rand(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match=r"video must be a \(B, C, T, H, W\) tensor"):
        model.encode(torch.rand(3, 5, 16, 16))
    with pytest.raises(ValueError, match="latent must have 4 channels, got 3"):
        model.decode(torch.rand(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        AutoencoderConfig(width=0)
    with pytest.raises(ValueError, match="blocks must be an int >= 0, got -1"):
        AutoencoderConfig(blocks=-1)


def test_save_load_round_trip_and_corrupted_files(model, tmp_path):
    model.save(str(tmp_path))
    loaded = CausalVideoAutoencoder.load(str(tmp_path))
    assert loaded.config == TINY and not loaded.training
    video = torch.rand(1, 3, 5, 16, 24)
    torch.testing.assert_close(loaded.decode(loaded.encode(video)), model.decode(model.encode(video)))
    weights = tmp_path / CausalVideoAutoencoder.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        CausalVideoAutoencoder.load(str(tmp_path))
    config = tmp_path / CausalVideoAutoencoder.CONFIG_FILE
    config.write_text(json.dumps({"width": 4, "colour": 1}))
    with pytest.raises(CheckpointError, match=r"unknown AutoencoderConfig keys \['colour'\]"):
        CausalVideoAutoencoder.load(str(tmp_path))
    config.write_text(json.dumps({"width": 4, "blocks": -1}))
    with pytest.raises(CheckpointError, match="invalid autoencoder config: blocks"):
        CausalVideoAutoencoder.load(str(tmp_path))


def test_kl_and_psnr():
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert kl_divergence(torch.ones(4), torch.zeros(4)).item() == pytest.approx(2.0)
    target = torch.zeros(1, 3, 1, 8, 8)
    assert psnr(target + 0.2, target) == pytest.approx(10 * math.log10(1 / 0.01))  # 0.1 on the [0, 1] scale
    assert psnr(target + 5.0, target - 1) == pytest.approx(0.0, abs=1e-9)  # clamped to [-1, 1] first


def test_training_steps_lower_the_loss(tmp_path):
    """Steps on the same two samples (the data position rewound each time) fit them better and better."""
    args = trainer.parse_args(["--out", str(tmp_path), "--steps", "20", *TINY_ARGS])
    state = trainer.start(args, torch.device("cpu"))
    dataset = trainer.training_dataset(args, state.model.config)
    losses = []
    for _ in range(20):
        state.data_index = 0
        losses.append(trainer.train_step(args, state, dataset, torch.device("cpu"))["loss"])
    assert losses[-1] < 0.6 * losses[0], losses
    assert state.step == 20 and state.data_index == 2


def _log(out):
    with open(os.path.join(out, trainer.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def test_resume_takes_the_same_steps(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = [*TINY_ARGS, "--save-every", "2", "--eval-every", "2"]
    assert trainer.main(["--out", straight, "--steps", "4", *common]) == 0
    assert trainer.main(["--out", resumed, "--steps", "2", *common]) == 0
    with open(os.path.join(resumed, trainer.LOG_FILE), "a") as f:  # a step logged after the last checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    assert trainer.main(["--out", resumed, "--steps", "4", *common]) == 0
    a, b = _log(straight), _log(resumed)
    assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4]
    def without_time(log):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in log]

    assert without_time(a) == without_time(b)  # losses, learning rates and PSNR, to the logged digits
    assert any("psnr" in r for r in a) and all(math.isfinite(r.get("loss", 0.0)) for r in a)
    state = json.loads(open(os.path.join(resumed, trainer.STATE_FILE)).read())
    assert state["step"] == 4 and state["data_index"] == 8


def test_trainer_rejects_sizes_the_strides_do_not_divide(tmp_path):
    with pytest.raises(UsageError, match="--sides must be positive multiples of 8"):
        trainer.main(["--out", str(tmp_path), *TINY_ARGS, "--sides", "12"])
    with pytest.raises(UsageError, match=r"--frame-counts must be 1 \+ 4k"):
        trainer.main(["--out", str(tmp_path), *TINY_ARGS, "--frame-counts", "8"])
    with pytest.raises(UsageError, match="--width must be a positive int, got 0"):
        trainer.main(["--out", str(tmp_path), *TINY_ARGS, "--width", "0"])


def test_decoder_mlp_keeps_shapes_and_causality():
    torch.manual_seed(0)
    model = CausalVideoAutoencoder(AutoencoderConfig(width=8, blocks=1, latent_channels=4, refine=0, expand=16)).eval()
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    z = model.encode(video)
    assert model.decode(z).shape == video.shape
    torch.testing.assert_close(model.decode(z[:, :, :2]), model.decode(z)[:, :, :5], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expand must be an int >= 0, got -2"):
        AutoencoderConfig(expand=-2)


LFQ = dataclasses.replace(TINY, bottleneck="lfq")


def test_lfq_codes_are_signs_and_train_through_the_straight_through_estimator():
    torch.manual_seed(0)
    model = CausalVideoAutoencoder(LFQ)
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    codes = model.encode(video)
    assert codes.shape == (1, 4, 3, 2, 3) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert model.decode(codes).shape == video.shape
    assert model.encoder.net[-1][-1].out_channels == 4  # one value per code bit, no log-variance
    reconstruction, penalties = model(video)
    assert set(penalties) == {"commit", "entropy"}
    (reconstruction.square().sum() + penalties["commit"]).backward()
    first = model.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0  # the decoder's loss reaches the encoder
    with pytest.raises(ValueError, match="moments: a lfq autoencoder has no Gaussian posterior"):
        model.moments(video)
    with pytest.raises(ValueError, match=r"bottleneck must be one of \('kl', 'lfq'\), got 'vq'"):
        AutoencoderConfig(bottleneck="vq")


def test_quantize_and_lfq_penalties():
    z = torch.tensor([-0.3, 0.0, 2.0], requires_grad=True)
    q = quantize(z)
    assert q.tolist() == [-1.0, 1.0, 1.0]
    q.sum().backward()
    assert z.grad.tolist() == [1.0, 1.0, 1.0]  # straight through
    # commitment: squared distance to the codes
    z = torch.tensor([0.5, -1.0, 1.0, -2.0]).view(1, 1, 1, 2, 2)
    assert lfq_penalties(z)["commit"].item() == pytest.approx(0.25 + 0 + 0 + 1)

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    # entropy: per-position bit entropies minus positions x the entropy of the bits' mean probability
    z = torch.tensor([[1.0, -1.0], [1.0, 1.0]]).view(1, 2, 1, 1, 2)  # channel 0: both +1; channel 1: -1, +1
    p = 1 / (1 + math.exp(-4))
    expected = 4 * h(p) - 2 * (h(p) + h(0.5))
    assert lfq_penalties(z)["entropy"].item() == pytest.approx(expected, rel=1e-5)
    # diverse confident codes score lower than one repeated code
    assert lfq_penalties(torch.tensor([[3.0, -3.0]]).view(1, 1, 1, 1, 2))["entropy"] < \
        lfq_penalties(torch.tensor([[3.0, 3.0]]).view(1, 1, 1, 1, 2))["entropy"]


def test_lfq_training_steps_lower_the_loss_and_resume(tmp_path):
    args = trainer.parse_args(["--out", str(tmp_path), "--steps", "20", *TINY_ARGS, "--bottleneck", "lfq"])
    state = trainer.start(args, torch.device("cpu"))
    assert state.model.config.bottleneck == "lfq"
    dataset = trainer.training_dataset(args, state.model.config)
    losses = []
    for _ in range(20):
        state.data_index = 0
        terms = trainer.train_step(args, state, dataset, torch.device("cpu"))
        losses.append(terms["loss"])
    assert set(terms) == {"loss", "recon", "edge", "commit", "entropy", "lr"}
    assert losses[-1] < 0.6 * losses[0], losses
    trainer.save(args, state)
    assert CausalVideoAutoencoder.load(str(tmp_path)).config == LFQ
