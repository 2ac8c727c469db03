"""Training data and training command of the learned prompt expander (vdit.demo.prompt_model).

    python -m vdit.demo.prompt_training --out vdit/demo/assets/expander     # deterministic, about a minute

The short prompts are generated, never taken from a benchmark list: one or two objects with a random subset of
their slots given, each slot written with a random synonym of the rule tables of :mod:`vdit.demo.prompts`
(colours from the same CSS4 / xkcd colour table, labelled with their nearest palette colour or ``far``), in
varied word orders, with filler, speed words and made-up words (tagged ``unknown``) mixed in. Each example is
(words, one tag per word, the slots it gives), so tests can check that the tagger keeps the given slots.
"""
from __future__ import annotations

import argparse
import random
import string

import torch

from vdit.demo.checkpoint import save_tensors, write_json
from vdit.demo.data import BACKGROUNDS, COLORS, MOTIONS
from vdit.demo.prompt_model import ASSETS, CONFIG_FILE, WEIGHTS_FILE, SlotTagger, batch_features
from vdit.demo.prompts import (
    _NAMED,
    ALIASES,
    BACKGROUND_ALIASES,
    BACKGROUND_WORDS,
    DIRECTION_WORDS,
    FILLER,
    MOVING_WORDS,
    SCALING_PHRASES,
    SHAPE_WORDS,
    SIZE_WORDS,
    SPEED_WORDS,
    STILL_PHRASES,
    nearest_colour,
)

MODIFIERS = ("dark", "light", "bright", "pale", "deep", "hot", "sky")
PREFIXES = ("", "", "", "a", "the", "show me a", "a video of a", "please make a", "clip of a", "one",
            "an animation of a")


def _colour_tables() -> tuple[list[tuple[list[str], str]], list[tuple[list[str], str]]]:
    """(words, tag) of every object colour name and every background colour name of the colour table."""
    names = sorted(name for name in set(COLORS) | set(ALIASES) | set(_NAMED) if name.isalpha())  # not "green/blue"
    objects, backgrounds = [], []
    for name in names:
        found, _ = nearest_colour(name)
        objects.append(([name], f"color:{found}" if found else "far"))
        bg, _ = nearest_colour(BACKGROUND_ALIASES.get(name, name), BACKGROUNDS)
        backgrounds.append(([name], f"bg:{bg}" if bg else "bgfar"))
    for modifier in MODIFIERS:  # "dark red" is read as the table's "darkred"
        for hue in sorted(set(COLORS) | set(BACKGROUNDS)):
            if modifier + hue in _NAMED:
                found, _ = nearest_colour(modifier + hue)
                objects.append(([modifier, hue], f"color:{found}" if found else "far"))
    for alias, bg in BACKGROUND_ALIASES.items():
        backgrounds.append(([alias], f"bg:{bg}"))
    return objects, backgrounds


OBJECT_COLOURS, BACKGROUND_COLOURS = _colour_tables()
_DIRECTION_NAMES = {d: [w for w, v in DIRECTION_WORDS.items() if v == d] for d in set(DIRECTION_WORDS.values())}


def _tagged(words: str | list[str], tag: str) -> list[tuple[str, str]]:
    return [(w, tag) for w in (words.split() if isinstance(words, str) else words)]


def _filler(words: str) -> list[tuple[str, str]]:
    return _tagged(words, "o")


def _direction(rng: random.Random, dx: int, dy: int) -> list[tuple[str, str]]:
    """Words of a direction: a compass word, one component word or "up and to the left" forms."""
    if (dx, dy) in _DIRECTION_NAMES and (dx == 0 or dy == 0 or rng.random() < 0.3):
        return [(rng.choice(_DIRECTION_NAMES[dx, dy]), f"dir:{dx},{dy}")]
    parts = [[(rng.choice(_DIRECTION_NAMES[0, dy]), f"dir:0,{dy}")], [(rng.choice(_DIRECTION_NAMES[dx, 0]),
                                                                        f"dir:{dx},0")]]
    if rng.random() < 0.3:
        parts.reverse()
    joiner = rng.choice([[], _filler("and"), _filler("and to the"), _filler("and")])
    return parts[0] + joiner + parts[1]


def _motion(rng: random.Random, motion: str | None, moving: bool) -> list[tuple[str, str]]:
    """Words of a motion (None with ``moving``: a verb of motion without direction)."""
    if motion == "stays still":
        return _tagged(rng.choice(STILL_PHRASES), "still")
    verb = _tagged(rng.choice(sorted(MOVING_WORDS)), "moving")
    if motion is None:
        return verb
    dx, dy = MOTIONS[motion]
    words = _direction(rng, dx, dy)
    if rng.random() < 0.6:
        words = verb + _filler(rng.choice(["", "", "to the", "towards the", "to"])) + words
    return words


