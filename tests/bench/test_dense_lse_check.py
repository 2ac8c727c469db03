"""The dense lse check (vdit.bench.dense_lse, benchmarks/gpu_dense_lse_check.py) and the quarantine rule it
feeds (vdit.kernels.external.quarantined): fake kernels with the conventions an external kernel may have
(log2 lse, padded lse, top-left causal mask, +inf for rows without keys) are caught, as is a backward that
does not take the merged (out, lse) it is given; vdit's CPU kernels agree, forward and backward, and a
quarantined kernel is skipped by dispatch for its own implementation only."""
import json
import math
import os
import sys
import types

import pytest
import torch

from vdit.backends import BackendUnavailableError
from vdit.bench import dense_lse
from vdit.kernels import external
from vdit.ops import plan, reference


def agrees(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    return reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)


def log2_lse(*args):
    out, lse = agrees(*args)
    return out, lse / math.log(2)


def padded_lse(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    out, lse = agrees(q, k, v, cu_q, cu_k, max_q, max_k, causal)
    padded = torch.full((len(cu_q) - 1, lse.shape[0], max_q), float("-inf"))
    for i, (a, b) in enumerate(zip(cu_q.tolist(), cu_q[1:].tolist())):
        padded[i, :, :b - a] = lse[:, a:b]
    return out, padded


def plus_inf_for_rows_without_keys(*args):  # flash-attn's raw convention, which vdit maps to -inf
    out, lse = agrees(*args)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def top_left_causal(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """Causal masks aligned to the top-left corner: query i sees keys j <= i."""
    if not causal:
        return agrees(q, k, v, cu_q, cu_k, max_q, max_k, causal)
    out, lse = torch.zeros(q.shape), torch.full((q.shape[1], q.shape[0]), float("-inf"))
    for a, b, c, d in zip(cu_q.tolist(), cu_q[1:].tolist(), cu_k.tolist(), cu_k[1:].tolist()):
        qi = q[a:b].float().transpose(0, 1)
        ki, vi = (t[c:d].float().transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0) for t in (k, v))
        scores = (qi @ ki.transpose(1, 2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(torch.arange(d - c)[None] > torch.arange(b - a)[:, None], float("-inf"))
        lse[:, a:b] = torch.logsumexp(scores, -1)
        out[a:b] = (torch.softmax(scores, -1).nan_to_num() @ vi).transpose(0, 1)
    return out.to(q.dtype), lse


def merged_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal):
    """The backward from the given (merged) out and lse, as vdit's contract says."""
    return reference.varlen_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, softmax_scale=q.shape[-1] ** -0.5,
                                               causal=causal)


def own_block_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal):
    """A backward that recomputes its block's own out and lse instead of taking the merged ones: right for a
    single block, wrong for each of the ring's."""
    own_out, own_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    return merged_backward(dout, q, k, v, own_out, own_lse, cu_q, cu_k, max_q, max_k, causal)


def check(run):
    return dense_lse.check_kernel(run, dense_lse.TINY_CASES, [torch.float16], "cpu")


def check_backward(run):
    return dense_lse.check_backward(run, dense_lse.TINY_CASES, [torch.float16], "cpu")


def test_a_kernel_that_follows_the_contract_agrees():
    assert check(agrees) == []


@pytest.mark.parametrize("run, hint", [(log2_lse, "log2 units"), (padded_lse, "padded: (B, Hq, max_seqlen_q)"),
                                       (plus_inf_for_rows_without_keys, "infinities")],
                         ids=["log2", "padded", "+inf"])
def test_a_different_lse_convention_is_caught_and_named(run, hint):
    problems = check(run)
    assert problems and all(": lse " in p for p in problems)
    assert any(hint in p for p in problems), problems


def test_a_top_left_causal_mask_is_caught_on_the_output():
    problems = check(top_left_causal)
    assert any(p.startswith("causal Lq < Lk float16: out max |err|") for p in problems), problems
    assert any(p.startswith("causal Lq > Lk float16: out") for p in problems), problems


