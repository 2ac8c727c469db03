// Index math of 3D patchify / unpatchify, shared by the CPU and CUDA kernels.
//
// A video (C, T, H, W) is cut into patches of (pt, ph, pw). Token n = (tt * Hp + hh) * Wp + ww
// (w fastest) holds feature f = ((c * pt + i) * ph + j) * pw + k, the pixel x[c, tt*pt+i, hh*ph+j,
// ww*pw+k]. Both kernels move data in "runs": the pw pixels x[c, t, h, ww*pw : ww*pw+pw] are
// contiguous in the video and stay contiguous in the token tensor. All tokens of one
// (tt, hh) token row are contiguous in the output, so a kernel that owns a token row writes
// (or, for unpatchify, reads) one contiguous chunk.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace vdit {

struct PatchGeometry {
  int64_t C, T, H, W;  // video sizes
  int64_t pt, ph, pw;  // patch sizes; each divides the matching video size

  VDIT_HOST_DEVICE int64_t grid_t() const { return T / pt; }
  VDIT_HOST_DEVICE int64_t grid_h() const { return H / ph; }
  VDIT_HOST_DEVICE int64_t grid_w() const { return W / pw; }
  VDIT_HOST_DEVICE int64_t num_tokens() const { return grid_t() * grid_h() * grid_w(); }
  VDIT_HOST_DEVICE int64_t num_features() const { return C * pt * ph * pw; }
  // Video rows (c, i, j) that feed one token row: C * pt * ph rows of W pixels.
  VDIT_HOST_DEVICE int64_t rows_per_token_row() const { return C * pt * ph; }
  VDIT_HOST_DEVICE int64_t video_numel() const { return C * T * H * W; }
};

// Index of token (tt, hh, ww) within its video.
VDIT_HOST_DEVICE int64_t patch_token_index(const PatchGeometry& g, int64_t tt, int64_t hh, int64_t ww) {
  return (tt * g.grid_h() + hh) * g.grid_w() + ww;
}

// Feature offset of the first pixel (k = 0) of run (c, i, j) within a token.
VDIT_HOST_DEVICE int64_t patch_feature_offset(const PatchGeometry& g, int64_t c, int64_t i, int64_t j) {
  return ((c * g.pt + i) * g.ph + j) * g.pw;
}

// Offset of the start of video row (c, t, h) within its video.
VDIT_HOST_DEVICE int64_t video_row_offset(const PatchGeometry& g, int64_t c, int64_t t, int64_t h) {
  return ((c * g.T + t) * g.H + h) * g.W;
}

// The row feeding token row (tt, hh) at row index r in [0, rows_per_token_row()):
// r enumerates (c, i, j) in feature order. Writes the video row offset and the feature offset.
VDIT_HOST_DEVICE void patch_row(const PatchGeometry& g, int64_t tt, int64_t hh, int64_t r,
                                int64_t* video_offset, int64_t* feature_offset) {
  const int64_t j = r % g.ph;
  const int64_t i = (r / g.ph) % g.pt;
  const int64_t c = r / (g.ph * g.pt);
  *video_offset = video_row_offset(g, c, tt * g.pt + i, hh * g.ph + j);
  *feature_offset = patch_feature_offset(g, c, i, j);
}

// Where pixel `col` of a row segment lands within a token chunk: token (col / pw), lane (col % pw).
VDIT_HOST_DEVICE int64_t chunk_offset(const PatchGeometry& g, int64_t feature_offset, int64_t col) {
  return (col / g.pw) * g.num_features() + feature_offset + col % g.pw;
}

}  // namespace vdit
