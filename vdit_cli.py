"""Console-script entry points of vdit's demo CLIs (``vdit-generate``, ``vdit-train``, ...).

They live outside the ``vdit`` package because they must act before torch loads: importing anything under
``vdit`` imports torch, and libgomp (torch's OpenMP runtime) reads ``OMP_WAIT_POLICY`` once, when it loads.

The default there is to spin-wait at the end of every parallel region. On cores shared with other work that
burns the time slices the waiting threads' partners need: the demo's generation (8 frames of 64x64, 10 steps,
2 cores with 2 busy processes) took 5.1 s instead of 1.2 s quiet, and 2.5 s with passive waiting, which costs
0.1 s on quiet cores (``python -m benchmarks.contended_generation``; benchmarks/results/cpu-isa.md). So the
CLIs wait passively unless the environment already says otherwise (``OMP_WAIT_POLICY=active vdit-generate ...``
restores spinning). Importing vdit as a library changes nothing.
"""
from __future__ import annotations

import importlib
import os

WAIT_POLICY = "passive"


def _run(module: str) -> None:
    """Set the wait policy unless the user did, then run ``module``'s ``cli``."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    importlib.import_module(module).cli()


def generate() -> None:
    _run("vdit.demo.cli.generate")


def train() -> None:
    _run("vdit.demo.cli.train")


def eval_demo() -> None:
    _run("vdit.demo.cli.eval")


def train_autoencoder() -> None:
    _run("vdit.demo.cli.train_autoencoder")