def test_a_kernel_that_raises_disagrees():
    def refuses(*args):
        raise RuntimeError("Lq > Lk is not supported")

    assert check(refuses)[0].startswith("causal Lq < Lk float16: raised RuntimeError: Lq > Lk")


def test_the_keys_split_in_halves_the_first_fully_visible_when_causal():
    lengths_q, lengths_k = (5, 9, 4, 1), (8, 12, 3, 1)
    assert dense_lse.key_halves(dense_lse.LseCase("full", lengths_q, lengths_k)) == ((4, 6, 1, 0), (4, 6, 2, 1))
    # causal: query 0 sees keys j <= Lk - Lq, so the first half stops there (none when Lq > Lk)
    assert dense_lse.key_halves(dense_lse.LseCase("causal", lengths_q, lengths_k, causal=True)) == (
        (4, 4, 0, 0), (4, 8, 3, 1))


def test_a_backward_from_the_merged_out_and_lse_agrees():
    assert check_backward(merged_backward) == []


def test_a_backward_that_ignores_the_merged_lse_is_caught_and_named():
    problems = check_backward(own_block_backward)
    assert problems and all(": backward from merged (out, lse): d" in p for p in problems), problems
    assert any(p.startswith("causal Lq < Lk float16: backward from merged (out, lse): dq max |err|") for p in problems)


def test_a_backward_that_raises_disagrees():
    def refuses(*args):
        raise RuntimeError("no keys")

    assert check_backward(refuses)[0] == ("causal Lq < Lk float16: backward from merged (out, lse) raised "
                                          "RuntimeError: no keys")


def test_vdit_cpu_kernels_agree_and_externals_are_not_run_on_cpu():
    results = dense_lse.check_installed("cpu", (torch.float16,), dense_lse.TINY_CASES)
    assert results["cpu"] == [] and results["triton"] == []  # triton: the interpreter
    assert "cuda" in results["flash-attn"] and "cuda" in results["torch-varlen"]
    assert dense_lse.implementations(results) == {}
    backward = dense_lse.check_installed("cpu", (torch.float16,), dense_lse.TINY_CASES, backward=True)
    assert backward["cpu"] == [] and backward["triton"] == []
    assert "cuda" in backward["flash-attn"] and "cuda" in backward["torch-varlen"]
    assert dense_lse.implementations(results, backward) == {}


def test_only_external_kernels_with_problems_are_quarantined(tmp_path):
    results = {"torch-varlen": ["causal Lq < Lk bfloat16: lse ..."], "flash-attn": [], "triton": ["out ..."],
               "cpu": "runs on cpu tensors"}
    content = dense_lse.quarantine(results, {"torch-varlen": "torch 9.9", "flash-attn": "flash_attn 2.8"}, "H100")
    assert content["kernels"] == {"torch-varlen": {"implementation": "torch 9.9",
                                                   "problems": ["causal Lq < Lk bfloat16: lse ..."]}}
    path = tmp_path / "q.json"
    dense_lse.write_quarantine(str(path), content)
    assert external.read_quarantine(str(path)) == content["kernels"]
    text = dense_lse.report("H100", results, {"torch-varlen": "torch 9.9"}, str(path))
    assert "| torch-varlen | torch 9.9 | quarantined: 1 problems |" in text
    assert "| triton | vdit | FAILS (a vdit kernel: fix it): 1 problems |" in text
    assert "| cpu | vdit | not run: runs on cpu tensors |" in text


