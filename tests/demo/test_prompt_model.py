"""The learned prompt expander (vdit.demo.prompt_model, trained by vdit.demo.prompt_training)."""
import os
import random
import shutil

import pytest

from vdit.demo.checkpoint import CheckpointError
from vdit.demo.data import ShapesDataset
from vdit.demo.prompt_model import ASSETS, CONFIG_FILE, WEIGHTS_FILE, LearnedExpander, load_expander
from vdit.demo.prompt_training import example, train
from vdit.demo.prompts import expand, expand_detailed, expand_prompts


def _kept(prompt: str, intent: dict, seed: int) -> tuple[int, int]:
    """(given slots kept, given slots) of the learned expansion of a generated prompt."""
    result = expand_detailed(prompt, seed=seed, method="learned")
    right = total = 0
    for i, want in enumerate(intent["objects"]):
        got = result.objects[i] if i < len(result.objects) else None
        for slot, value in want.items():
            total += 1
            right += got is not None and getattr(got, slot) == value
    if intent["background"]:
        total += 1
        right += [result.background, result.background2][:len(intent["background"])] == intent["background"]
    return right, total


def test_learned_expander_keeps_given_slots_on_generated_prompts():
    rng = random.Random("test-prompts")  # not the training stream ("expander/0")
    right = total = 0
    for i in range(300):
        words, _, intent = example(rng)
        r, t = _kept(" ".join(words), intent, seed=i)
        right, total = right + r, total + t
    assert total > 500 and right / total >= 0.98, (right, total)


@pytest.mark.parametrize("prompt,want", [
    ("crimson ball heading west on black", ("red", "circle", "moves to the left", "black")),
    ("on a navy backdrop, a tiny golden pyramid sinking", ("yellow", "triangle", "moves down", "navy")),
    ("turquoise cube drifting to the top left against grey", ("cyan", "square", "moves up and to the left", "gray")),
    ("motionless violet disc on white", ("purple", "circle", "stays still", "white")),
])
def test_learned_expander_reads_synonyms_and_word_orders(prompt, want):
    for seed in range(5):
        result = expand_detailed(prompt, seed=seed, method="learned")
        obj = result.objects[0]
        assert (obj.color, obj.shape, obj.motion, result.background) == want, result.caption
        assert result.unknown == []


def test_learned_expander_reads_misspelt_slot_words_and_says_so():
    result = expand_detailed("greeen bal going lefft", seed=0, method="learned")
    obj = result.objects[0]
    assert (obj.color, obj.shape, obj.motion) == ("green", "circle", "moves to the left")
    assert {"greeen", "bal", "lefft"} <= set(result.unknown)  # reported although read


def test_learned_expander_reports_unknown_far_and_speed_words():
    result = expand_detailed("a pink ball zorbling fast to the left", seed=0, method="learned")
    assert {"pink", "zorbling", "fast"} <= set(result.unknown)
    assert "color" not in result.given[0] and result.objects[0].motion == "moves to the left"
    assert any("no speed" in note for note in result.notes)


def test_learned_seeded_choices_are_deterministic_and_varied():
    captions = [expand("a red ball", seed=seed, method="learned") for seed in range(20)]
    assert captions == [expand("a red ball", seed=seed, method="learned") for seed in range(20)]
    assert len(set(captions)) >= 10
    # the same slots read -> the same caption as the rule-based reader at every seed
    assert captions == [expand("a red ball", seed=seed, method="rules") for seed in range(20)]


def test_learned_expander_keeps_grammar_captions():
    dataset = ShapesDataset(seed=2)
    for i in range(40):
        caption = dataset.spec(i)[0].caption()
        assert expand(caption, seed=i, method="learned") == caption


def test_unknown_method_names_the_argument():
    with pytest.raises(ValueError, match="method"):
        expand("a red ball", method="neural")


def _copy_assets(tmp_path):
    target = tmp_path / "expander"
    shutil.copytree(ASSETS, target)
    return target


def test_corrupted_weights_give_a_one_line_error_naming_the_file(tmp_path):
    target = _copy_assets(tmp_path)
    weights = target / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        LearnedExpander.load(str(target))
    assert str(weights) in str(info.value) and "\n" not in str(info.value)


def test_corrupted_config_gives_a_one_line_error_naming_the_file(tmp_path):
    target = _copy_assets(tmp_path)
    (target / CONFIG_FILE).write_text('{"buckets": 16')
    with pytest.raises(CheckpointError) as info:
        LearnedExpander.load(str(target))
    assert str(target / CONFIG_FILE) in str(info.value) and "\n" not in str(info.value)
    os.remove(target / CONFIG_FILE)
    with pytest.raises(CheckpointError, match="not found"):
        LearnedExpander.load(str(target))


def test_training_is_deterministic():
    first, config = train(examples=64, epochs=1, batch=32, log=None)
    second, _ = train(examples=64, epochs=1, batch=32, log=None)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert a.equal(b), name
    assert config["tags"] and "crimson" in config["vocabulary"]


def test_learned_expander_guesses_are_reported_and_can_be_refused():
    expander = load_expander()
    words = ["a", "red", "zebra", "gallops", "left"]
    assert expander.tag(words, min_confidence=1.01)[2:4] == ["unknown", "unknown"]  # known words keep their tags
    assert expander.tag(words, min_confidence=1.01)[1] == "color:red"
    result = expand_detailed("a red zebra gallops left", seed=0, method="learned")
    assert {"zebra", "gallops"} <= set(result.unknown)


def test_learned_expander_reports_a_far_two_word_colour_as_one_name():
    result = expand_detailed("a light blue ball", seed=0, method="learned")
    assert "lightblue" in result.unknown and "color" not in result.given[0]


def test_expand_prompts_passes_the_method_on():
    lines = []
    captions = expand_prompts(["greeen bal going lefft"], seed=0, echo=lines.append, method="learned")
    assert captions == [expand("greeen bal going lefft", seed=0, method="learned")]
    assert any("'greeen' read as color:green" in line for line in lines)
    assert expand_prompts(["greeen bal"], seed=0, echo=None, method="rules") != expand_prompts(
        ["greeen bal"], seed=0, echo=None, method="learned")