def _spec(rng: random.Random) -> dict:
    """A random set of given slots for one object."""
    spec = {}
    if rng.random() < 0.8:
        spec["color"] = rng.choice(OBJECT_COLOURS if rng.random() < 0.6 else
                                   [c for c in OBJECT_COLOURS if c[0][0] in COLORS | ALIASES.keys()])
    if rng.random() < 0.85:
        spec["shape"] = rng.choice(sorted(SHAPE_WORDS))
    if rng.random() < 0.3:
        spec["size"] = rng.choice(sorted(SIZE_WORDS))
    if rng.random() < 0.75:
        spec["motion"] = rng.choice(list(MOTIONS))
    elif rng.random() < 0.3:
        spec["moving"] = True
    if rng.random() < 0.25:
        spec["scaling"] = rng.choice(sorted(SCALING_PHRASES))
    return spec


def _object_words(rng: random.Random, spec: dict, lead: bool) -> list[tuple[str, str]]:
    """Words of one object; ``lead``: a motion or scaling may come before its colour ("rising red ball")."""
    mods = []
    if "size" in spec:
        mods += _tagged(spec["size"], f"size:{SIZE_WORDS[spec['size']]}")
    if "color" in spec:
        colour = _tagged(*spec["color"])
        mods = mods + colour if rng.random() < 0.8 else colour + mods
    noun = _tagged(spec["shape"], f"shape:{SHAPE_WORDS[spec['shape']]}") if "shape" in spec else \
        _filler(rng.choice(["", "thing", "object", "shape", "one"]))
    motion = _motion(rng, spec.get("motion"), spec.get("moving", False)) if spec.keys() & {"motion", "moving"} else []
    if motion and rng.random() < 0.1:
        motion += [(rng.choice(sorted(SPEED_WORDS)), "speed")]
    scaling = _tagged(spec["scaling"], SCALING_PHRASES[spec["scaling"]]) if "scaling" in spec else []
    before, after = [], [motion, scaling]
    if lead and rng.random() < 0.3:
        single = [part for part in after if len(part) == 1]
        if single:
            before = [rng.choice(single)]
            after = [part for part in after if part is not before[0]]
    after = [part for part in after if part]
    if rng.random() < 0.3:
        after.reverse()
    tail = after[0] + _filler(rng.choice(["and", "while", ""])) + after[1] if len(after) == 2 else sum(after, [])
    return [w for part in before for w in part] + mods + noun + tail


def _background_words(rng: random.Random, colours: list[tuple[list[str], str]]) -> list[tuple[str, str]]:
    """Words of a background of one or two colours."""
    names = [_tagged(*c) for c in colours]
    body = names[0] if len(names) == 1 else names[0] + _filler("and") + names[1]
    noun = _filler(rng.choice(sorted(BACKGROUND_WORDS - {"backgrounds", "backround"})))
    preposition = _filler(rng.choice(["on", "on a", "against a", "over a", "on", "in a", "against"]))
    return rng.choice([preposition + body + noun, preposition + body, body + noun])


def _intent(spec: dict) -> dict:
    """The slots a generated object gives, in the values of ObjectSpec (a far colour gives none)."""
    out = {}
    if "color" in spec and spec["color"][1] != "far":
        out["color"] = spec["color"][1].split(":")[1]
    if "shape" in spec:
        out["shape"] = SHAPE_WORDS[spec["shape"]]
    if "size" in spec:
        out["size"] = SIZE_WORDS[spec["size"]]
    if "motion" in spec:
        out["motion"] = spec["motion"]
    if "scaling" in spec:
        out["scaling"] = SCALING_PHRASES[spec["scaling"]]
    return out


def typo(rng: random.Random, word: str) -> str:
    """``word`` with one letter dropped, doubled, swapped with the next or replaced (words under 4 letters kept)."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1:]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    if kind == 2:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1:]


def _noise(rng: random.Random, words: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Filler words dropped in, a slot word misspelt (keeping its tag), a made-up word (tagged unknown)."""
    words = list(words)
    if rng.random() < 0.3:
        words.insert(rng.randint(0, len(words)), (rng.choice(_FILLER), "o"))
    if rng.random() < 0.2:
        slots = [i for i, (_, tag) in enumerate(words) if tag not in ("o", "unknown")]
        if slots:
            i = rng.choice(slots)
            words[i] = (typo(rng, words[i][0]), words[i][1])
    if rng.random() < 0.15:
        words.insert(rng.randint(0, len(words)), (_made_up_word(rng), "unknown"))
    return words


_FILLER = sorted(FILLER - set(SHAPE_WORDS) - set(SIZE_WORDS) - set(DIRECTION_WORDS) - set(_NAMED) - set(ALIASES)
                 - set(BACKGROUND_ALIASES) - {w for p in (*SCALING_PHRASES, *STILL_PHRASES) for w in p.split()}
                 - MOVING_WORDS - SPEED_WORDS)


