"""Prompt expansion: map a short free-form prompt onto the demo's caption grammar.

The demo model is trained on captions of one grammar (vdit.demo.data), e.g. "a red circle moves to the left on
a black background"; a user who types "crimson ball going left" is off that grammar and the model follows the
prompt far less well. As Sora rewrites short prompts into the detailed captions it was trained on, ``expand``
rewrites the prompt into a grammar caption:

- synonyms and word order ("ball" / "disc" -> circle, "going left" / "westward" -> moves to the left,
  "getting bigger" -> grows) are matched from the tables below;
- a colour name beyond the palette is mapped to the nearest palette colour in CIE Lab, from matplotlib's CSS4
  and xkcd named colours, if one lies within ``COLOUR_THRESHOLD``; a farther one ("brown", "pink") is reported,
  never silently replaced;
- slots the user left out are drawn like the training data (seeded), and never override a slot the user gave;
- words that match nothing and are not filler are reported in ``Expansion.unknown``.

    >>> expand("crimson ball going left", seed=0)   # doctest: +SKIP
    'a red circle moves to the left on a gray background'
"""
from __future__ import annotations

import dataclasses
import math
import random
import re

from vdit.demo.data import BACKGROUNDS, COLORS, HELD_OUT, MOTIONS, SHAPES, SIZES, ObjectSpec, VideoSpec, vocabulary

SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "ball": "circle", "balls": "circle", "disc": "circle",
    "disk": "circle", "dot": "circle", "dots": "circle", "orb": "circle", "sphere": "circle", "round": "circle",
    "blob": "circle", "bubble": "circle", "coin": "circle", "ring": "circle",
    "square": "square", "squares": "square", "box": "square", "boxes": "square", "cube": "square",
    "rectangle": "square", "block": "square", "tile": "square", "rect": "square",
    "triangle": "triangle", "triangles": "triangle", "pyramid": "triangle", "wedge": "triangle",
    "arrowhead": "triangle", "tri": "triangle",
}
SIZE_WORDS = {
    "small": "small", "tiny": "small", "little": "small", "mini": "small", "smaller": "small", "petite": "small",
    "medium": "medium", "mid": "medium", "average": "medium", "normal": "medium", "moderate": "medium",
    "large": "large", "big": "large", "huge": "large", "giant": "large", "massive": "large", "enormous": "large",
    "bigger": "large", "larger": "large",
}
# Phrases are matched longest first, so "getting bigger" is a scaling and "big" alone a size.
SCALING_PHRASES = {
    "grows": "grows", "grow": "grows", "growing": "grows", "expands": "grows", "expanding": "grows",
    "expand": "grows", "swelling": "grows", "swells": "grows", "enlarging": "grows", "inflating": "grows",
    "getting bigger": "grows", "gets bigger": "grows", "getting larger": "grows", "gets larger": "grows",
    "becoming bigger": "grows", "zooming in": "grows", "scaling up": "grows",
    "shrinks": "shrinks", "shrink": "shrinks", "shrinking": "shrinks", "contracting": "shrinks",
    "contracts": "shrinks", "deflating": "shrinks", "getting smaller": "shrinks", "gets smaller": "shrinks",
    "becoming smaller": "shrinks", "zooming out": "shrinks", "scaling down": "shrinks", "dwindling": "shrinks",
}
# Direction words give (dx, dy) components, combined per object: "up" + "left" -> "moves up and to the left".
DIRECTION_WORDS = {
    **dict.fromkeys(("left", "leftward", "leftwards", "west", "westward", "westwards"), (-1, 0)),
    **dict.fromkeys(("right", "rightward", "rightwards", "east", "eastward", "eastwards"), (1, 0)),
    **dict.fromkeys(("up", "upward", "upwards", "rising", "rises", "rise", "ascending", "ascends", "climbing",
                     "climbs", "north", "northward", "northwards", "top", "upper", "floating", "floats"), (0, -1)),
    **dict.fromkeys(("down", "downward", "downwards", "falling", "falls", "fall", "dropping", "drops", "sinking",
                     "sinks", "descending", "descends", "south", "southward", "southwards", "bottom", "lower"),
                    (0, 1)),
    "northwest": (-1, -1), "northeast": (1, -1), "southwest": (-1, 1), "southeast": (1, 1),
}
STILL_PHRASES = ("still", "stationary", "static", "motionless", "stays", "staying", "standing", "idle", "frozen",
                 "resting", "not moving", "doesn t move", "does not move", "sits", "sitting", "parked", "unmoving")
