// Host-side shape checks of the adaLN operators, shared by adaln/cpu.cpp and adaln/cuda.cu. Python
// validates first with friendly messages; these checks are the last line that keeps a kernel from
// reading out of bounds. Math: adaln/math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "adaln/math.h"
#include "common/alloc.h"
#include "common/shape.h"

namespace vdit {

struct AdalnShape {
  int64_t rows;  // token rows: total (packed) or B * N (dense)
  int64_t C;     // features per row
  Segments seg;  // sample of each row
};

// x: (total, C) with cu_seqlens or (B, N, C) without; param: (B, C) like x. Every tensor contiguous.
inline AdalnShape adaln_shape(const char* op, const at::Tensor& x, const at::Tensor& param,
                              const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(x.is_contiguous() && param.is_contiguous(), op, ": tensors must be contiguous");
  TORCH_CHECK(param.dim() == 2, op, ": per-sample parameters must be (B, C), got ", param.sizes());
  TORCH_CHECK(param.scalar_type() == x.scalar_type() && param.device() == x.device(), op,
              ": per-sample parameters must match x's dtype and device");
  AdalnShape s{};
  s.C = x.size(-1);
  TORCH_CHECK(param.size(1) == s.C, op, ": parameters have ", param.size(1), " features, x has ", s.C);
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(x.dim() == 2, op, ": packed x must be (total, C), got ", x.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous() && cu.device() == x.device(),
                op, ": cu_seqlens must be a contiguous int32 vector on x's device");
    TORCH_CHECK(cu.numel() == param.size(0) + 1, op, ": cu_seqlens has ", cu.numel(), " entries, expected B + 1 = ",
                param.size(0) + 1);
    s.rows = x.size(0);
    s.seg = Segments{cu.data_ptr<int32_t>(), param.size(0), 0};
  } else {
    TORCH_CHECK(x.dim() == 3, op, ": dense x must be (B, N, C), got ", x.sizes());
    TORCH_CHECK(x.size(0) == param.size(0), op, ": x has B = ", x.size(0), " but parameters have ", param.size(0));
    s.rows = x.size(0) * x.size(1);
    s.seg = Segments{nullptr, x.size(0), x.size(1)};
  }
  return s;
}

// A second tensor of the same role as `like` (shift like scale, y like x, grad_out like x or y): the
// same sizes, dtype and device, contiguous. `what` is the message, e.g. "vdit::gated_residual: y must be like x".
inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              what);
}

// The backward's inputs besides the forward's: grad_out like x, and the forward's row statistics.
inline void check_adaln_backward(const AdalnShape& sh, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& rstd) {
  check_like(grad, x, "vdit::adaln_modulate_backward: grad_out must be like x");
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(mean.numel() == sh.rows && rstd.numel() == sh.rows && mean.scalar_type() == acc &&
                  rstd.scalar_type() == acc && mean.is_contiguous() && rstd.is_contiguous(),
              "vdit::adaln_modulate_backward: mean and rstd must be the forward's row statistics");
}

// cu_seqlens values (host memory: CPU kernels only) must describe exactly the rows of x.
inline void check_adaln_offsets_host(const AdalnShape& sh) {
  if (sh.seg.cu) check_offsets_host("vdit adaln", "cu_seqlens", sh.seg.cu, sh.seg.batch, sh.rows);
}

// A new tensor for one row statistic of x (mean or rstd): x's shape without the feature dim, in the
// accumulation dtype.
inline at::Tensor new_row_stat(const at::Tensor& x) {
  return new_output(std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1),
                    x.options().dtype(acc_type_of(x.scalar_type())));
}

}  // namespace vdit
