#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace vdit {

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx512 ? "avx512" : "avx2"; }

bool cpu_isa_supported(CpuIsa isa) {
  // The levels the variants are compiled for (setup.py: -march=x86-64-v3 / x86-64-v4); libgcc also
  // checks that the OS saves the ymm / zmm state (XCR0).
  __builtin_cpu_init();
  if (isa == CpuIsa::kAvx512) return __builtin_cpu_supports("x86-64-v4");
  return __builtin_cpu_supports("x86-64-v3");
}

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> out;
  for (const CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (cpu_isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

namespace {

CpuIsa choose_cpu_isa() {
  const std::vector<CpuIsa> ok = supported_cpu_isas();
  TORCH_CHECK(!ok.empty(), "vdit: the CPU kernels need AVX2 and FMA (x86-64-v3); this CPU lacks them");
  const char* forced = std::getenv("VDIT_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return ok.back();
  for (const CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(forced, cpu_isa_name(isa)) != 0) continue;
    TORCH_CHECK(cpu_isa_supported(isa), "vdit: VDIT_CPU_ISA=", forced, " but this CPU does not support ", forced);
    return isa;
  }
  TORCH_CHECK(false, "vdit: VDIT_CPU_ISA must be avx2 or avx512 (or unset), got '", forced, "'");
}

}  // namespace

CpuIsa active_cpu_isa() {
  static const CpuIsa isa = choose_cpu_isa();  // a throw leaves it unset: the next call throws again
  return isa;
}

std::string active_cpu_isa_status() {
  try {
    return cpu_isa_name(active_cpu_isa());
  } catch (const c10::Error& e) {
    return std::string("error: ") + e.what_without_backtrace();
  }
}

}  // namespace vdit
