"""Prompt expansion (vdit.demo.prompts): short free-form prompts -> the demo's caption grammar."""
import pytest

from tests.demo.test_cli import GENERATE, run_cli, tiny_weights  # noqa: F401 (tiny_weights is a fixture)
from vdit.demo import prompts
from vdit.demo.data import BACKGROUNDS, COLORS, MOTIONS, SHAPES, SIZES, ShapesDataset, vocabulary
from vdit.demo.prompts import expand, expand_detailed, expand_prompts, nearest_colour
from vdit.demo.text import WordTokenizer

SEEDS = range(12)


@pytest.fixture(autouse=True)
def rule_reader(monkeypatch):
    """These tests pin the rule-based reader (the learned one, the default, has tests/demo/test_prompt_model.py)."""
    monkeypatch.setattr(prompts, "DEFAULT_METHOD", "rules")


def test_given_slots_are_kept_at_every_seed():
    for seed in SEEDS:
        result = expand_detailed("a large green triangle moving up and shrinking on a white background", seed=seed)
        obj, = result.objects
        assert (obj.color, obj.shape, obj.size, obj.motion, obj.scaling) == (
            "green", "triangle", "large", "moves up", "shrinks")
        assert result.background == "white" and result.background_given
        assert result.given == [{"color", "shape", "size", "motion", "scaling"}] and result.unknown == []


@pytest.mark.parametrize("prompt,slot,value", [
    ("red ball", "shape", "circle"), ("red disc", "shape", "circle"), ("red dot", "shape", "circle"),
    ("blue box", "shape", "square"), ("blue cube", "shape", "square"), ("blue rectangle", "shape", "square"),
    ("pyramid", "shape", "triangle"),
    ("ball going left", "motion", "moves to the left"), ("leftward ball", "motion", "moves to the left"),
    ("ball to the left", "motion", "moves to the left"), ("westward ball", "motion", "moves to the left"),
    ("rising ball", "motion", "moves up"), ("ball going up", "motion", "moves up"),
    ("falling box", "motion", "moves down"), ("box heading east", "motion", "moves to the right"),
    ("dot drifting to the top left", "motion", "moves up and to the left"),
    ("dot sliding down and right", "motion", "moves down and to the right"),
    ("a motionless square", "motion", "stays still"), ("cube not moving", "motion", "stays still"),
    ("growing ball", "scaling", "grows"), ("ball getting bigger", "scaling", "grows"),
    ("shrinking box", "scaling", "shrinks"), ("box getting smaller", "scaling", "shrinks"),
    ("tiny ball", "size", "small"), ("big ball", "size", "large"), ("huge box", "size", "large"),
])
def test_synonyms_and_word_order(prompt, slot, value):
    for seed in SEEDS:
        result = expand_detailed(prompt, seed=seed)
        assert getattr(result.objects[0], slot) == value, (prompt, seed, result.caption)
        assert slot in result.given[0]


def test_big_is_a_size_but_getting_bigger_is_growth():
    result = expand_detailed("big ball getting bigger", seed=0)
    assert (result.objects[0].size, result.objects[0].scaling) == ("large", "grows")


@pytest.mark.parametrize("name,colour", [("crimson", "red"), ("tomato", "red"), ("firebrick", "red"),
                                         ("gold", "yellow"), ("turquoise", "cyan"), ("darkorange", "orange"),
                                         ("limegreen", "green"), ("darkviolet", "purple"), ("red", "red")])
def test_named_colours_map_to_the_nearest_palette_colour(name, colour):
    assert nearest_colour(name)[0] == colour
    assert expand_detailed(f"a {name} circle", seed=0).objects[0].color == colour


@pytest.mark.parametrize("name", ["brown", "pink", "black", "gray", "lightblue", "maroon"])
def test_far_colours_are_reported_never_replaced_silently(name):
    found, distance = nearest_colour(name)
    assert found is None and distance > 0
    result = expand_detailed(f"a {name} ball going left", seed=0)
    assert name in result.unknown
    assert any(f"no colour near {name!r}" in note for note in result.notes)
    assert "color" not in result.given[0]


@pytest.mark.parametrize("prompt,colour", [("lime green cube rising", "green"), ("snow white ball", "white"),
                                           ("emerald green box", "green"), ("sky blue disc", "cyan")])
def test_two_colour_words_in_a_row_name_one_shade_of_one_object(prompt, colour):
    for seed in SEEDS:
        result = expand_detailed(prompt, seed=seed)
        assert len(result.objects) == 1 and result.objects[0].color == colour, result.caption


def test_a_shade_word_before_a_background_colour_stays_the_background():
    result = expand_detailed("white square on black", seed=0)
    assert result.objects[0].color == "white" and result.background == "black"


def test_two_word_colour_names_are_read():
    assert "lightblue" in expand_detailed("a light blue ball", seed=0).unknown
    assert expand_detailed("a dark orange ball", seed=0).objects[0].color == "orange"


def test_unknown_words_are_reported():
    result = expand_detailed("a red zebra gallops left quickly", seed=0)
    assert {"zebra", "gallops", "quickly"} <= set(result.unknown)
    assert any("no speed" in note for note in result.notes)
    assert result.objects[0].color == "red" and result.objects[0].motion == "moves to the left"


