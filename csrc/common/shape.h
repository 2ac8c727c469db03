// Host-side helpers that every op's shape.h and kernels share: the accumulation dtype and the check
// of cu_seqlens offsets that a CPU kernel reads on the host.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace vdit {

// Accumulation (compute) dtype of the kernels: float64 for float64 tensors, else float32 (what
// at::opmath_type picks for float16, bfloat16, float32 and float64).
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Offsets cu[0 .. batch] in host memory must start at 0, never decrease and end at `total`, or a
// kernel walking them could index past the rows. Python validates first with friendly messages
// (and bypassing it, e.g. under torch.compile, must still never read out of bounds).
inline void check_offsets_host(const char* op, const char* name, const int32_t* cu, int64_t batch, int64_t total) {
  TORCH_CHECK(cu[0] == 0 && cu[batch] == total, op, ": ", name, " must start at 0 and end at ", total, ", got ",
              cu[0], " ... ", cu[batch]);
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(cu[b + 1] >= cu[b], op, ": ", name, " must be non-decreasing");
}

}  // namespace vdit
