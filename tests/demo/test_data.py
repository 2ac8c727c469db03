"""The demo's shapes dataset (vdit/demo/data.py) and the demo evaluation: its image analysis and report
(vdit/demo/evaluation.py) and its CLI (vdit/demo/cli/eval.py)."""
import torch

from vdit.demo.data import COLORS, HELD_OUT, MOTIONS, ObjectSpec, ShapesDataset, VideoSpec, render, vocabulary
from vdit.demo.evaluation import classify_colour, classify_motion, foreground_masks, held_out_prompts
from vdit.demo.text import WordTokenizer


def test_samples_are_deterministic_and_varied():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in range(5):
        va, ca, _ = a[i]
        vb, cb, _ = b[i]
        assert torch.equal(va, vb) and ca == cb
    shapes = {tuple(ShapesDataset(seed=3)[i][0].shape) for i in range(20)}
    assert len(shapes) > 5  # mixed durations and aspect ratios
    assert ShapesDataset(seed=4)[0][1] != a[0][1] or not torch.equal(ShapesDataset(seed=4)[0][0], a[0][0])


def test_square_crops_are_the_centre_of_the_native_video():
    native, square = ShapesDataset(seed=3, sides=(32, 48)), ShapesDataset(seed=3, sides=(32, 48), square_crops=True)
    wide = 0
    for i in range(10):
        video, caption, spec = native[i]
        crop, crop_caption, crop_spec = square[i]
        side = min(spec.height, spec.width)
        top, left = (spec.height - side) // 2, (spec.width - side) // 2
        assert torch.equal(crop, video[:, :, top:top + side, left:left + side])
        assert crop_caption == caption and (crop_spec.height, crop_spec.width) == (side, side)
        assert square.spec(i)[0] == crop_spec and crop_spec.objects == spec.objects
        wide += spec.height != spec.width
    assert wide > 0


def test_captions_agree_with_labels_and_vocabulary():
    tok = WordTokenizer(vocabulary())
    ds = ShapesDataset(seed=1)
    for i in range(50):
        video, caption, spec = ds[i]
        assert video.shape == (3, spec.frames, spec.height, spec.width) and video.min() >= -1 and video.max() <= 1
        assert caption == spec.caption()
        for o in spec.objects:
            assert o.color in caption and o.shape in caption and o.motion in caption
            assert (o.color, o.shape, o.motion) not in HELD_OUT  # held-out combinations never train
        assert tok.index["<unk>"] not in tok.encode(caption)


def test_image_analysis_recovers_rendered_labels():
    """The evaluation's colour and motion classifiers are right on ground-truth videos."""
    import random

    rng = random.Random(0)
    hits = 0
    cases = [(c, s, m) for (c, s, m) in sorted(HELD_OUT)][:24]
    for colour, shape, motion in cases:
        spec = VideoSpec(16, 48, 48, "black", None, [ObjectSpec(shape, colour, "medium", motion)])
        video = render(spec, rng)
        masks = foreground_masks(video, "black")
        hits += classify_colour(video, masks) == colour and classify_motion(masks) == motion
    assert hits == len(cases)


def test_held_out_prompts_use_every_attribute_seen_in_training():
    prompts = held_out_prompts(10)
    assert len(prompts) == 10 and len({p for p, *_ in prompts}) == 10
    for prompt, colour, shape, motion in prompts:
        assert colour in COLORS and motion in MOTIONS and prompt.startswith(f"a {colour} {shape} {motion}")


def test_evaluate_reports_every_figure_as_a_fraction():
    from vdit.demo.evaluation import evaluate
    from vdit.demo.pipeline import TextEncoderConfig, TextToVideo
    from vdit.models import VideoDiTConfig

    torch.manual_seed(0)
    model = TextToVideo(VideoDiTConfig.preset("tiny", context_dim=32), vocabulary(),
                        TextEncoderConfig(dim=32, depth=1, heads=2))
    result = evaluate(model, held_out_prompts(3), frames=2, size=(8, 8), steps=1, progress=False)
    assert result["prompts"] == 3 and len(result["rows"]) == 3
    for key in ("colour_accuracy", "motion_accuracy", "object_in_every_frame", "mask_iou"):
        assert 0 <= result[key] <= 1, key
    # an untrained model returns its input noise: foreground everywhere, in every frame
    assert result["object_in_every_frame"] == 1 and result["frame_diff"] > 0.5


def test_pooled_weights_each_evaluation_by_its_videos():
    from vdit.demo.evaluation import pooled

    figures = dict(colour_accuracy=1.0, object_in_every_frame=1.0, frame_diff=0.1, mask_iou=0.5)
    total = pooled([dict(figures, prompts=30, motion_accuracy=0.9), dict(figures, prompts=10, motion_accuracy=0.5)])
    assert total["prompts"] == 40 and total["colour_accuracy"] == 1.0
    assert abs(total["motion_accuracy"] - 0.8) < 1e-12
    assert abs(total["motion_stderr"] - (0.8 * 0.2 / 40) ** 0.5) < 1e-12


def test_eval_cli_prints_each_seed_and_the_pooled_figures(capsys):
    from vdit.demo.cli.eval import main

    assert main(["--prompts", "2", "--frames", "2", "--steps", "1", "--seed", "0", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0].endswith(f"(seed {s})") for s, line in zip((0, 3), lines)] == [True, True]
    assert "(seeds 0, 3 pooled): 4 held-out videos" in lines[2] and "one standard error" in lines[2]
