"""Helpers shared by the benchmark modules."""
import argparse
import os


def quick() -> bool:
    """True under ``vdit-bench --quick`` (VDIT_BENCH_QUICK=1): smaller shapes, fewer rounds."""
    return os.environ.get("VDIT_BENCH_QUICK", "0") not in ("", "0")


def add_study_arguments(p: argparse.ArgumentParser, *, raw: str, videos: str, report: str, report_help: str) -> None:
    """The arguments of a resumable generation study (aspect_consistency, native_training): --seeds, --prompts,
    --raw (JSON lines appended per video), --videos (their frames), --out (the report) and --report-only."""
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--prompts", type=int, default=36, help="held-out prompts (36 = all)")
    p.add_argument("--raw", default=raw, help="JSON lines, one per video (appended, resumable)")
    p.add_argument("--videos", default=videos, help="folder of the videos' uint8 frames")
    p.add_argument("--out", default=report, help=report_help)
    p.add_argument("--report-only", action="store_true")


def run_study(args: argparse.Namespace, generate_all, report) -> None:
    """Generate what ``args.raw`` lacks (unless --report-only), then write the report from it."""
    if not args.report_only:
        generate_all(args)
    report(args)


def model_argument(text: str) -> tuple[str, str]:
    """``name=path`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model must be NAME=WEIGHTS, got {text!r}")
    return name, path


def parse_model_study(p: argparse.ArgumentParser, argv, model_help: str) -> argparse.Namespace:
    """Parse a study comparing models: ``p`` gains --model NAME=WEIGHTS (repeatable), which is required unless
    --report-only."""
    p.add_argument("--model", type=model_argument, action="append", default=[], help=model_help)
    args = p.parse_args(argv)
    if not args.report_only and not args.model:
        p.error("give --model NAME=WEIGHTS (twice, to compare), or --report-only")
    return args
