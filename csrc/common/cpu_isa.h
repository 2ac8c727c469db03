// Run-time choice of the instruction set of the CPU hot loops (the attention tile kernels), which the
// build compiles once per ISA into namespaces vdit::avx2 and vdit::avx512 (setup.py, <op>/cpu_kernels.cpp);
// everything else is compiled once, for the baseline (VDIT_CPU_ARCH, default x86-64-v3).
#pragma once

#include <string>
#include <vector>

namespace vdit {

enum class CpuIsa { kAvx2, kAvx512 };

// "avx2" / "avx512".
const char* cpu_isa_name(CpuIsa isa);

// Whether this CPU (and its OS) runs the kernels compiled for `isa`.
bool cpu_isa_supported(CpuIsa isa);

// The compiled ISAs this CPU supports, widest last.
std::vector<CpuIsa> supported_cpu_isas();

// The ISA the kernels use: VDIT_CPU_ISA=avx2|avx512 when set (like ATen's ATEN_CPU_CAPABILITY), else
// the widest this CPU supports. Read once, on first use. Throws c10::Error naming VDIT_CPU_ISA for an
// unknown or unsupported value, and when the CPU has not even AVX2.
CpuIsa active_cpu_isa();

// active_cpu_isa()'s name, or "error: <why>" instead of throwing (for build_info).
std::string active_cpu_isa_status();

}  // namespace vdit
