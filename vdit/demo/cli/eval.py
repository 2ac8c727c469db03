"""vdit-eval-demo: does the demo model follow its prompts?

For held-out (colour, shape, motion) combinations that training never drew (vdit.demo.data.HELD_OUT),
generate one video per prompt and measure colour accuracy, motion accuracy, object persistence and temporal
consistency with simple image analysis (vdit.demo.evaluation says how).

    vdit-eval-demo --weights runs/demo/ema.safetensors --config runs/demo/config.json
    vdit-eval-demo --size 128x128 --attention sliding_tile --tile 4,4,4 --window 4,2,2 --json sta.json
    python -m vdit.demo.cli.eval --prompts 12 --seed 0     # a quick look: 12 prompts, one seed

One seed's 36 held-out prompts leave the motion accuracy uncertain by about +-7 points, so by default every
held-out prompt is evaluated at seeds 0, 1 and 2 (each its own prompt order and noise) and the pooled
figures are printed with a standard error (about 4 minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vdit.demo.cli import common
from vdit.demo.cli.common import add_expand_arguments, parse_size
from vdit.demo.data import HELD_OUT

# The measurements live in vdit.demo.evaluation; the names stay importable from here (vdit.eval_demo too).
from vdit.demo.evaluation import (  # noqa: F401
    classify_colour,
    classify_motion,
    evaluate,
    foreground_masks,
    held_out_prompts,
    pooled,
    summary,
    temporal_consistency,
)
from vdit.demo.growth import with_attention
from vdit.demo.pipeline import DEFAULT_WEIGHTS, SHIPPED_WEIGHTS, TextToVideo
from vdit.demo.prompts import expand_prompts

PROG = "vdit-eval-demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=DEFAULT_WEIGHTS,
                   help="safetensors weights, or a shipped model by name: dense (default), sta or latent")
    p.add_argument("--config", default=None)
    p.add_argument("--prompts", type=int, default=len(HELD_OUT),
                   help=f"number of held-out prompts (default: all {len(HELD_OUT)})")
    add_expand_arguments(p, expand_help="pass every prompt through vdit.demo.prompts.expand first (a grammar "
                                        "caption is kept as is)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="48x48", help="HxW in pixels (the model trained on 32 to 64)")
    p.add_argument("--shift", type=float, default=None, help="sampler time shift (default: the weights' own)")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2],
                   help="one or more seeds (prompt order and noise); with several, also the pooled figures")
    p.add_argument("--untrained", action="store_true", help="evaluate a freshly initialized model (the baseline)")
    p.add_argument("--verbose", action="store_true", help="print each prompt's classification")
    p.add_argument("--json", default=None, help="also write every result (per seed, pooled, per prompt) to this file")
    common.add_attention_arguments(p, default_help="the weights' own (dense for the shipped model)")
    common.add_cache_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Evaluate as the command line ``argv`` (default: ``sys.argv[1:]``) says, printing one line per seed (and
    the pooled figures); returns the exit status, 0."""
    args = parse_args(argv)
    size, attention, cache = parse_size(args.size), common.attention_options(args), common.cache_option(args)
    trained = with_attention(TextToVideo.load(SHIPPED_WEIGHTS.get(args.weights, args.weights), args.config),
                             **attention)
    label = "untrained baseline" if args.untrained else args.weights
    label = f"{label} ({common.attention_summary(trained.dit.config)}, {args.frames}x{size[0]}x{size[1]})"
    if cache is not None:
        label = f"{label[:-1]}, step cache {cache.method} {cache.threshold:g})"
    results = []
    for seed in args.seed:
        model = trained
        if args.untrained:
            torch.manual_seed(seed)
            model = TextToVideo.from_config(trained.config_dict()).eval()
        start = time.perf_counter()
        prompts = held_out_prompts(args.prompts, seed)
        if args.expand_prompt:
            captions = expand_prompts([p[0] for p in prompts], seed=seed, echo=print if args.verbose else None,
                                      method=args.expand_method)
            prompts = [(caption, *rest) for caption, (_, *rest) in zip(captions, prompts)]
        result = evaluate(model, prompts, frames=args.frames, size=size,
                          steps=args.steps, guidance=args.guidance, shift=args.shift, seed=seed, cache=cache)
        result["seconds"] = time.perf_counter() - start
        if args.verbose:
            for prompt, colour, motion in result["rows"]:
                print(f"  {prompt!r}: colour={colour} motion={motion}")
        print(f"{summary(f'{label} (seed {seed})', result)} ({result['seconds']:.0f} s)")
        results.append(result)
    if len(results) > 1:
        seeds = ", ".join(map(str, args.seed))
        print(summary(f"{label} (seeds {seeds} pooled)", pooled(results)))
    if args.json:
        cfg = trained.dit.config
        record = {"weights": args.weights, "frames": args.frames, "size": list(size), "steps": args.steps,
                  "attention": {k: getattr(cfg, k) for k in ("attention", "tile", "window", "topk")},
                  "summary": common.attention_summary(cfg), "seeds": args.seed, "per_seed": results,
                  "pooled": pooled(results)}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


cli = common.entry_point(PROG, main)

if __name__ == "__main__":
    cli()
