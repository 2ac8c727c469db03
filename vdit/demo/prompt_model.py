"""A learned slot tagger for prompt expansion: each word of a short prompt -> the slot it carries.

The second reader of :mod:`vdit.demo.prompts` (``expand(prompt, method="learned")``). A word is a bag of hashed
features (the word, its character 3-grams, its first and last three letters); each word's tag comes from an MLP
over the features of the words around it (``window`` either side), so the same word can be an object's colour
("black ball") or the background's ("on black"). Tags name a value (``color:red``, ``bg:navy``, ``shape:circle``,
``dir:-1,0``, ``grows``, ...) or a role (``unknown``, ``far`` for a colour the palette has nothing near,
``speed``, ``o`` for filler). The slots are then read from the tags into the rule-based parser's structure,
so both readers share the grammar, the seeded filling of missing slots and the notes.

The weights (``assets/expander/``: ``tagger.safetensors`` + ``config.json``, well under 1 M parameters) come
from :mod:`vdit.demo.prompt_training`, trained on generated (short prompt, tags) pairs.
"""
from __future__ import annotations

import functools
import os
import re
import zlib

import torch
from torch import nn

from vdit.demo.checkpoint import CheckpointError, load_into, load_tensors, read_json

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "expander")
WEIGHTS_FILE, CONFIG_FILE = "tagger.safetensors", "config.json"


def word_features(word: str, buckets: int) -> list[int]:
    """Hashed feature ids of ``word`` in [0, buckets): the word, its character 3-grams, first and last 3 letters.

    crc32 (not Python's salted ``hash``) so the ids are the same in every process.
    """
    padded = f"<{word}>"
    names = [f"w:{word}", f"p:{word[:3]}", f"s:{word[-3:]}"]
    names += [f"g:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
    return [zlib.crc32(name.encode()) % buckets for name in names]


def tokens(prompt: str) -> list[str]:
    """The lower-case words of ``prompt`` (the rule-based reader's tokens)."""
    return re.findall(r"[a-z]+", prompt.lower())


class SlotTagger(nn.Module):
    """Per-word tag logits from hashed word features in a window of ``window`` words either side.

    ``forward(ids, offsets, neighbours)``: ids (F,) int64 feature ids of all words of all prompts, offsets (W,)
    int64 start of each word's features in ``ids``, neighbours (W, 2 window + 1) int64 index of each word's
    neighbours among the W words (-1 past either end of its prompt) -> (W, tags) logits.
    """

    def __init__(self, buckets: int, dim: int, window: int, hidden: int, tags: int):
        super().__init__()
        self.window = window
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.pad = nn.Parameter(torch.zeros(1, dim))
        self.mlp = nn.Sequential(nn.Linear((2 * window + 1) * dim, hidden), nn.ReLU(), nn.Linear(hidden, tags))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        words = torch.cat([self.embed(ids, offsets), self.pad])  # (W + 1, dim); index -1 is the padding
        return self.mlp(words[neighbours].flatten(1))


def batch_features(prompts_words: list[list[str]], buckets: int, window: int) -> tuple[torch.Tensor, ...]:
    """(ids, offsets, neighbours) of :class:`SlotTagger` for a list of tokenized prompts."""
    ids, offsets, neighbours = [], [], []
    for words in prompts_words:
        start = len(offsets)
        for i, word in enumerate(words):
            offsets.append(len(ids))
            ids.extend(word_features(word, buckets))
            neighbours.append([start + j if 0 <= j < len(words) else -1 for j in range(i - window, i + window + 1)])
    return (torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(neighbours, dtype=torch.int64).reshape(-1, 2 * window + 1))


class LearnedExpander:
    """A trained :class:`SlotTagger` with its tag names and the words it was trained on."""

    def __init__(self, config: dict, tagger: SlotTagger):
        self.config, self.tagger = config, tagger
        self.tags: list[str] = config["tags"]
        self.vocabulary = frozenset(config["vocabulary"])

    @classmethod
    def load(cls, directory: str = ASSETS) -> LearnedExpander:
        """Load ``tagger.safetensors`` + ``config.json`` from ``directory``; a missing, corrupted or mismatched
        file raises :class:`CheckpointError` with a one-line message naming it."""
        config_path = os.path.join(directory, CONFIG_FILE)
        config = read_json(config_path)
        try:
            tagger = SlotTagger(**{k: config[k] for k in ("buckets", "dim", "window", "hidden")},
                                tags=len(config["tags"]))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: invalid expander configuration: {exc}") from None
        weights = os.path.join(directory, WEIGHTS_FILE)
        tensors = {k: v.float() for k, v in load_tensors(weights).items()}
        load_into(tagger, tensors, "", weights)
        return cls(config, tagger.eval())

    def tag(self, words: list[str], min_confidence: float = 0.0) -> list[str]:
        """The tag of each word of ``words`` (a list of lower-case words). A word the tagger was not trained on
        is tagged ``unknown`` where its best tag has a probability below ``min_confidence``. The default uses
        every guess (each is reported, see :func:`vdit.demo.prompts.read_tags`): on the benchmark's prompts,
        misspelt ones included, a threshold of 0.9 lost more right guesses ("greeen" -> green) than wrong
        ones ("zipping" -> down)."""
        if not words:
            return []
        with torch.no_grad():
            logits = self.tagger(*batch_features([words], self.config["buckets"], self.config["window"]))
        confidence, best = logits.softmax(-1).max(-1)
        return [self.tags[i] if p >= min_confidence or word in self.vocabulary else "unknown"
                for word, i, p in zip(words, best.tolist(), confidence.tolist())]


@functools.lru_cache(maxsize=4)
def load_expander(directory: str = ASSETS) -> LearnedExpander:
    """The shipped (or ``directory``'s) expander, loaded once per process."""
    return LearnedExpander.load(directory)


def parse(prompt: str, expander: LearnedExpander | None = None):
    """The slots of ``prompt`` read by the learned tagger, as the rule-based reader's ``_Parse``."""
    from vdit.demo.prompts import read_tags

    expander = expander or load_expander()
    words = tokens(prompt)
    return read_tags(words, expander.tag(words), expander.vocabulary)