MOVING_WORDS = {"moves", "moving", "move", "going", "goes", "heading", "heads", "drifting", "drifts", "sliding",
                "slides", "travels", "traveling", "travelling", "flying", "flies", "gliding", "glides", "rolling",
                "rolls", "shooting", "running", "runs", "bouncing", "racing", "zooming", "sweeping", "crawling",
                "scrolling", "panning", "passing", "cruising"}
BACKGROUND_WORDS = {"background", "backdrop", "bg", "backround", "backgrounds", "scene", "canvas", "field", "sky"}
BACKGROUND_PREPOSITIONS = {"on", "against", "over", "in", "upon", "onto"}
SECOND_OBJECT_WORDS = {"and", "with", "plus", "while", "beside", "next", "alongside", "another"}
FILLER = set("""
a across against all along alongside an and animation another are around as at becoming being beside bright
by clip color colored colour coloured corner cross dark deep diagonal diagonally direction edge frame from
get gets getting go in into is it its itself just kind light make me next object of on one onto out over
pale plain please plus quite s screen shape show showing shows side size sized solid some something sort
stay stays t that the then there thing to toward towards upon very video way which while who with
""".split())  # words that carry no slot
# The grammar has no speed: these are reported as requests it cannot express.
SPEED_WORDS = {"fast", "quickly", "quick", "slowly", "slow", "rapidly", "gently", "speedy", "swiftly", "steadily"}
ALIASES = {"grey": "gray", "violet": "purple", "magenta": "purple", "teal": "cyan", "aqua": "cyan",
           "lime": "green", "scarlet": "red", "gold": "yellow", "golden": "yellow", "turquoise": "cyan"}
COLOUR_THRESHOLD = 30.0  # CIE76 distance in Lab; crimson -> red is 21, pink -> white 28 is rejected by chroma
_ACHROMATIC = 15.0  # Lab chroma below which a colour counts as a gray


@dataclasses.dataclass
class Expansion:
    """The result of :func:`expand_detailed`.

    caption: the grammar caption. objects: one ObjectSpec per object; background, background2: its background.
    given: per object, the slots the user set ({"color", "shape", "size", "motion", "scaling"}), plus
    ``background_given``. unknown: prompt words that matched nothing; notes: one human-readable line per
    unknown word or mapping made (e.g. "'crimson' -> red").
    """

    caption: str
    objects: list[ObjectSpec]
    background: str
    background2: str | None
    given: list[set[str]]
    background_given: bool
    unknown: list[str]
    notes: list[str]


def _lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB in [0, 1] -> CIE Lab (D65)."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def _named_colours() -> dict[str, tuple[float, float, float]]:
    """Named colours (CSS4 first, then one-word xkcd names) -> sRGB; empty without matplotlib."""
    try:
        from matplotlib.colors import CSS4_COLORS, XKCD_COLORS, to_rgb
    except ImportError:  # the palette's own names still work
        return {}
    table = {key[5:]: to_rgb(v) for key, v in XKCD_COLORS.items() if " " not in key}
    table.update({name: to_rgb(v) for name, v in CSS4_COLORS.items()})
    return table


_NAMED = _named_colours()


