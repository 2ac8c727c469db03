"""Benchmarks share the test tolerances' conventions but no test fixtures: run with
``pytest benchmarks/ --benchmark-only``."""
import os


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the CPU code paths that ran (vdit's attention kernels, ATen's kernels) in the JSON, so that the
    report names the ISA of every CPU figure, also when VDIT_CPU_ISA / ATEN_CPU_CAPABILITY forced one."""
    import torch

    import vdit

    machine_info["vdit_cpu_isa"] = vdit.build_info().get("cpu_isa")
    machine_info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["mkl_enable_instructions"] = os.environ.get("MKL_ENABLE_INSTRUCTIONS")
