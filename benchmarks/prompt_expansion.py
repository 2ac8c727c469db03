"""Prompt expansion quality (vdit.demo.prompts) on 100+ hand-labelled short prompts.

    python -m benchmarks.prompt_expansion [--seeds 10] [--prompts benchmarks/data/short_prompts.jsonl]

Each line of the prompts file is a short prompt in free wording with the slots its writer meant
({"prompt", "objects": [{"color", "shape", "size", "motion", "scaling"} given ones only], "background": [..]}).
Every prompt is expanded at seeds 0 .. seeds-1 and measured:

- attribute accuracy: of all (prompt, seed, intended slot), the fraction whose expanded value is the intended one;
- contradiction rate: of all (prompt, seed) expansions, the fraction that change an intended slot or put an
  object on a background of its own colour;
- diversity: for each slot the prompt left out (first object, and the background), the distinct values drawn over
  the seeds as a fraction of min(seeds, values possible), averaged per slot;
- grammar: the fraction of expansions whose every word is in the demo's caption vocabulary.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

from vdit.demo.data import BACKGROUNDS, COLORS, MOTIONS, SCALINGS, SHAPES, SIZES, vocabulary
from vdit.demo.prompts import expand_detailed

DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "data", "short_prompts.jsonl")
CHOICES = {"color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES), "motion": len(MOTIONS),
           "scaling": len(SCALINGS), "background": len(BACKGROUNDS)}


def load(path: str) -> list[dict]:
    """The labelled prompts of the JSON-lines file ``path``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check(record: dict, result) -> tuple[int, int]:
    """(intended slots matched, intended slots) of one expansion."""
    right = total = 0
    for i, want in enumerate(record["objects"]):
        got = result.objects[i] if i < len(result.objects) else None
        for slot, value in want.items():
            total += 1
            right += got is not None and getattr(got, slot) == value
    if "background" in record:
        total += 1
        right += [result.background, result.background2][:len(record["background"])] == record["background"] and (
            len(record["background"]) == 2 or result.background2 is None)
    return right, total


def measure(records: list[dict], seeds: int) -> dict:
    """The figures described in the module docstring, plus the prompts with errors."""
    right = total = contradictions = in_grammar = 0
    distinct, errors, unknown = collections.defaultdict(list), [], collections.Counter()
    vocab = set(vocabulary())
    for record in records:
        drawn = collections.defaultdict(set)
        for seed in range(seeds):
            result = expand_detailed(record["prompt"], seed=seed)
            r, t = _check(record, result)
            right, total = right + r, total + t
            own = any(o.color in (result.background, result.background2) for o in result.objects)
            contradictions += r < t or own
            if r < t and seed == 0:
                errors.append((record["prompt"], result.caption))
            in_grammar += set(result.caption.split()) <= vocab
            unknown.update(result.unknown if seed == 0 else [])
            for slot in CHOICES:
                drawn[slot].add(result.background if slot == "background" else getattr(result.objects[0], slot))
        for slot, values in drawn.items():
            given = "background" in record if slot == "background" else slot in record["objects"][0]
            if not given:
                distinct[slot].append(len(values) / min(seeds, CHOICES[slot]))
    runs = len(records) * seeds
    return {"prompts": len(records), "seeds": seeds, "attribute_accuracy": right / total, "slots": total // seeds,
            "contradiction_rate": contradictions / runs, "in_grammar": in_grammar / runs,
            "diversity": {s: sum(v) / len(v) for s, v in distinct.items()},
            "diversity_prompts": {s: len(v) for s, v in distinct.items()},
            "errors": errors, "unknown_words": dict(unknown.most_common())}


def report(m: dict) -> str:
    """Markdown lines of the figures of :func:`measure`."""
    lines = [f"- prompts: {m['prompts']}, seeds: {m['seeds']}, intended slots: {m['slots']}",
             f"- attribute accuracy: {100 * m['attribute_accuracy']:.1f} %",
             f"- contradiction rate: {100 * m['contradiction_rate']:.1f} %",
             f"- expansions in the caption grammar: {100 * m['in_grammar']:.1f} %",
             "- diversity over left-out slots (distinct values / min(seeds, choices)):"]
    lines += [f"  - {s}: {100 * v:.0f} % (over {m['diversity_prompts'][s]} prompts)" for s, v in m["diversity"].items()]
    lines.append(f"- unknown words reported: {m['unknown_words'] or 'none'}")
    lines += [f"- miss: {p!r} -> {c!r}" for p, c in m["errors"]]
    return "\n".join(lines)


def model_check(records: list[dict], count: int, size: tuple[int, int], steps: int) -> str:
    """The shipped demo model's colour / motion accuracy on ``count`` one-object prompts that give a colour and a
    motion, each with " on black" appended (the measurement needs a black background), as typed and expanded."""
    from vdit.demo.evaluation import evaluate
    from vdit.demo.pipeline import DEFAULT_WEIGHTS, SHIPPED_WEIGHTS, TextToVideo
    from vdit.demo.prompts import expand

    chosen = [r for r in records if len(r["objects"]) == 1 and {"color", "motion"} <= r["objects"][0].keys()
              and "background" not in r][:count]
    typed = [(f"{r['prompt']} on black", r["objects"][0]["color"], None, r["objects"][0]["motion"]) for r in chosen]
    expanded = [(expand(p, seed=i), c, s, m) for i, (p, c, s, m) in enumerate(typed)]
    model = TextToVideo.load(SHIPPED_WEIGHTS.get(DEFAULT_WEIGHTS, DEFAULT_WEIGHTS))
    lines = []
    for label, prompts in (("as typed", typed), ("expanded", expanded)):
        r = evaluate(model, prompts, frames=16, size=size, steps=steps, seed=0, progress=False)
        lines.append(f"| {label} | {len(prompts)} | {100 * r['colour_accuracy']:.0f} % | "
                     f"{100 * r['motion_accuracy']:.0f} % |")
    return "\n".join(["| prompts | n | colour | motion |", "|---|---|---|---|", *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default=DEFAULT_PROMPTS)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--model", type=int, default=0, metavar="N",
                   help="also generate with the shipped demo model on N short prompts, as typed and expanded")
    p.add_argument("--size", default="64x96", help="HxW of the --model videos")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the --model videos")
    args = p.parse_args(argv)
    records = load(args.prompts)
    print(report(measure(records, args.seeds)))
    if args.model:
        height, width = (int(v) for v in args.size.split("x"))
        print(model_check(records, args.model, (height, width), args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
