// Per-element math of the varlen attention kernels, shared by CPU and (future) CUDA code.
//
// Conventions: sequence of Lq queries and Lk keys; with causal masking aligned to the bottom-right
// corner, query row i sees keys j <= i + (Lk - Lq).
#pragma once

#include <cstdint>

#include "macros.h"

namespace vdit {

// Index of the last key query row `i` may see (inclusive); < 0 means it sees none.
VDIT_HOST_DEVICE int64_t causal_last_key(int64_t i, int64_t Lq, int64_t Lk) { return i + (Lk - Lq); }

// exp(x) in float, branch-free so that loops over it vectorize (the CPU kernel's softmax hot loop).
// Range reduction x = n ln2 + r, |r| <= ln2 / 2, then a degree-6 polynomial of r (relative error
// about 2 ulp). exp(x) = 0 for x below the smallest normal's log, including -inf.
VDIT_HOST_DEVICE float exp_approx(float x) {
  const float lo = -87.33654475f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (plain arithmetic, so it vectorizes).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 split in two parts so n * ln2_hi is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as a float's exponent field
#if defined(__CUDA_ARCH__)
  const float pow2n = __int_as_float(bits);
#else
  const float pow2n = __builtin_bit_cast(float, bits);  // vectorizes, unlike a memcpy
#endif
  return x < lo ? 0.0f : p * pow2n;
}

}  // namespace vdit
