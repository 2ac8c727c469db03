"""Smoke run: patchify a latent video batch with every backend available here and check the round trip.

    python examples/smoke.py
"""
import time

import torch

import vdit
from vdit.ops import patchify_3d, reference, unpatchify_3d


def main() -> None:
    print("vdit", vdit.__version__, vdit.build_info())
    x = torch.randn(2, 16, 16, 64, 64)  # latent video batch (B, C, T, H, W)
    patch = (1, 2, 2)
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    expected = reference.patchify_3d(x, patch).contiguous()
    for backend in ("torch", "auto"):
        start = time.perf_counter()
        tokens = patchify_3d(x, patch, backend=backend)
        elapsed = time.perf_counter() - start
        assert torch.equal(tokens, expected) and torch.equal(unpatchify_3d(tokens, grid, patch, backend=backend), x)
        print(f"patchify_3d backend={backend:5s} tokens {tuple(tokens.shape)} in {elapsed * 1e3:.1f} ms, "
              "round trip exact")


if __name__ == "__main__":
    main()