def test_a_disagreeing_backward_quarantines_its_kernel_with_the_forward_problems(tmp_path):
    results = {"flash-attn": ["self bfloat16: lse ..."], "torch-varlen": [], "triton": []}
    backward = {"flash-attn": ["self bfloat16: backward from merged (out, lse): dk max |err| 1"],
                "torch-varlen": "has no backward from a given output and lse", "triton": []}
    implementations = {"flash-attn": "flash_attn_interface 3.0.0", "torch-varlen": "torch 9.9"}
    content = dense_lse.quarantine(results, implementations, "H100", backward)
    assert content["kernels"] == {"flash-attn": {"implementation": "flash_attn_interface 3.0.0", "problems": [
        "self bfloat16: lse ...", "self bfloat16: backward from merged (out, lse): dk max |err| 1"]}}
    results["flash-attn"] = []  # the backward alone is enough
    assert list(dense_lse.quarantine(results, implementations, "H100", backward)["kernels"]) == ["flash-attn"]
    text = dense_lse.report("H100", results, implementations, "q.json", backward=backward)
    assert "| kernel | implementation | result | backward from merged (out, lse) |" in text
    assert "| flash-attn | flash_attn_interface 3.0.0 | agrees | quarantined: 1 problems |" in text
    assert "| torch-varlen | torch 9.9 | agrees | not run: has no backward from a given output and lse |" in text
    assert "| triton | vdit | agrees | agrees |" in text
    assert "flash-attn:\n- self bfloat16: backward from merged (out, lse): dk max |err| 1" in text


@pytest.mark.parametrize("wrong", [None, "forward", "backward"], ids=["agrees", "cpu-kernel-off", "cpu-backward-off"])
def test_the_script_writes_report_and_quarantine_and_fails_on_a_vdit_kernel(monkeypatch, tmp_path, wrong):
    """gpu_dense_lse_check.py end to end on the CPU kernels (C++ and interpreted Triton) and tiny cases."""
    from benchmarks import gpu_dense_lse_check as script

    monkeypatch.setattr(script, "DEVICE", "cpu")
    monkeypatch.setattr(script, "DTYPES", (torch.float16,))
    monkeypatch.setattr(script, "CASES", dense_lse.TINY_CASES)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setenv(external.QUARANTINE_ENV, str(tmp_path / "stale.json"))
    if wrong == "forward":
        real = dense_lse.vdit_run
        monkeypatch.setattr(dense_lse, "vdit_run", lambda backend: log2_lse if backend == "cpu" else real(backend))
    if wrong == "backward":
        real_backward = dense_lse.vdit_backward_run
        monkeypatch.setattr(dense_lse, "vdit_backward_run",
                            lambda backend: own_block_backward if backend == "cpu" else real_backward(backend))
    assert script.main(["--out", str(tmp_path)]) == (1 if wrong else 0)
    assert external.QUARANTINE_ENV not in os.environ  # the check judges every kernel afresh
    content = json.loads((tmp_path / "fake-gpu-quarantine.json").read_text())
    assert content["kernels"] == {} and content["device"] == "Fake GPU"  # vdit kernels are fixed, not quarantined
    text = (tmp_path / "fake-gpu-dense-lse.md").read_text()
    assert "on 2 cases (causal Lq < Lk, causal Lq > Lk), float16." in text
    verdict = "FAILS (a vdit kernel: fix it): 2 problems" if wrong == "forward" else "agrees"
    assert f"| cpu | vdit | {verdict} |" in text
    backward_verdict = "FAILS (a vdit kernel: fix it): " if wrong == "backward" else "agrees |"
    assert f"| cpu | vdit | {verdict} | {backward_verdict}" in text
    assert "| triton | vdit | agrees | agrees |" in text and "| torch-varlen | vdit | not run: " in text
    assert "not run: varlen_attention: backend 'flash-attn' runs on cuda tensors" in text


# ---- the quarantine rule in dispatch -------------------------------------------------------------------------

def _write(tmp_path, kernels) -> str:
    path = tmp_path / "quarantine.json"
    path.write_text(json.dumps({"kernels": kernels}))
    return str(path)


