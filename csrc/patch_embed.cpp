// Schemas of the patch embedding operators; implementations: csrc/cpu/patch_embed.cpp (the Triton
// kernels register their own ops from Python).
//
// patch_embed_3d: Conv3d with stride == kernel as gather + GEMM. Weight (D, C, pt, ph, pw).
// patch_unembed_3d: the final Linear(D, C*pt*ph*pw) + unpatchify. Weight (C*pt*ph*pw, D).
// Packed forms take `grids` as a flat int list (Tp0, Hp0, Wp0, Tp1, ...) so that shapes are host-side.
// Backward ops return (grad_input(s), grad_weight, grad_bias); an entry whose output_mask is false is
// an empty tensor (never computed).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vdit, m) {
  m.def("patch_embed_3d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("patch_embed_3d_backward(Tensor grad, Tensor x, Tensor weight, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("patch_embed_3d_varlen(Tensor[] videos, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  m.def("patch_embed_3d_varlen_backward(Tensor grad, Tensor[] videos, Tensor weight, bool[3] output_mask)"
        " -> (Tensor[], Tensor, Tensor)");
  m.def("patch_unembed_3d(Tensor tokens, Tensor weight, Tensor? bias, int[3] grid, int[3] patch_size) -> Tensor");
  m.def("patch_unembed_3d_backward(Tensor grad, Tensor tokens, Tensor weight, int[3] grid, int[3] patch_size,"
        " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("patch_unembed_3d_varlen(Tensor tokens, Tensor weight, Tensor? bias, int[] grids, int[3] patch_size)"
        " -> Tensor[]");
  m.def("patch_unembed_3d_varlen_backward(Tensor[] grads, Tensor tokens, Tensor weight, int[] grids,"
        " int[3] patch_size, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
