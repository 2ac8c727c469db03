// Schemas of the 3D rotary embedding operators; implementations: csrc/cpu/rope.cpp, csrc/cuda/rope.cu.
//
// x / q / k: (total, H, D) or (B, L, H, D), unit stride along D (other strides arbitrary);
// positions: (L, 3) or (B, L, 3) int32/int64/float32/float64. `inverse` rotates by -angle (the
// backward of a plain rotation). With a weight, each head is RMS-normalized (times the weight)
// before rotating. The backward ops return (grad_x, grad_weight) per tensor; grad_weight is an
// empty tensor when the weight is None.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vdit, m) {
  m.def("rope_3d(Tensor x, Tensor positions, int[3] dims, float theta, bool interleaved, bool inverse, "
        "Tensor? weight, float eps) -> Tensor");
  m.def("rope_3d_qk(Tensor q, Tensor k, Tensor positions, int[3] dims, float theta, bool interleaved, "
        "bool inverse, Tensor? q_weight, Tensor? k_weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_3d_qk_(Tensor(a!) q, Tensor(b!) k, Tensor positions, int[3] dims, float theta, bool interleaved, "
        "Tensor? q_weight, Tensor? k_weight, float eps) -> ()");
  m.def("rope_3d_backward(Tensor grad, Tensor x, Tensor positions, int[3] dims, float theta, bool interleaved, "
        "Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_3d_qk_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor positions, int[3] dims, "
        "float theta, bool interleaved, Tensor? q_weight, Tensor? k_weight, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
