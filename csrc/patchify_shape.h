// Host-side shape checks for the patchify kernels. Python validates first with friendly
// messages; these checks are the last line that keeps a kernel from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/patchify.h"

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

}  // namespace vdit
