// Host-side shape checks and the problem descriptor of the varlen attention operators, for
// attention/cpu.cpp (and a future attention/cuda.cu). Python validates first with friendly messages;
// these checks are the last line that keeps a kernel from reading out of bounds. Math:
// attention/math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "attention/math.h"
#include "common/shape.h"

namespace vdit {

// A packed batch: sequence b has queries [cu_q[b], cu_q[b + 1]) and keys [cu_k[b], cu_k[b + 1]) of the
// (total, heads, D) tensors; Hq query heads share each of Hk kv heads in groups of Hq / Hk.
struct AttentionProblem {
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t batch, Hq, Hk, D, total_q, total_k;
  bool causal;
  int64_t group() const { return Hq / Hk; }
  int64_t q_start(int64_t b) const { return cu_q[b]; }
  int64_t k_start(int64_t b) const { return cu_k[b]; }
  int64_t len_q(int64_t b) const { return cu_q[b + 1] - cu_q[b]; }
  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  // Keys that rows [i0, i0 + n) of sequence b can see: [0, key_end).
  int64_t key_end(int64_t b, int64_t i0, int64_t n) const {
    const int64_t Lk = len_k(b);
    if (!causal) return Lk;
    return std::clamp<int64_t>(causal_last_key(i0 + n - 1, len_q(b), Lk) + 1, 0, Lk);
  }
  // Columns [0, result) of key tile j0 (nk keys) that row i sees.
  int64_t visible(int64_t b, int64_t i, int64_t j0, int64_t nk) const {
    if (!causal) return nk;
    return std::clamp<int64_t>(causal_last_key(i, len_q(b), len_k(b)) - j0 + 1, 0, nk);
  }
};

// q (total_q, Hq, D), k and v (total_k, Hk, D), cu_seqlens int32 (B + 1,) contiguous. The offsets'
// values are not read here (they may live on the GPU): CPU kernels check them with
// check_attention_offsets_host.
inline AttentionProblem attention_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "vdit: q, k, v must be 3-D (total, heads, head_dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), "vdit: k and v must have the same shape");
  TORCH_CHECK(q.size(2) == k.size(2), "vdit: q and k must have the same head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "vdit: q heads must be a multiple of k heads");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt, "vdit: cu_seqlens must be int32");
  TORCH_CHECK(cu_q.is_contiguous() && cu_k.is_contiguous(), "vdit: cu_seqlens must be contiguous");
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.numel() >= 1 && cu_q.numel() == cu_k.numel(),
              "vdit: cu_seqlens_q and cu_seqlens_k must be 1-D of the same length");
  return AttentionProblem{cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), cu_q.numel() - 1, q.size(1),
                          k.size(1), q.size(2), q.size(0), k.size(0), causal};
}

// Offsets in host memory: never read out of bounds, even if the Python checks were bypassed (e.g.
// under torch.compile).
inline void check_attention_offsets_host(const AttentionProblem& p) {
  check_offsets_host("vdit", "cu_seqlens_q", p.cu_q, p.batch, p.total_q);
  check_offsets_host("vdit", "cu_seqlens_k", p.cu_k, p.batch, p.total_k);
}

// The backward's inputs besides the forward's: dout and out like q, lse (Hq, total_q).
inline void check_attention_backward(const AttentionProblem& p, const at::Tensor& q, const at::Tensor& dout,
                                     const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "vdit: dout and out must have q's shape");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == p.Hq && lse.size(1) == p.total_q, "vdit: lse must be (Hq, total_q)");
}

}  // namespace vdit