def test_quarantined_reads_the_file_named_by_the_variable(tmp_path, monkeypatch):
    path = _write(tmp_path, {"torch-varlen": {"implementation": "torch 9.9", "problems": ["lse log2 units"]}})
    assert external.quarantined("torch-varlen", lambda: "torch 9.9") is None  # no variable
    monkeypatch.setenv(external.QUARANTINE_ENV, path)
    assert external.quarantined("torch-varlen", lambda: "torch 9.9") == (
        f"torch 9.9 is quarantined by {path} (lse log2 units)")
    assert external.quarantined("torch-varlen", lambda: "torch 10.0") is None  # an upgrade lifts it
    path = _write(tmp_path, {"torch-varlen": {"implementation": "torch 9.9", "problems": ["a", "b", "c"]}})
    assert external.quarantined("torch-varlen", lambda: "torch 9.9").endswith("(a and 2 more)")
    assert external.quarantined("flash-attn", lambda: "torch 9.9") is None
    monkeypatch.setenv(external.QUARANTINE_ENV, str(tmp_path / "not-written-yet.json"))
    assert external.quarantined("torch-varlen", lambda: "torch 9.9") is None


def test_a_broken_quarantine_file_is_an_error_naming_the_variable(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv(external.QUARANTINE_ENV, str(path))
    with pytest.raises(ValueError, match="VDIT_KERNEL_QUARANTINE=.*is not a quarantine file"):
        external.quarantined("torch-varlen", lambda: "torch 9.9")
    path.write_text(json.dumps({"kernels": {"torch-varlen": ["lse"]}}))
    with pytest.raises(ValueError, match="'kernels' must map kernel names to entries"):
        external.quarantined("torch-varlen", lambda: "torch 9.9")


@pytest.fixture
def current_kernels(cuda_build):
    """A CUDA build of torch with a current varlen_attn (torch 2.14's keywords) and no flash-attn."""
    import torch.nn.attention.varlen as varlen

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        """torch 2.14."""

    cuda_build.setattr(varlen, "varlen_attn", varlen_attn)
    cuda_build.setitem(sys.modules, "flash_attn", None)
    cuda_build.setitem(sys.modules, "flash_attn_interface", None)
    yield cuda_build


def _plan(**kwargs):
    return plan("varlen_attention", device="cuda", dtype=torch.bfloat16, head_dim=64, capability=(9, 0), **kwargs)


def test_dispatch_skips_a_quarantined_kernel_and_refuses_it_by_name(current_kernels, tmp_path):
    assert _plan()[0] == "torch-varlen"
    path = _write(tmp_path, {"torch-varlen": {"implementation": f"torch {torch.__version__}",
                                              "problems": ["causal Lq < Lk: out max |err| 1"]}})
    current_kernels.setenv(external.QUARANTINE_ENV, path)
    external.torch_varlen_missing.cache_clear()
    kernel, reason = _plan()
    assert kernel == "triton" and "torch-varlen: torch" in reason and "quarantined" in reason
    with pytest.raises(BackendUnavailableError, match="quarantined by .*causal Lq < Lk"):
        _plan(backend="torch-varlen")


def test_flash_attn_quarantine_holds_for_its_version_only(current_kernels, tmp_path):
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_varlen_func = lambda *args, **kwargs: None
    module.__version__ = "3.0.0"
    module.__spec__ = types.SimpleNamespace(name="flash_attn_interface")
    current_kernels.setitem(sys.modules, "flash_attn_interface", module)
    assert external.implementation("flash-attn") == "flash_attn_interface 3.0.0"
    for version, offered in (("3.0.0", False), ("2.9.9", True)):
        path = _write(tmp_path, {"flash-attn": {"implementation": f"flash_attn_interface {version}",
                                                "problems": ["lse padded"]}})
        current_kernels.setenv(external.QUARANTINE_ENV, path)
        external.flash_attn_version.cache_clear()
        external._flash_attn_module_missing.cache_clear()
        assert external.flash_attn_version() == (3 if offered else None)
        assert (external.flash_attn_missing() is None) == offered
    with pytest.raises(ValueError, match="kernel must be"):
        external.implementation("triton")
