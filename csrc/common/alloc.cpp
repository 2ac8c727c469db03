#include "common/alloc.h"

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace vdit {

namespace {
std::atomic<bool> g_poison{false};
}

bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }
void set_poison_outputs(bool on) { g_poison.store(on, std::memory_order_relaxed); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(std::numeric_limits<int32_t>::max());
    }
  }
  return out;
}

at::Tensor new_output_like(const at::Tensor& t) { return new_output(t.sizes(), t.options()); }

}  // namespace vdit
