"""Helpers shared by the benchmark modules."""
import os


def quick() -> bool:
    """True under ``vdit-bench --quick`` (VDIT_BENCH_QUICK=1): smaller shapes, fewer rounds."""
    return os.environ.get("VDIT_BENCH_QUICK", "0") not in ("", "0")
