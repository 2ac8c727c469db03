// Host-side shape checks and the packed-batch descriptor of the patch embedding operators, for
// patch_embed/cpu.cpp (and a future patch_embed/cuda.cu). Python validates first with friendly
// messages; these checks are the last line that keeps a kernel from reading out of bounds.
// Per-sample metadata columns and pixel index math: patch_embed/math.h (and patchify/math.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "common/shape.h"
#include "patch_embed/math.h"

namespace vdit {

// (T, H, W) of each video of a batch or list.
using VideoSizes = std::vector<std::array<int64_t, 3>>;

// Bytes of one compute-type value (float32, or float64 for float64 tensors).
inline int64_t compute_bytes(at::ScalarType dtype) { return dtype == at::kDouble ? 8 : 4; }

// t in the compute type, contiguous (weights and biases enter the GEMMs this way).
inline at::Tensor to_compute(const at::Tensor& t) { return t.to(acc_type_of(t.scalar_type())).contiguous(); }

// t has `dim` dims, is contiguous and has like's dtype and device.
inline void check_input(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device());
}

// Embedding weight (D, C, pt, ph, pw) for C input channels and optional bias (D,), like `like`.
inline void check_embed_weight(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& like, int64_t C) {
  check_input(op, "weight", weight, 5, like);
  TORCH_CHECK(weight.size(1) == C, op, ": weight expects ", weight.size(1), " channels, got ", C);
  if (bias.has_value()) {
    check_input(op, "bias", *bias, 1, like);
    TORCH_CHECK(bias->size(0) == weight.size(0), op, ": bias must have ", weight.size(0), " entries");
  }
}

// A non-empty list of (C, T, H, W) videos with one dtype, device and channel count.
inline void check_video_list(const char* op, at::TensorList videos) {
  TORCH_CHECK(!videos.empty(), op, ": videos must not be empty");
  for (const auto& v : videos) {
    check_input(op, "videos[i]", v, 4, videos[0]);
    TORCH_CHECK(v.size(0) == videos[0].size(0), op, ": every video needs the same channel count");
  }
}

// Unembedding tokens (token_dim dims, last D), weight (C * pt * ph * pw, D) and optional bias; returns C.
inline int64_t check_unembed(const char* op, const at::Tensor& tokens, int64_t token_dim, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef patch) {
  check_input(op, "tokens", tokens, token_dim, tokens);
  check_input(op, "weight", weight, 2, tokens);
  TORCH_CHECK(patch.size() == 3 && patch[0] > 0 && patch[1] > 0 && patch[2] > 0, op, ": bad patch_size ", patch);
  const int64_t volume = patch[0] * patch[1] * patch[2];
  TORCH_CHECK(weight.size(1) == tokens.size(-1) && weight.size(0) % volume == 0, op, ": weight ", weight.sizes(),
              " does not fit tokens ", tokens.sizes(), " and patch_size ", patch);
  if (bias.has_value()) {
    check_input(op, "bias", *bias, 1, tokens);
    TORCH_CHECK(bias->size(0) == weight.size(0), op, ": bias must have ", weight.size(0), " entries");
  }
  return weight.size(0) / volume;
}

inline VideoSizes dense_sizes(const at::Tensor& x) {
  return VideoSizes(x.size(0), {x.size(2), x.size(3), x.size(4)});
}

inline VideoSizes list_sizes(const at::TensorList videos) {
  VideoSizes sizes;
  for (const auto& v : videos) sizes.push_back({v.size(1), v.size(2), v.size(3)});
  return sizes;
}

// Video sizes from a flat (Tp0, Hp0, Wp0, Tp1, ...) list of token grids.
inline VideoSizes grid_sizes(at::IntArrayRef grids, at::IntArrayRef patch) {
  TORCH_CHECK(grids.size() % 3 == 0 && !grids.empty(), "vdit::patch_unembed_3d: grids must hold 3 ints per sample");
  VideoSizes sizes;
  for (size_t i = 0; i < grids.size(); i += 3) {
    TORCH_CHECK(grids[i] > 0 && grids[i + 1] > 0 && grids[i + 2] > 0, "vdit::patch_unembed_3d: bad grid");
    sizes.push_back({grids[i] * patch[0], grids[i + 1] * patch[1], grids[i + 2] * patch[2]});
  }
  return sizes;
}

// Per-sample base pointers of a dense (B, ...) batch or of a list of tensors.
inline std::vector<void*> batch_pointers(const at::Tensor& x) {
  std::vector<void*> ptrs;
  const int64_t stride = x.numel() / x.size(0) * x.element_size();
  for (int64_t b = 0; b < x.size(0); ++b) ptrs.push_back(static_cast<char*>(x.data_ptr()) + b * stride);
  return ptrs;
}

inline std::vector<void*> list_pointers(const std::vector<at::Tensor>& xs) {
  std::vector<void*> ptrs;
  for (const auto& x : xs) ptrs.push_back(x.data_ptr());
  return ptrs;
}

// A batch or list of videos cut into patches: the per-sample metadata table (host, int64
// (B, kPackedMetaCols), patch_embed/math.h) and the sizes every kernel derives from it.
struct PackedPatches {
  at::Tensor meta;
  int64_t C = 0, pt = 0, ph = 0, pw = 0, F = 0, total_tokens = 0;

  PatchGeometry geometry(int64_t s) const {
    return packed_sample_geometry(meta.data_ptr<int64_t>(), s, C, pt, ph, pw);
  }
  int64_t token_offset(int64_t s) const { return meta.data_ptr<int64_t>()[s * kPackedMetaCols + kMetaTokenOffset]; }
  int64_t batch() const { return meta.size(0); }
};

// The packing of videos of `sizes` with C channels into patches of `patch`; each patch size must
// divide the matching video size.
inline PackedPatches packed_patches(const VideoSizes& sizes, int64_t C, at::IntArrayRef patch) {
  PackedPatches p;
  p.C = C;
  p.pt = patch[0];
  p.ph = patch[1];
  p.pw = patch[2];
  p.F = C * patch[0] * patch[1] * patch[2];
  const int64_t B = static_cast<int64_t>(sizes.size());
  p.meta = at::empty({B, kPackedMetaCols}, at::kLong);
  int64_t* meta = p.meta.data_ptr<int64_t>();
  int64_t tokens = 0, rows = 0, elems = 0;
  for (int64_t s = 0; s < B; ++s) {
    const auto& [T, H, W] = sizes[s];
    TORCH_CHECK(T % p.pt == 0 && H % p.ph == 0 && W % p.pw == 0, "vdit::patch_embed: patch size ", patch,
                " must divide (T, H, W) = (", T, ", ", H, ", ", W, ") of sample ", s);
    int64_t* row = meta + s * kPackedMetaCols;
    row[kMetaTokenOffset] = tokens;
    row[kMetaT] = T;
    row[kMetaH] = H;
    row[kMetaW] = W;
    row[kMetaRowOffset] = rows;
    row[kMetaVideoOffset] = elems;
    const PatchGeometry g = p.geometry(s);
    tokens += g.num_tokens();
    rows += g.grid_t() * g.grid_h();
    elems += g.video_numel();
  }
  p.total_tokens = tokens;
  return p;
}

}  // namespace vdit
