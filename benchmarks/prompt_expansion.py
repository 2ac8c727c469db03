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

``--method rules|learned`` picks the expander (default: ``vdit.demo.prompts.DEFAULT_METHOD``); ``--typos`` first
misspells one word of 5+ letters per prompt (a letter dropped, doubled, swapped or replaced, seeded by the
prompt's line number), the same misspellings for both methods.

    python -m benchmarks.prompt_expansion --demo runs/demo.jsonl [--method rules] [--size 64x96] [--steps 20]

samples the shipped demo model instead (see :func:`demo_run`).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

from vdit.demo.data import BACKGROUNDS, COLORS, MOTIONS, SCALINGS, SHAPES, SIZES, vocabulary
from vdit.demo.prompts import DEFAULT_METHOD, expand_detailed

DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "data", "short_prompts.jsonl")
CHOICES = {"color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES), "motion": len(MOTIONS),
           "scaling": len(SCALINGS), "background": len(BACKGROUNDS)}


def load(path: str) -> list[dict]:
    """The labelled prompts of the JSON-lines file ``path``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def misspelt(records: list[dict]) -> list[dict]:
    """``records`` with one word of 5+ letters of each prompt misspelt (see the module docstring)."""
    import random

    from vdit.demo.prompt_training import typo

    out = []
    for i, record in enumerate(records):
        rng = random.Random(f"typo/{i}")
        words = record["prompt"].split(" ")
        long = [j for j, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
        if long:
            j = rng.choice(long)
            words[j] = typo(rng, words[j])
        out.append({**record, "prompt": " ".join(words)})
    return out


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


def measure(records: list[dict], seeds: int, method: str | None = None) -> dict:
    """The figures described in the module docstring for the expander ``method`` (None: the default), plus the
    prompts with errors."""
    right = total = contradictions = in_grammar = 0
    distinct, errors, unknown = collections.defaultdict(list), [], collections.Counter()
    vocab = set(vocabulary())
    for record in records:
        drawn = collections.defaultdict(set)
        for seed in range(seeds):
            result = expand_detailed(record["prompt"], seed=seed, method=method)
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


DEFAULT_DEMO_PROMPTS = os.path.join(os.path.dirname(__file__), "data", "off_grammar_prompts.jsonl")


def _demo_row(model, caption: str, seed: int, size: tuple[int, int], steps: int) -> dict:
    """Generate one (3, 16, *size) video of ``caption`` and classify its colour and motion on black."""
    from vdit.demo.evaluation import classify_colour, classify_motion, foreground_masks
    from vdit.demo.pipeline import generate

    video, = generate(model, [caption], frames=16, height=size[0], width=size[1], steps=steps, guidance=4.0,
                      seed=seed, progress=False)
    masks = foreground_masks(video, "black")
    return {"caption": caption, "seed": seed, "colour_seen": classify_colour(video, masks),
            "motion_seen": classify_motion(masks)}


def _made(out: str) -> dict:
    """The rows of the JSON-lines file ``out`` by (caption, seed, size, steps); empty if there is none."""
    done = {}
    if os.path.exists(out):
        with open(out) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[row["caption"], row["seed"], tuple(row["size"]), row["steps"]] = row
    return done


def demo_run(records: list[dict], out: str, size: tuple[int, int], steps: int, method: str,
             from_end: bool = False, sample: bool = True) -> list[dict]:
    """Sample the shipped demo model for each prompt of ``records`` ({"prompt", "color", "motion"}, all on a
    black background), as typed and expanded with ``method``, the i-th at seed i; append one JSON line per
    video to ``out`` as it is made. A (caption, seed, size, steps) already in ``out`` is not sampled again, so
    the run resumes, and an expansion that equals an earlier one reuses its video. ``from_end``: work from the
    last prompt back (each keeps its seed), so a second process can share the work on a busy machine.
    ``sample=False`` samples nothing and returns the prompts whose videos are all in ``out``."""
    from vdit.demo.pipeline import DEFAULT_WEIGHTS, TextToVideo
    from vdit.demo.prompts import expand

    done, model, rows = _made(out), None, []
    order = list(enumerate(records))
    for seed, record in reversed(order) if from_end else order:
        captions = {variant: record["prompt"] if variant == "typed" else expand(record["prompt"], seed=seed,
                                                                                 method=method)
                    for variant in ("typed", method)}
        if not sample and any((c, seed, tuple(size), steps) not in done for c in captions.values()):
            continue
        for variant, caption in captions.items():
            key = (caption, seed, tuple(size), steps)
            if key not in done:
                done = _made(out)  # another process may have made it since
            if key not in done:
                model = model or TextToVideo.load(DEFAULT_WEIGHTS)
                done[key] = {**_demo_row(model, caption, seed, size, steps), "size": list(size), "steps": steps}
                with open(out, "a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            rows.append({**done[key], "prompt": record["prompt"], "variant": variant,
                         "colour_ok": done[key]["colour_seen"] == record["color"],
                         "motion_ok": done[key]["motion_seen"] == record["motion"]})
    return rows


def demo_report(rows: list[dict]) -> str:
    """A markdown table of colour / motion accuracy per variant of :func:`demo_run`'s rows."""
    lines = ["| prompts | n | colour | motion |", "|---|---:|---:|---:|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        chosen = [r for r in rows if r["variant"] == variant]
        n = len(chosen)
        colour, motion = sum(r["colour_ok"] for r in chosen), sum(r["motion_ok"] for r in chosen)
        lines.append(f"| {variant} | {n} | {colour}/{n} = {100 * colour / n:.0f} % | "
                     f"{motion}/{n} = {100 * motion / n:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", default=DEFAULT_PROMPTS)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--method", default=None, help="the expander measured (rules or learned; default: expand's)")
    p.add_argument("--typos", action="store_true", help="misspell one word of each prompt first")
    p.add_argument("--demo", metavar="JSONL", help="instead, sample the shipped demo model on --demo-prompts, as "
                   "typed and expanded, writing one line per video to JSONL (resumable)")
    p.add_argument("--demo-prompts", default=DEFAULT_DEMO_PROMPTS)
    p.add_argument("--from-end", action="store_true", help="--demo: work from the last prompt back")
    p.add_argument("--report-only", action="store_true", help="--demo: sample nothing, report the videos made")
    p.add_argument("--size", default="64x96", help="HxW of the --demo videos")
    p.add_argument("--steps", type=int, default=12, help="sampler steps of the --demo videos")
    args = p.parse_args(argv)
    if args.demo:
        height, width = (int(v) for v in args.size.split("x"))
        rows = demo_run(load(args.demo_prompts), args.demo, (height, width), args.steps, args.method or DEFAULT_METHOD,
                        args.from_end, not args.report_only)
        print(demo_report(rows))
        return 0
    records = load(args.prompts)
    print(report(measure(misspelt(records) if args.typos else records, args.seeds, args.method)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