def test_backgrounds_and_second_objects():
    result = expand_detailed("red ball going left and blue box rising on black", seed=3)
    first, second = result.objects
    assert (first.color, first.shape, first.motion) == ("red", "circle", "moves to the left")
    assert (second.color, second.shape, second.motion) == ("blue", "square", "moves up")
    assert result.background == "black" and result.background2 is None
    two = expand_detailed("cyan triangle on a black and white backdrop", seed=0)
    assert (two.background, two.background2) == ("black", "white")
    bare = expand_detailed("red disc moving left on black and white", seed=0)
    assert (bare.background, bare.background2, len(bare.objects)) == ("black", "white", 1)
    assert len(expand_detailed("red ball on black and blue box", seed=0).objects) == 2
    assert expand_detailed("red ball on a dark background", seed=0).background == "black"
    assert expand_detailed("red ball against grey", seed=0).background == "gray"


def test_seeded_choices_are_reproducible_and_varied():
    captions = [expand("a red ball", seed=seed) for seed in range(20)]
    assert captions == [expand("a red ball", seed=seed) for seed in range(20)]
    results = [expand_detailed("a red ball", seed=seed) for seed in range(20)]
    assert len({r.objects[0].motion for r in results}) >= 5
    assert len({r.background for r in results}) >= 3
    assert len({r.objects[0].size for r in results}) == len(SIZES)


def test_filled_slots_never_contradict_the_prompt():
    for seed in range(30):
        result = expand_detailed("a white ball moving", seed=seed)
        obj = result.objects[0]
        assert obj.color == "white" and obj.shape == "circle" and obj.motion != "stays still"
        assert "white" not in (result.background, result.background2)  # an object never vanishes into its background


def test_captions_in_the_grammar_come_back_unchanged():
    dataset = ShapesDataset(seed=1)
    for i in range(100):
        caption = dataset.spec(i)[0].caption()
        assert expand(caption, seed=i) == caption


@pytest.mark.parametrize("prompt", ["", "something", "red ball going left fast", "tiny brown dot falling",
                                    "two shapes: green box rising and a pink disc", "!!!", "square square square"])
def test_output_parses_as_a_grammar_caption(prompt):
    vocab = set(vocabulary())
    tokenizer = WordTokenizer(vocabulary())
    for seed in SEEDS:
        result = expand_detailed(prompt, seed=seed)
        assert set(result.caption.split()) <= vocab
        assert tokenizer.index["<unk>"] not in tokenizer.encode(result.caption)
        assert result.caption.endswith(" background")
        for obj in result.objects:
            assert obj.color in COLORS and obj.shape in SHAPES and obj.motion in MOTIONS and obj.size in SIZES
        assert result.background in BACKGROUNDS


def test_bad_prompt_type_names_the_argument():
    with pytest.raises(TypeError, match="prompt"):
        expand(None)


def test_expand_prompts_echoes_captions_and_notes():
    lines = []
    captions = expand_prompts(["crimson ball", "brown box"], seed=0, echo=lines.append)
    assert captions == [expand("crimson ball", seed=0), expand("brown box", seed=1)]
    assert any("'crimson' -> red" in line for line in lines)
    assert any("no colour near 'brown'" in line for line in lines)


def test_generate_cli_expands_the_prompt(tmp_path, tiny_weights):  # noqa: F811
    out = tmp_path / "clip.gif"
    result = run_cli(GENERATE, "--prompt", "crimson ball going left fast", "--expand-prompt", "--weights",
                     tiny_weights, "--frames", "2", "--size", "8x8", "--steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    caption = expand("crimson ball going left fast", seed=0)
    assert f"expanded 'crimson ball going left fast' -> {caption!r}" in result.stdout
    assert "no speed" in result.stdout and out.stat().st_size > 0


@pytest.mark.parametrize("method", ["rules", "learned"])
def test_generate_cli_takes_the_expansion_method(tmp_path, tiny_weights, capsys, method):  # noqa: F811
    from vdit.demo.cli.generate import main

    prompt = "crimson ball going left fast"
    assert main(["--prompt", prompt, "--expand-prompt", "--expand-method", method, "--weights", tiny_weights,
                 "--frames", "2", "--size", "8x8", "--steps", "1", "--out", str(tmp_path / "clip.gif")]) == 0
    caption = expand(prompt, seed=0, method=method)
    assert f"expanded {prompt!r} -> {caption!r}" in capsys.readouterr().out


def test_an_unknown_expansion_method_is_refused_by_argparse(tiny_weights, capsys):  # noqa: F811
    from vdit.demo.cli import eval as eval_cli

    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["--weights", tiny_weights, "--expand-prompt", "--expand-method", "magic"])
    assert exc.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err


def test_eval_cli_expands_every_prompt(tiny_weights, capsys):  # noqa: F811
    from vdit.demo.cli import eval as eval_cli

    assert eval_cli.main(["--weights", tiny_weights, "--prompts", "2", "--steps", "1", "--frames", "2", "--size",
                          "8x8", "--seed", "0", "--expand-prompt", "--verbose"]) == 0
    out = capsys.readouterr().out
    # held-out prompts are grammar captions, so expansion keeps them word for word
    assert out.count("expanded ") == 2 and "seed 0" in out
    for line in out.splitlines():
        if line.startswith("expanded "):
            before, after = line[len("expanded "):].split(" -> ")
            assert before == after
