// Host-side description of the tensors of a 3D RoPE call and its checks, shared by rope/cpu.cpp
// and rope/cuda.cu. Per-element math: rope/math.h.
//
// Every rotated tensor is viewed as (B, L, H, D) with unit channel stride and arbitrary batch,
// token and head strides, so q / k slices of a fused qkv projection are read in place. Packed
// (total, H, D) input is B = 1, L = total. Positions are (L, 3) (shared by the batch) or (B, L, 3),
// any strides, int32 / int64 / float32 / float64.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/shape.h"
#include "rope/math.h"

namespace vdit {

// One rotated tensor (a "row set": q, or k). Trivially copyable, so the CUDA kernels take it by value.
struct RopeRows {
  const void* in = nullptr;  // input rows (or incoming gradient in the backward pass)
  void* out = nullptr;       // output rows, contiguous (B, L, H, D), or `in` for in-place
  const void* x = nullptr;   // backward with norm: the forward input
  const void* weight = nullptr;  // RMSNorm weight, (D,) contiguous in the compute type, or null
  void* gw_partial = nullptr;    // CUDA backward with norm: per-block weight-gradient sums, or null
  int64_t heads = 0;
  int64_t in_sb = 0, in_sl = 0, in_sh = 0;
  int64_t out_sb = 0, out_sl = 0, out_sh = 0;
  int64_t x_sb = 0, x_sl = 0, x_sh = 0;
};

struct RopePositions {
  const void* data = nullptr;
  at::ScalarType dtype = at::kInt;
  int64_t sb = 0, sl = 0, sa = 0;
};

struct RopeProblem {
  int64_t B = 0, L = 0;
  RopeChannels channels{};
  double log_theta = 0;
  RopePositions pos;
};

// Strides (batch, token, head) of a (total, H, D) or (B, L, H, D) tensor.
inline void rope_strides(const at::Tensor& t, int64_t* sb, int64_t* sl, int64_t* sh) {
  TORCH_CHECK(t.dim() == 3 || t.dim() == 4, "vdit rope: expected a 3-D or 4-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "vdit rope: the head dim must have unit stride");
  if (t.dim() == 3) {
    *sb = 0;
    *sl = t.stride(0);
    *sh = t.stride(1);
  } else {
    *sb = t.stride(0);
    *sl = t.stride(1);
    *sh = t.stride(2);
  }
}

inline RopeProblem rope_problem(const at::Tensor& x, const at::Tensor& positions, at::IntArrayRef dims,
                                double theta, bool interleaved) {
  TORCH_CHECK(dims.size() == 3, "vdit rope: dims must have 3 entries");
  const int64_t D = x.size(-1);
  TORCH_CHECK(dims[0] >= 0 && dims[1] >= 0 && dims[2] >= 0 && dims[0] % 2 == 0 && dims[1] % 2 == 0 &&
                  dims[2] % 2 == 0 && dims[0] + dims[1] + dims[2] <= D,
              "vdit rope: dims must be even, non-negative and sum to <= the head dim ", D);
  TORCH_CHECK(theta > 0, "vdit rope: theta must be positive");
  RopeProblem p;
  p.B = x.dim() == 4 ? x.size(0) : 1;
  p.L = x.dim() == 4 ? x.size(1) : x.size(0);
  p.channels = make_rope_channels(int(dims[0]), int(dims[1]), int(dims[2]), int(D), interleaved);
  p.log_theta = std::log(theta);
  TORCH_CHECK(positions.device() == x.device(), "vdit rope: positions must be on the tensors' device");
  const auto pd = positions.scalar_type();
  TORCH_CHECK(pd == at::kInt || pd == at::kLong || pd == at::kFloat || pd == at::kDouble,
              "vdit rope: positions must be int32, int64, float32 or float64");
  TORCH_CHECK(positions.size(-1) == 3, "vdit rope: positions must end in a dim of 3");
  p.pos.data = positions.data_ptr();
  p.pos.dtype = pd;
  p.pos.sa = positions.stride(-1);
  if (positions.dim() == 2) {
    TORCH_CHECK(positions.size(0) == p.L, "vdit rope: positions has ", positions.size(0), " rows, expected ", p.L);
    p.pos.sl = positions.stride(0);
  } else {
    TORCH_CHECK(positions.dim() == 3 && positions.size(0) == p.B && positions.size(1) == p.L,
                "vdit rope: positions must be (L, 3) or (B, L, 3)");
    p.pos.sb = positions.stride(0);
    p.pos.sl = positions.stride(1);
  }
  return p;
}

// Rows of `in` written to `out` (out may alias in for the in-place op).
inline RopeRows rope_rows(const at::Tensor& in, const at::Tensor& out, const at::Tensor& weight_acc) {
  RopeRows r;
  r.in = in.data_ptr();
  r.out = out.data_ptr();
  r.heads = in.size(-2);
  rope_strides(in, &r.in_sb, &r.in_sl, &r.in_sh);
  rope_strides(out, &r.out_sb, &r.out_sl, &r.out_sh);
  r.weight = weight_acc.defined() ? weight_acc.data_ptr() : nullptr;
  return r;
}

// Backward rows: the incoming gradient `grad` (like the forward input x) written to `out`, with x
// read for the norm.
inline RopeRows rope_backward_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                                   const at::Tensor& weight_acc) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "vdit rope: gradients must be like their inputs");
  RopeRows r = rope_rows(grad, out, weight_acc);
  r.x = x.data_ptr();
  rope_strides(x, &r.x_sb, &r.x_sl, &r.x_sh);
  return r;
}

// The optional RMSNorm weight of a tensor x: (D,) on x's device, converted to the compute type
// (contiguous), or an undefined tensor.
inline at::Tensor weight_in_compute_type(const std::optional<at::Tensor>& w, const at::Tensor& x) {
  if (!w.has_value() || !w->defined()) return at::Tensor();
  TORCH_CHECK(w->dim() == 1 && w->size(0) == x.size(-1), "vdit rope: norm weight must be (", x.size(-1), ",)");
  TORCH_CHECK(w->device() == x.device(), "vdit rope: norm weight must be on the tensors' device");
  return w->to(acc_type_of(x.scalar_type())).contiguous();
}

// The weight gradient of each set from its partial sums (summed over the first dim), in the weight's
// dtype; an empty tensor where the set has no weight.
inline std::vector<at::Tensor> rope_weight_grads(const std::vector<at::Tensor>& partials,
                                                 const std::vector<std::optional<at::Tensor>>& weights,
                                                 const std::vector<at::Tensor>& xs) {
  std::vector<at::Tensor> grads;
  for (size_t s = 0; s < xs.size(); ++s) {
    grads.push_back(partials[s].defined() ? partials[s].sum(0).to(weights[s]->scalar_type())
                                          : at::empty({0}, xs[s].options()));
  }
  return grads;
}

// The same token grid, head dim and dtype for a second tensor of a q/k pair.
inline void rope_check_pair(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == k.dim() && q.size(-1) == k.size(-1) && q.size(0) == k.size(0) &&
                  (q.dim() == 3 || q.size(1) == k.size(1)),
              "vdit rope: q and k must match except in the head count");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "vdit rope: q and k must share dtype and device");
}

}  // namespace vdit
