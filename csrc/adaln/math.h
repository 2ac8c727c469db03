// Math of adaln_modulate and gated_residual, shared by the CPU and CUDA kernels.
//
// Tokens are rows of C features. A row belongs to one sample s: packed rows are split by
// cu_seqlens (int32, B + 1 offsets, empty samples allowed), dense (B, N, C) rows by row / N.
//   adaln_modulate: out = (x - mean) * rstd * (1 + scale[s]) + shift[s], with the row's biased
//                   variance, rstd = 1 / sqrt(var + eps) (LayerNorm without affine parameters).
//   gated_residual: out = x + gate[s] * y.
// All math runs in the accumulation type A (float, or double for double tensors).
//
// Parameter gradients (grad_shift, grad_scale, grad_gate) are column sums over a sample's rows.
// Kernels cut the rows into fixed blocks of R rows and write one partial sum per (block k,
// sample s) pair they touch, at slot k + s: the pairs met walking the rows in order have strictly
// increasing k + s, so slots never collide, and blocks + B slots suffice. A second pass adds the
// slots of each sample in block order. No atomics: results do not depend on thread count or timing.
#pragma once

#include <math.h>

#include <cstdint>

#include "common/macros.h"

namespace vdit {

// Which sample each token row belongs to, without a per-row index tensor.
struct Segments {
  const int32_t* cu;        // (batch + 1,) offsets into the rows, or nullptr for dense (B, N, C) rows
  int64_t batch;            // B
  int64_t rows_per_sample;  // N of dense (B, N, C) rows (unused when cu is set)

  VDIT_HOST_DEVICE int64_t begin(int64_t s) const { return cu ? int64_t(cu[s]) : s * rows_per_sample; }
  VDIT_HOST_DEVICE int64_t end(int64_t s) const { return begin(s + 1); }

  // The sample whose rows contain `row` (0 <= row < total). Empty samples are never returned:
  // the search finds the last s with begin(s) <= row, and begin(s + 1) > row then holds.
  VDIT_HOST_DEVICE int64_t sample_of(int64_t row) const {
    if (!cu) return row / rows_per_sample;
    int64_t lo = 0, hi = batch;  // cu[lo] <= row < cu[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) >> 1;
      if (int64_t(cu[mid]) <= row) lo = mid;
      else hi = mid;
    }
    return lo;
  }
};

// Partial-sum slots (see the file comment).
VDIT_HOST_DEVICE int64_t partial_slot(int64_t block, int64_t sample) { return block + sample; }
VDIT_HOST_DEVICE int64_t num_partial_slots(int64_t blocks, int64_t batch) { return blocks + batch; }
VDIT_HOST_DEVICE int64_t num_row_blocks(int64_t rows, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block;
}

VDIT_HOST_DEVICE float vdit_sqrt(float v) { return sqrtf(v); }
VDIT_HOST_DEVICE double vdit_sqrt(double v) { return sqrt(v); }

// 1 / sqrt(var + eps) from the sum of squared deviations of a row of C values.
template <typename A>
VDIT_HOST_DEVICE A adaln_rstd(A squared_deviation_sum, int64_t C, A eps) {
  return A(1) / vdit_sqrt(squared_deviation_sum / A(C) + eps);
}

// One output element of adaln_modulate; one_plus_scale = 1 + scale[s][c].
template <typename A>
VDIT_HOST_DEVICE A adaln_element(A x, A mean, A rstd, A one_plus_scale, A shift) {
  return (x - mean) * rstd * one_plus_scale + shift;
}

// Backward of adaln_modulate for one element. With xhat = (x - mean) * rstd and
// dxhat = grad_out * (1 + scale[s]), the LayerNorm backward is
//   grad_x = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)),
// where mean_c are the row means; both are accumulated in a first pass over the row.
template <typename A>
VDIT_HOST_DEVICE A adaln_grad_x(A dxhat, A xhat, A rstd, A mean_dxhat, A mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

// One output element of gated_residual (also grad_y = gate * grad_out with x = 0).
template <typename A>
VDIT_HOST_DEVICE A gated_element(A x, A gate, A y) {
  return x + gate * y;
}

}  // namespace vdit
