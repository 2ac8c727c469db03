// CPU kernels for vdit::patchify_3d and vdit::unpatchify_3d.
//
// Work is split by token row (b, tt, hh): its tokens are one contiguous chunk of the output, fed by
// C * pt * ph video rows, so every thread writes (or reads) a private chunk that fits in cache.
// The copies move raw elements, so one instantiation per element size serves every dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "../alloc.h"
#include "../patchify_shape.h"

namespace vdit {
namespace {

template <typename T, bool kToTokens>
void copy_token_row(const PatchGeometry& g, T* video, T* chunk, int64_t tt, int64_t hh) {
  const int64_t F = g.num_features();
  const int64_t Wp = g.grid_w();
  for (int64_t r = 0; r < g.rows_per_token_row(); ++r) {
    int64_t row, feature;
    patch_row(g, tt, hh, r, &row, &feature);
    T* v = video + row;
    T* c = chunk + feature;
    for (int64_t ww = 0; ww < Wp; ++ww) {
      T* vrun = v + ww * g.pw;
      T* crun = c + ww * F;
      for (int64_t k = 0; k < g.pw; ++k) {
        if (kToTokens) crun[k] = vrun[k];
        else vrun[k] = crun[k];
      }
    }
  }
}

template <typename T, bool kToTokens>
void patch_transpose(const PatchGeometry& g, int64_t batch, T* video, T* tokens) {
  const int64_t Tp = g.grid_t(), Hp = g.grid_h();
  const int64_t chunk = g.grid_w() * g.num_features();
  const int64_t token_rows = batch * Tp * Hp;
  // Grain: enough token rows per task to amortize scheduling on small videos.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(chunk, 1));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t hh = n % Hp, tt = (n / Hp) % Tp, b = n / (Hp * Tp);
      copy_token_row<T, kToTokens>(g, video + b * g.video_numel(), tokens + n * chunk, tt, hh);
    }
  });
}

template <bool kToTokens>
void dispatch_element_size(const PatchGeometry& g, int64_t batch, void* video, void* tokens, int64_t elem) {
  switch (elem) {
    case 1: return patch_transpose<uint8_t, kToTokens>(g, batch, (uint8_t*)video, (uint8_t*)tokens);
    case 2: return patch_transpose<uint16_t, kToTokens>(g, batch, (uint16_t*)video, (uint16_t*)tokens);
    case 4: return patch_transpose<uint32_t, kToTokens>(g, batch, (uint32_t*)video, (uint32_t*)tokens);
    case 8: return patch_transpose<uint64_t, kToTokens>(g, batch, (uint64_t*)video, (uint64_t*)tokens);
    default: TORCH_CHECK(false, "vdit: unsupported element size ", elem);
  }
}

at::Tensor patchify_3d_cpu(const at::Tensor& x, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_video(x, patch);
  at::Tensor tokens = new_output({x.size(0), g.num_tokens(), g.num_features()}, x.options());
  dispatch_element_size<true>(g, x.size(0), x.data_ptr(), tokens.data_ptr(), x.element_size());
  return tokens;
}

at::Tensor unpatchify_3d_cpu(const at::Tensor& tokens, at::IntArrayRef grid, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_tokens(tokens, grid, patch);
  at::Tensor x = new_output({tokens.size(0), g.C, g.T, g.H, g.W}, tokens.options());
  dispatch_element_size<false>(g, tokens.size(0), x.data_ptr(), tokens.data_ptr(), tokens.element_size());
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("patchify_3d", &patchify_3d_cpu);
  m.impl("unpatchify_3d", &unpatchify_3d_cpu);
}

}  // namespace vdit
