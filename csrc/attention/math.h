// Per-element math of the varlen attention kernels, shared by CPU and (future) CUDA code.
//
// Conventions: sequence of Lq queries and Lk keys; with causal masking aligned to the bottom-right
// corner, query row i sees keys j <= i + (Lk - Lq).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace vdit {

// Index of the last key query row `i` may see (inclusive); < 0 means it sees none.
VDIT_HOST_DEVICE int64_t causal_last_key(int64_t i, int64_t Lq, int64_t Lk) { return i + (Lk - Lq); }

// Coefficients of 2^f = sum_k c_k f^k, highest degree first: c_k = ln(2)^k / k!, k = 6 .. 0.
constexpr float kExp2Poly[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

// 2^x in float, branch-free so that loops over it vectorize (the CPU kernel's softmax hot loop, which
// works in log2 units: the score GEMM's alpha carries log2(e), so no extra multiply per score).
// x = n + f with n = round(x), |f| <= 1/2, exact; 2^f by its degree-6 Taylor polynomial (relative error
// about 2.3e-7 measured over [-126, 0]); 2^n goes straight into the exponent field.
// Returns 0 below -126 (2^-126 is the smallest normal float), including -inf.
VDIT_HOST_DEVICE float exp2_approx(float x) {
  float xc = x < -126.0f ? -126.0f : x;
  xc = xc > 127.0f ? 127.0f : xc;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (plain arithmetic, so it vectorizes).
  const float n = (xc + 12582912.0f) - 12582912.0f;
  const float f = xc - n;
  float p = kExp2Poly[0];
  for (int k = 1; k < 7; ++k) p = p * f + kExp2Poly[k];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as a float's exponent field
#if defined(__CUDA_ARCH__)
  const float pow2n = __int_as_float(bits);
#else
  const float pow2n = __builtin_bit_cast(float, bits);  // vectorizes, unlike a memcpy
#endif
  return x < -126.0f ? 0.0f : p * pow2n;
}

}  // namespace vdit