def nearest_colour(name: str, palette: dict = COLORS, threshold: float = COLOUR_THRESHOLD) -> tuple[str | None, float]:
    """The palette colour nearest to the named colour ``name`` in Lab and its distance; ``(None, d)`` when the
    nearest is farther than ``threshold`` or a chromatic colour would map onto a gray/white one; ``(None, inf)``
    for a name not in the table."""
    if name in palette:
        return name, 0.0
    if name in ALIASES and ALIASES[name] in palette:
        return ALIASES[name], 0.0
    if name not in _NAMED:
        return None, math.inf
    target = _lab(_NAMED[name])
    distance, best = min((math.dist(target, _lab(rgb)), key) for key, rgb in palette.items())
    chroma = math.hypot(target[1], target[2])
    best_chroma = math.hypot(*_lab(palette[best])[1:])
    if distance > threshold or (chroma > _ACHROMATIC) != (best_chroma > _ACHROMATIC):
        return None, distance
    return best, distance


def _tokens(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def _phrase_at(words: list[str], i: int, phrases) -> str | None:
    """The longest phrase of ``phrases`` (space-separated words) starting at ``words[i]``."""
    for n in (3, 2, 1):
        phrase = " ".join(words[i:i + n])
        if len(words) >= i + n and phrase in phrases:
            return phrase
    return None


def _is_colour(word: str) -> bool:
    return word in COLORS or word in BACKGROUNDS or word in ALIASES or word in _NAMED


def _colour_word(words: list[str], i: int) -> tuple[str, int] | None:
    """(colour name, words used) of a colour at ``words[i]``: "dark red" -> darkred when that is a name; two
    colour words in a row name one shade ("lime green" -> limegreen, "snow white" -> white), never two objects."""
    following = words[i + 1] if i + 1 < len(words) else ""
    if words[i] + following in _NAMED and (words[i] in {"dark", "light", "bright", "pale", "deep", "hot", "sky"}
                                           or _is_colour(words[i]) and _is_colour(following)):
        return words[i] + following, 2
    if words[i] in _NAMED and words[i] not in COLORS | BACKGROUNDS.keys() and following in COLORS:  # its hue
        return following, 2
    return (words[i], 1) if _is_colour(words[i]) else None


BACKGROUND_ALIASES = {"dark": "black", "grey": "gray", "silver": "gray", "blue": "navy", "darkblue": "navy",
                      "midnight": "navy", "midnightblue": "navy"}
_SLOTS = ("color", "shape", "size", "motion", "scaling")


@dataclasses.dataclass
class _Parse:
    """What the prompt said: per object a dict of given slots (plus direction components and 'moving')."""

    objects: list[dict] = dataclasses.field(default_factory=lambda: [{}])
    background: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def object_for(self, slot: str) -> dict:
        """The object a new ``slot`` word belongs to: a new one once the current has that slot or a shape."""
        current = self.objects[-1]
        if slot in current or (slot in ("color", "size") and "shape" in current):
            self.objects.append({})
        return self.objects[-1]

    def report(self, word: str, note: str) -> None:
        self.unknown.append(word)
        self.notes.append(note)


def _background_span(words: list[str], i: int, used: int) -> list[tuple[str, int]] | None:
    """The background colours named by the colour at ``words[i]`` ("black background", "on black", "on a black
    and white backdrop") with their word counts, or None when that colour is an object's."""
    j = i + used
    if j + 1 < len(words) and words[j] == "and" and (second := _colour_word(words, j + 1)):
        if j + 1 + second[1] < len(words) and words[j + 1 + second[1]] in BACKGROUND_WORDS:
            return [("".join(words[i:j]), used), (second[0], second[1] + 1)]
    if j < len(words) and words[j] in BACKGROUND_WORDS:
        return [("".join(words[i:j]), used)]
    k = i - 1
    while k >= 0 and words[k] in {"a", "an", "the", "plain", "solid"}:
        k -= 1
    following = words[j] if j < len(words) else ""
    if k >= 0 and words[k] in BACKGROUND_PREPOSITIONS and following not in SHAPE_WORDS | SIZE_WORDS.keys():
        second = _colour_word(words, j + 1) if following == "and" else None
        after = words[j + 1 + second[1]] if second and j + 1 + second[1] < len(words) else ""
        if second and after not in SHAPE_WORDS | SIZE_WORDS.keys():  # "on black and white"
            return [("".join(words[i:j]), used), (second[0], second[1] + 1)]
        return [("".join(words[i:j]), used)]
    return None


def _background_colour(name: str, state: _Parse) -> None:
    colour = BACKGROUND_ALIASES.get(name, name)
    found, _ = nearest_colour(colour, BACKGROUNDS)
    if found is None:
        state.report(name, f"the background palette ({', '.join(BACKGROUNDS)}) has no colour near {name!r}")
    else:
        if found != name:
            state.notes.append(f"{name!r} -> {found} background")
        state.background.append(found)


def _object_colour(name: str, state: _Parse) -> None:
    found, distance = nearest_colour(name)
    if found is None:
        nearest = "" if math.isinf(distance) else f" (nearest is {distance:.0f} Lab units away)"
        state.report(name, f"the palette ({', '.join(COLORS)}) has no colour near {name!r}{nearest}; "
                           "colour left to chance")
        state.object_for("color")["color"] = None
        return
    if found != name:
        state.notes.append(f"{name!r} -> {found}")
    state.object_for("color")["color"] = found


def _match_colour(words: list[str], i: int, state: _Parse) -> int:
    """Consume a colour (object or background) at ``words[i]``; returns the words used, 0 if none."""
    colour = _colour_word(words, i)
    if colour is None and not (words[i] == "dark" and i + 1 < len(words) and words[i + 1] in BACKGROUND_WORDS):
        return 0
    name, used = colour or ("dark", 1)
    span = _background_span(words, i, used)
    if span is None:
        _object_colour(name, state)
        return used
    total = 0
    for bg_name, n in span:
        _background_colour(bg_name or name, state)
        total += n
    return total + (1 if len(span) == 1 and i + total < len(words) and words[i + total] in BACKGROUND_WORDS else 0)


def _match_motion(words: list[str], i: int, state: _Parse) -> int:
    """Consume a scaling, still, direction or moving phrase at ``words[i]``; returns the words used."""
    phrase = _phrase_at(words, i, SCALING_PHRASES)
    if phrase:
        state.object_for("scaling")["scaling"] = SCALING_PHRASES[phrase]
        return len(phrase.split())
    phrase = _phrase_at(words, i, STILL_PHRASES)
    if phrase:
        state.objects[-1]["still"] = True
        return len(phrase.split())
    word = words[i]
    if word in DIRECTION_WORDS:
        dx, dy = DIRECTION_WORDS[word]
        obj = state.objects[-1]
        obj["dx"] = dx if dx else obj.get("dx", 0)
        obj["dy"] = dy if dy else obj.get("dy", 0)
        return 1
    if word in MOVING_WORDS:
        state.objects[-1]["moving"] = True
        return 1
    return 0


def _parse(prompt: str) -> _Parse:
    """Read the slots of ``prompt`` into a :class:`_Parse`."""
    words, state, i = _tokens(prompt), _Parse(), 0
    while i < len(words):
        word = words[i]
        used = _match_motion(words, i, state) or _match_colour(words, i, state)
        if used:
            i += used
            continue
        if word in SHAPE_WORDS:
            state.object_for("shape")["shape"] = SHAPE_WORDS[word]
        elif word in SIZE_WORDS:
            state.object_for("size")["size"] = SIZE_WORDS[word]
        elif word in SPEED_WORDS:
            state.report(word, f"the grammar has no speed: {word!r} cannot be followed")
        elif word not in FILLER and word not in BACKGROUND_WORDS and word not in SECOND_OBJECT_WORDS:
            state.report(word, f"unknown word {word!r} ignored")
        i += 1
    state.objects = [o for o in state.objects if o] or [{}]
    return state


def _motion_of(obj: dict, rng: random.Random) -> str:
    """The given motion of a parsed object, or one drawn (a moving one when the prompt says it moves)."""
    if obj.get("still"):
        return "stays still"
    direction = (obj.get("dx", 0), obj.get("dy", 0))
    if direction != (0, 0):
        return next(name for name, d in MOTIONS.items() if d == direction)
    moving = [m for m in MOTIONS if m != "stays still"]
    return rng.choice(moving if obj.get("moving") else list(MOTIONS))


def _given_slots(obj: dict) -> set[str]:
    given = {slot for slot in ("shape", "size", "scaling") if slot in obj}
    if obj.get("color"):
        given.add("color")
    if obj.get("still") or obj.get("dx") or obj.get("dy"):
        given.add("motion")
    return given


def _fill_object(obj: dict, taken: set[str], rng: random.Random) -> ObjectSpec:
    """An ObjectSpec with the parsed slots of ``obj`` and the rest drawn as training draws them, avoiding the
    colours in ``taken`` and (where a slot is free) the held-out (colour, shape, motion) combinations."""
    given = _given_slots(obj)
    free_colours = [c for c in COLORS if c not in taken] or list(COLORS)
    for _ in range(100):
        colour = obj["color"] if "color" in given else rng.choice(free_colours)
        shape = obj.get("shape") or rng.choice(SHAPES)
        motion = _motion_of(obj, rng)
        if (colour, shape, motion) not in HELD_OUT or {"color", "shape", "motion"} <= given:
            break
    size = obj.get("size") or rng.choice(list(SIZES))
    scaling = obj["scaling"] if "scaling" in obj else rng.choice(["", "", "", "grows", "shrinks"])
    return ObjectSpec(shape, colour, size, motion, scaling)


def _fill_background(state: _Parse, rng: random.Random) -> tuple[str, str | None]:
    """The given background (one or two colours) or one drawn as training draws it, never an object's colour."""
    if state.background:
        return state.background[0], (state.background[1] if len(state.background) > 1 else None)
    colours = {o.get("color") for o in state.objects}
    choices = [b for b in BACKGROUNDS if b not in colours]
    background = rng.choice(choices)
    second = None
    if rng.random() < 0.2:
        second = rng.choice([b for b in choices if b != background])
    return background, second


def _apply_tag(tag: str, word: str, state: _Parse) -> None:
    """Set the slot the tag ``tag`` of ``word`` names on ``state`` (see vdit.demo.prompt_model for the tags)."""
    kind, _, value = tag.partition(":")
    if kind == "color":
        if word != value:
            state.notes.append(f"{word!r} -> {value}")
        state.object_for("color")["color"] = value
    elif kind == "bg":
        if word != value:
            state.notes.append(f"{word!r} -> {value} background")
        state.background.append(value)
    elif kind in ("shape", "size"):
        state.object_for(kind)[kind] = value
    elif kind in ("grows", "shrinks"):
        state.object_for("scaling")["scaling"] = kind
    elif kind in ("still", "moving"):
        state.objects[-1][kind] = True
    elif kind == "dir":
        dx, dy = (int(v) for v in value.split(","))
        obj = state.objects[-1]
        obj["dx"] = dx if dx else obj.get("dx", 0)
        obj["dy"] = dy if dy else obj.get("dy", 0)
    elif kind == "far":
        state.report(word, f"the palette ({', '.join(COLORS)}) has no colour near {word!r}; colour left to chance")
        state.object_for("color")["color"] = None
    elif kind == "bgfar":
        state.report(word, f"the background palette ({', '.join(BACKGROUNDS)}) has no colour near {word!r}")
    elif kind == "speed":
        state.report(word, f"the grammar has no speed: {word!r} cannot be followed")
    elif kind == "unknown":
        state.report(word, f"unknown word {word!r} ignored")


def read_tags(words: list[str], tags: list[str], known: frozenset[str] | set[str]) -> _Parse:
    """The slots of a prompt whose words ``words`` were tagged ``tags`` by the learned tagger, in the structure
    the rule-based reader fills. A run of equal tags is one mention ("lime green", "getting bigger"); a word
    outside ``known`` (the tagger's training words) is reported even when its tag is used."""
    state, runs = _Parse(), []
    for word, tag in zip(words, tags):
        if word not in known and tag != "unknown":
            state.report(word, f"unknown word {word!r} read as {tag}")
        if runs and runs[-1][0] == tag and tag.partition(":")[0] in _MERGED_TAGS:
            runs[-1][1].append(word)
        else:
            runs.append((tag, [word]))
    for tag, run in runs:
        _apply_tag(tag, "".join(run), state)  # "light blue" is reported as the colour table's "lightblue"
    state.objects = [o for o in state.objects if o] or [{}]
    return state


_MERGED_TAGS = {"color", "bg", "grows", "shrinks", "still", "far", "bgfar"}


def _learned_parse(prompt: str) -> _Parse:
    from vdit.demo.prompt_model import parse  # the learned tagger loads its weights on first use

    return parse(prompt)


def _in_grammar(prompt: str, state: _Parse) -> bool:
    """Whether ``prompt`` is already a full grammar caption: only grammar words, every object's colour, shape
    and motion, and a background."""
    complete = all({"color", "shape", "motion"} <= _given_slots(o) for o in state.objects)
    return complete and bool(state.background) and set(_tokens(prompt)) <= set(vocabulary())


METHODS = ("rules", "learned")
DEFAULT_METHOD = "learned"  # why: benchmarks/results/cpu-prompt-expansion.md


def expand_detailed(prompt: str, *, seed: int | None = None, method: str | None = None) -> Expansion:
    """Expand ``prompt`` into a grammar caption, with the slots, which the user gave, and the unknown words.

    ``seed`` picks the slots left out (one seed, one choice); None draws fresh randomness. ``method`` reads the
    slots: "rules" (the tables above), "learned" (vdit.demo.prompt_model) or None (``DEFAULT_METHOD``).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    method = DEFAULT_METHOD if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rng = random.Random(seed)
    state = _parse(prompt) if method == "rules" else _learned_parse(prompt)
    if _in_grammar(prompt, state):  # a caption already in the grammar means medium size, no scaling
        for obj in state.objects:
            obj.setdefault("size", "medium")
            obj.setdefault("scaling", "")
    background, background2 = _fill_background(state, rng)
    taken = {background, background2} | {o["color"] for o in state.objects if o.get("color")}
    objects = []
    for obj in state.objects:
        spec = _fill_object(obj, taken, rng)
        taken.add(spec.color)
        objects.append(spec)
    for obj, spec in zip(state.objects, objects):
        if "color" in _given_slots(obj) and spec.color in (background, background2):
            state.notes.append(f"the prompt asks for a {spec.color} object on a {spec.color} background")
    caption = VideoSpec(0, 0, 0, background, background2, objects).caption()
    return Expansion(caption, objects, background, background2, [_given_slots(o) for o in state.objects],
                     bool(state.background), state.unknown, state.notes)


def expand(prompt: str, *, seed: int | None = None, method: str | None = None) -> str:
    """The grammar caption for the short prompt ``prompt`` (see :func:`expand_detailed`)."""
    return expand_detailed(prompt, seed=seed, method=method).caption


def expand_prompts(prompts: list[str], *, seed: int | None = None, echo=print, method: str | None = None) -> list[str]:
    """Each prompt of ``prompts`` expanded (the i-th with seed ``seed + i``) by ``method``, telling ``echo`` each
    expanded caption and every note (unknown words, colour mappings); the command lines' ``--expand-prompt``."""
    captions = []
    for i, prompt in enumerate(prompts):
        result = expand_detailed(prompt, seed=None if seed is None else seed + i, method=method)
        if echo is not None:
            echo(f"expanded {prompt!r} -> {result.caption!r}")
            for note in result.notes:
                echo(f"  note: {note}")
        captions.append(result.caption)
    return captions
