// Schemas of the adaLN operators; implementations: csrc/cpu/adaln.cpp, csrc/cuda/adaln.cu.
//
// x is (total, C) packed with cu_seqlens int32 (B + 1,), or (B, N, C) with cu_seqlens None;
// shift, scale, gate are (B, C) in x's dtype. mean and rstd are the row statistics (x's shape
// without the last dim; float32, float64 for float64 x) kept for the backward.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vdit, m) {
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, Tensor? cu_seqlens, float eps) "
        "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("adaln_modulate_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, "
        "Tensor? cu_seqlens) -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");
  m.def("gated_residual(Tensor x, Tensor y, Tensor gate, Tensor? cu_seqlens) -> Tensor");
  m.def("gated_residual_backward(Tensor grad_out, Tensor y, Tensor gate, Tensor? cu_seqlens) "
        "-> (Tensor grad_y, Tensor grad_gate)");
}
