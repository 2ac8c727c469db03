// Schemas of the varlen attention operators; implementation: csrc/cpu/attention.cpp.
//
// varlen_attention_fwd returns (out, lse): out like q, lse (Hq, total_q) float32 (float64 for float64
// inputs). varlen_attention_bwd returns (dq, dk, dv) like q, k, v. max_seqlen_* are carried for
// parity with the GPU kernels (the CPU kernel reads the lengths from cu_seqlens).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vdit, m) {
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)");
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
      "bool causal) -> (Tensor, Tensor, Tensor)");
}
