// Schemas of the patchify operators; implementations: csrc/cpu/patchify.cpp, csrc/cuda/patchify.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vdit, m) {
  m.def("patchify_3d(Tensor x, int[3] patch_size) -> Tensor");
  m.def("unpatchify_3d(Tensor tokens, int[3] grid, int[3] patch_size) -> Tensor");
}
