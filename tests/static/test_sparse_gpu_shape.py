"""The GPU shape of the block-sparse attention kernels with 4x4x4 tiles, checked statically (no GPU): the
configurations the launchers pick for 64-token tiles, compiled for sm_90 as the runtime compiles them.

* the forward's key walk is one flat loop with no full pipeline drain (``ttg.async_wait`` with num = 0 and
  no token) inside it, and so is dq's, where the nested walk (the general configuration) drains per tile;
* the forward runs two CTAs per SM (registers and shared memory of the compiled kernel) and spills
  nothing, and every 64-token-tile kernel has 64-row blocks;
* the partial edge tiles run in a second launch of 16-row blocks, so that 90 % or more of the MMA rows
  hold a token.

The compilation runs in a subprocess without TRITON_INTERPRET (the interpreter the other tests run under
cannot compile); ``vdit.bench.sparse_cost_model`` does the compiling and counting.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json
from vdit.bench import sparse_cost_model as cost_model
rows = {}
for kernel in ("fwd", "bwd_dq"):
    figures = cost_model.figures((33, 45, 80), (4, 4, 4), kernel, 90, 128, "bf16", compile_kernels=True)
    rows[kernel], rows[kernel + " nested"] = figures["after"], figures["before"]
    rows[kernel + " edge"] = figures["edge"]
for row in rows.values():
    cfg = row.pop("config")
    row.update(block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps)
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def shape() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forward_key_loop_is_flat_without_a_drain(shape):
    fwd = shape["fwd"]
    assert fwd["flat"] and fwd["loops"] == 1, fwd
    assert fwd["drains_in_loops"] == 0, fwd
    # The nested walk (tiles larger than a key block) drains after every key tile: the count sees it.
    nested = shape["fwd nested"]
    assert not nested["flat"] and nested["loops"] == 2 and nested["drains_in_loops"] == 1, nested


def test_dq_key_loop_is_flat_without_a_drain(shape):
    dq = shape["bwd_dq"]
    assert dq["flat"] and dq["loops"] == 1 and dq["drains_in_loops"] == 0, dq


def test_forward_fits_two_ctas_per_sm_without_spills(shape):
    fwd = shape["fwd"]
    assert fwd["block_m"] == 64 and fwd["num_warps"] == 4, fwd
    assert fwd["spills"] == 0 and not fwd["wgmma_serialized"], fwd
    assert fwd["shared"] <= 113 * 1024 and fwd["ctas_per_sm"] >= 2, fwd
    assert fwd["useful_rows"] >= 0.9 and shape["bwd_dq"]["useful_rows"] >= 0.9


def test_edge_tiles_run_in_16_row_blocks_without_spills(shape):
    # The partial edge tiles (16 and 4 tokens) take a second launch of 16-row blocks: mma.sync (below
    # wgmma's 64-row M tile), the same flat key loop, no spill, and room for more CTAs than the main launch.
    for kernel in ("fwd", "bwd_dq"):
        edge = shape[kernel + " edge"]
        assert edge["block_m"] == 16 and edge["block_n"] == shape[kernel]["block_n"], edge
        assert edge["flat"] and edge["drains_in_loops"] == 0 and edge["spills"] == 0, edge
        assert edge["ctas_per_sm"] >= shape[kernel]["ctas_per_sm"], edge
        assert edge["useful_rows"] == pytest.approx(6160 / 6400)  # 380 tiles of 16 tokens and 20 of 4
