// Output allocation for every kernel. With poisoning on (tests), outputs start as NaN (or the
// dtype's max for integers) so that an element a kernel forgets to write cannot pass as correct.
#pragma once

#include <ATen/core/Tensor.h>

namespace vdit {

bool poison_outputs();
void set_poison_outputs(bool on);
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// A new output with t's sizes, dtype and device (contiguous).
at::Tensor new_output_like(const at::Tensor& t);

}  // namespace vdit
