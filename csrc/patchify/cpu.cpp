// CPU kernels for vdit::patchify_3d and vdit::unpatchify_3d.
//
// Work is split by token row (b, tt, hh): its tokens are one contiguous chunk of the output, fed by
// C * pt * ph video rows, so every thread writes (or reads) a private chunk that fits in cache.
// The copies move raw elements, so one instantiation per element size serves every dtype.
// Index math: patchify/math.h, shared with patchify/cuda.cu; shape checks: patchify/shape.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "common/alloc.h"
#include "patchify/shape.h"

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

template <bool kToTokens, typename T>
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

at::Tensor patchify_3d_cpu(const at::Tensor& x, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_video(x, patch);
  at::Tensor tokens = new_output(tokens_sizes(g, x.size(0)), x.options());
  with_element_pointers(x, tokens, [&](auto* video, auto* tok) { patch_transpose<true>(g, x.size(0), video, tok); });
  return tokens;
}

at::Tensor unpatchify_3d_cpu(const at::Tensor& tokens, at::IntArrayRef grid, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_tokens(tokens, grid, patch);
  at::Tensor x = new_output(video_sizes(g, tokens.size(0)), tokens.options());
  with_element_pointers(x, tokens,
                        [&](auto* video, auto* tok) { patch_transpose<false>(g, tokens.size(0), video, tok); });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("patchify_3d", &patchify_3d_cpu);
  m.impl("unpatchify_3d", &unpatchify_3d_cpu);
}

}  // namespace vdit
