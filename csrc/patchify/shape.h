// Host-side shape checks of the patchify operators, shared by patchify/cpu.cpp and patchify/cuda.cu.
// Python validates first with friendly messages; these checks are the last line that keeps a kernel
// from reading out of bounds. Index math: patchify/math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "patchify/math.h"

namespace vdit {

inline PatchGeometry geometry_from_video(const at::Tensor& x, at::IntArrayRef patch) {
  TORCH_CHECK(x.dim() == 5, "vdit::patchify_3d: x must be (B, C, T, H, W), got ", x.sizes());
  TORCH_CHECK(patch.size() == 3, "vdit::patchify_3d: patch_size must have 3 entries");
  TORCH_CHECK(x.is_contiguous(), "vdit::patchify_3d: x must be contiguous");
  PatchGeometry g{x.size(1), x.size(2), x.size(3), x.size(4), patch[0], patch[1], patch[2]};
  TORCH_CHECK(g.pt > 0 && g.ph > 0 && g.pw > 0 && g.T % g.pt == 0 && g.H % g.ph == 0 && g.W % g.pw == 0,
              "vdit::patchify_3d: patch_size ", patch, " must divide (T, H, W) = ", x.sizes().slice(2));
  return g;
}

inline PatchGeometry geometry_from_tokens(const at::Tensor& tokens, at::IntArrayRef grid, at::IntArrayRef patch) {
  TORCH_CHECK(tokens.dim() == 3, "vdit::unpatchify_3d: tokens must be (B, N, F), got ", tokens.sizes());
  TORCH_CHECK(grid.size() == 3 && patch.size() == 3, "vdit::unpatchify_3d: grid and patch_size need 3 entries");
  TORCH_CHECK(tokens.is_contiguous(), "vdit::unpatchify_3d: tokens must be contiguous");
  const int64_t patch_volume = patch[0] * patch[1] * patch[2];
  TORCH_CHECK(patch_volume > 0 && tokens.size(2) % patch_volume == 0,
              "vdit::unpatchify_3d: features ", tokens.size(2), " not divisible by patch volume ", patch_volume);
  TORCH_CHECK(tokens.size(1) == grid[0] * grid[1] * grid[2],
              "vdit::unpatchify_3d: N = ", tokens.size(1), " does not match grid ", grid);
  return PatchGeometry{tokens.size(2) / patch_volume, grid[0] * patch[0], grid[1] * patch[1],
                       grid[2] * patch[2], patch[0], patch[1], patch[2]};
}

// Output sizes: the tokens (B, N, F) of a batch of videos, and the videos (B, C, T, H, W) of a batch of tokens.
inline std::vector<int64_t> tokens_sizes(const PatchGeometry& g, int64_t batch) {
  return {batch, g.num_tokens(), g.num_features()};
}
inline std::vector<int64_t> video_sizes(const PatchGeometry& g, int64_t batch) { return {batch, g.C, g.T, g.H, g.W}; }

// The kernels move raw elements, so one instantiation per element size serves every dtype: calls
// f(video, tokens) with both data pointers as the unsigned integer type of the element size.
template <typename F>
void with_element_pointers(const at::Tensor& video, const at::Tensor& tokens, F&& f) {
  void* v = video.data_ptr();
  void* t = tokens.data_ptr();
  switch (video.element_size()) {
    case 1: return f(static_cast<uint8_t*>(v), static_cast<uint8_t*>(t));
    case 2: return f(static_cast<uint16_t*>(v), static_cast<uint16_t*>(t));
    case 4: return f(static_cast<uint32_t*>(v), static_cast<uint32_t*>(t));
    case 8: return f(static_cast<uint64_t*>(v), static_cast<uint64_t*>(t));
    default: TORCH_CHECK(false, "vdit: unsupported element size ", video.element_size());
  }
}

}  // namespace vdit
