// The CPU attention kernels that the build compiles once per ISA (attention/cpu_kernels.cpp and
// sparse_attention/cpu_kernels.cpp, each into vdit::avx2 and vdit::avx512; setup.py), and the run-time
// choice between the copies (common/cpu_isa.h). Raw pointers only: the tensor work (checks, dtype
// conversion, output allocation) stays in the once-compiled cpu.cpp entry points.
#pragma once

#include <cstdint>

#include "attention/shape.h"
#include "common/cpu_isa.h"
#include "sparse_attention/shape.h"

namespace vdit {

#define VDIT_DECLARE_ATTENTION_KERNELS(ns)                                                                         \
  namespace ns {                                                                                                   \
  /* q (total_q, Hq, D), k / v (total_k, Hk, D), out like q, lse (Hq, total_q); all contiguous. */                 \
  template <typename T>                                                                                            \
  void varlen_forward(const AttentionProblem& p, T scale, const T* q, const T* k, const T* v, T* out, T* lse);    \
  /* dq like q; dk_h / dv_h (total_k, Hk or Hq, D) with row stride ld_dkv, dkv_head_stride 1 for per-query-head */ \
  /* partials (grouped heads). */                                                                                  \
  template <typename T>                                                                                            \
  void varlen_backward(const AttentionProblem& p, T scale, const T* dout, const T* q, const T* k, const T* v,      \
                       const T* out, const T* lse, T* dq, T* dk_h, T* dv_h, int64_t ld_dkv, int64_t dkv_head_stride); \
  /* q (total, Hq, D), k / v (total, Hk, D), out like q, lse (Hq, total). */                                        \
  template <typename T>                                                                                            \
  void block_sparse_forward(const BlockSparseProblem& p, T scale, const T* q, const T* k, const T* v, T* out,     \
                            T* lse);                                                                               \
  /* dq like q, dk / dv like k, delta (Hq, total) scratch. */                                                      \
  template <typename T>                                                                                            \
  void block_sparse_backward(const BlockSparseProblem& p, T scale, const T* dout, const T* q, const T* k,         \
                             const T* v, const T* out, const T* lse, T* delta, T* dq, T* dk, T* dv);              \
  /* The tiles this copy uses: forward query rows, keys; backward query rows, keys (attention/tiles.h). */      \
  void tile_sizes(int64_t out[4]);                                                                                 \
  }

VDIT_DECLARE_ATTENTION_KERNELS(avx2)
VDIT_DECLARE_ATTENTION_KERNELS(avx512)
#undef VDIT_DECLARE_ATTENTION_KERNELS

// Calls the active ISA's copy, e.g. VDIT_CPU_ISA_CALL(varlen_forward<float>, p, scale, ...).
#define VDIT_CPU_ISA_CALL(fn, ...)                                 \
  do {                                                             \
    if (::vdit::active_cpu_isa() == ::vdit::CpuIsa::kAvx512) {     \
      ::vdit::avx512::fn(__VA_ARGS__);                             \
    } else {                                                       \
      ::vdit::avx2::fn(__VA_ARGS__);                               \
    }                                                              \
  } while (0)

}  // namespace vdit