def _made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def example(rng: random.Random) -> tuple[list[str], list[str], dict]:
    """One generated short prompt: (words, tags, {"objects": [slots given], "background": [colours given]})."""
    specs = [_spec(rng)]
    if rng.random() < 0.25:  # a second object: both named by a shape, so the reader can tell them apart
        specs[0].setdefault("shape", rng.choice(sorted(SHAPE_WORDS)))
        specs.append({**_spec(rng), "shape": rng.choice(sorted(SHAPE_WORDS))})
    words = _filler(rng.choice(PREFIXES)) + _object_words(rng, specs[0], lead=True)
    for spec in specs[1:]:
        words += _filler(rng.choice(["and a", "and", "with a", "plus a", "and the", "while a"]))
        words += _object_words(rng, spec, lead=False)
    background = []
    if rng.random() < 0.5:
        common = [c for c in BACKGROUND_COLOURS if c[0][0] in BACKGROUNDS | BACKGROUND_ALIASES.keys() | COLORS.keys()]
        colours = [rng.choice(BACKGROUND_COLOURS if rng.random() < 0.4 else common)
                   for _ in range(1 if rng.random() < 0.8 else 2)]
        background = [c[1].split(":")[1] for c in colours if c[1] != "bgfar"]
        bg_words = _background_words(rng, colours)
        words = bg_words + _filler(rng.choice(["", "with"])) + words if rng.random() < 0.15 else words + bg_words
    words = _noise(rng, words)
    return [w for w, _ in words], [t for _, t in words], {"objects": [_intent(s) for s in specs],
                                                         "background": background}


TAGS = sorted({"o", "unknown", "far", "bgfar", "speed", "still", "moving", "grows", "shrinks"}
              | {f"color:{c}" for c in COLORS} | {f"bg:{b}" for b in BACKGROUNDS}
              | {f"shape:{s}" for s in set(SHAPE_WORDS.values())} | {f"size:{s}" for s in set(SIZE_WORDS.values())}
              | {f"dir:{dx},{dy}" for dx, dy in set(DIRECTION_WORDS.values())})
DEFAULTS = {"buckets": 16384, "dim": 32, "window": 3, "hidden": 128}


def known_words() -> list[str]:
    """Every word the generator writes, misspellings and made-up words aside: the words the tagger knows."""
    words = set(FILLER) | BACKGROUND_WORDS | MOVING_WORDS | SPEED_WORDS | set(SHAPE_WORDS) | set(SIZE_WORDS)
    words |= set(DIRECTION_WORDS) | {w for p in (*SCALING_PHRASES, *STILL_PHRASES, *PREFIXES) for w in p.split()}
    words |= {w for names, _ in OBJECT_COLOURS + BACKGROUND_COLOURS for w in names}
    return sorted(words | {"and", "with", "plus", "while", "to", "towards", "thing", "object", "shape", "one"})


def _batches(rng: random.Random, count: int, batch: int) -> list[tuple[list[list[str]], list[list[str]]]]:
    examples = [example(rng) for _ in range(count)]
    return [([e[0] for e in examples[i:i + batch]], [e[1] for e in examples[i:i + batch]])
            for i in range(0, count, batch)]


def train(*, examples: int = 40000, epochs: int = 4, batch: int = 256, lr: float = 1e-2, seed: int = 0,
          log=print) -> tuple[SlotTagger, dict]:
    """Train a :class:`SlotTagger` on ``examples`` generated prompts (seed ``seed``) for ``epochs`` epochs on one
    thread (so the result is the same on every run); returns the tagger and its config (with ``tags`` and the
    ``vocabulary`` of words seen in training)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(f"expander/{seed}")
    data = _batches(rng, examples, batch)
    vocabulary = known_words()
    config = {**DEFAULTS, "tags": TAGS, "vocabulary": vocabulary, "trained_on": examples, "epochs": epochs,
              "seed": seed}
    tagger = SlotTagger(**DEFAULTS, tags=len(TAGS))
    index = {t: i for i, t in enumerate(TAGS)}
    opt = torch.optim.Adam(tagger.parameters(), lr=lr)
    steps = epochs * len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for epoch in range(epochs):
        total = 0.0
        for words, tags in data:
            logits = tagger(*batch_features(words, DEFAULTS["buckets"], DEFAULTS["window"]))
            target = torch.tensor([index[t] for ts in tags for t in ts])
            loss = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(data):.4f}")
    return tagger.eval(), config


def save(directory: str, tagger: SlotTagger, config: dict) -> None:
    """Write ``tagger.safetensors`` (float16) and ``config.json`` to ``directory``."""
    import os

    os.makedirs(directory, exist_ok=True)
    save_tensors(os.path.join(directory, WEIGHTS_FILE), tagger.state_dict(), dtype=torch.float16)
    write_json(os.path.join(directory, CONFIG_FILE), config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the learned prompt expander's slot tagger.")
    p.add_argument("--out", default=ASSETS, help="directory for tagger.safetensors + config.json")
    p.add_argument("--examples", type=int, default=40000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tagger, config = train(examples=args.examples, epochs=args.epochs, seed=args.seed)
    save(args.out, tagger, config)
    print(f"saved {sum(p.numel() for p in tagger.parameters())} parameters to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
