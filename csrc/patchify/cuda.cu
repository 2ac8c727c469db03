// CUDA kernels for vdit::patchify_3d and vdit::unpatchify_3d.
//
// One thread block owns a tile of up to `tile_w` tokens of one token row (b, tt, hh). Those tokens
// are a contiguous chunk of the token tensor and come from C * pt * ph contiguous video row
// segments. The block moves the row segments through shared memory, so both global sides are
// read and written with coalesced (and, when aligned, 16-byte) accesses. The index math is the
// one the CPU kernel uses (patchify/math.h); shape checks: patchify/shape.h; packets, loops and
// launches: common/cuda_helpers.cuh.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/cuda_helpers.cuh"
#include "patchify/shape.h"

namespace vdit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 16 * 1024;

struct TokenTiling {
  PatchGeometry g;
  int64_t tile_w;   // tokens per tile
  int64_t tiles_w;  // tiles per token row
};

// Moves the `rows` video row segments of token row (tt, hh), seg_len pixels each from video_b on,
// between the video and the tile in shared memory (kToTile: video -> tile), VEC pixels at a time.
template <typename T, int VEC, bool kToTile>
__device__ __forceinline__ void move_row_segments(const PatchGeometry& g, int64_t tt, int64_t hh, int64_t rows,
                                                  int64_t seg_len, T* video_b, T* tile) {
  block_stride_loop<kThreads, VEC>(rows * seg_len, [&](int64_t e) {
    const int64_t r = e / seg_len, col = e % seg_len;
    int64_t row, feature;
    patch_row(g, tt, hh, r, &row, &feature);
    if constexpr (kToTile) {
      const Packet<T, VEC> p = load_packet<T, VEC>(video_b + row + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) tile[chunk_offset(g, feature, col + v)] = p.v[v];
    } else {
      Packet<T, VEC> p;
#pragma unroll
      for (int v = 0; v < VEC; ++v) p.v[v] = tile[chunk_offset(g, feature, col + v)];
      store_packet(video_b + row + col, p);
    }
  });
}

// dst[0 .. n) = src[0 .. n), the block's threads moving VEC elements at a time.
template <typename T, int VEC>
__device__ __forceinline__ void copy_packets(T* dst, const T* src, int64_t n) {
  block_stride_loop<kThreads, VEC>(n, [&](int64_t e) { store_packet(dst + e, load_packet<T, VEC>(src + e)); });
}

// kToTokens: video -> tokens (patchify); otherwise tokens -> video (unpatchify).
template <typename T, int VEC, bool kToTokens>
__global__ void __launch_bounds__(kThreads) patch_transpose_kernel(T* __restrict__ video, T* __restrict__ tokens,
                                                                   TokenTiling L) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* tile = reinterpret_cast<T*>(smem_bytes);
  const PatchGeometry& g = L.g;
  const int64_t F = g.num_features();

  int64_t block = blockIdx.x;
  const int64_t w_tile = block % L.tiles_w;
  block /= L.tiles_w;
  const int64_t hh = block % g.grid_h();
  block /= g.grid_h();
  const int64_t tt = block % g.grid_t();
  const int64_t b = block / g.grid_t();

  const int64_t ww0 = w_tile * L.tile_w;
  const int64_t n_w = min(L.tile_w, g.grid_w() - ww0);
  const int64_t seg_len = n_w * g.pw;  // pixels per video row segment
  const int64_t rows = g.rows_per_token_row();
  T* video_b = video + b * g.video_numel() + ww0 * g.pw;
  T* chunk = tokens + (b * g.num_tokens() + patch_token_index(g, tt, hh, ww0)) * F;

  // Each side of the tile is written by one phase and read by the other, after __syncthreads.
  if (kToTokens) {
    move_row_segments<T, VEC, true>(g, tt, hh, rows, seg_len, video_b, tile);
    __syncthreads();
    copy_packets<T, VEC>(chunk, tile, n_w * F);
  } else {
    copy_packets<T, VEC>(tile, chunk, n_w * F);
    __syncthreads();
    move_row_segments<T, VEC, false>(g, tt, hh, rows, seg_len, video_b, tile);
  }
}

// 16-byte packets need every row segment and chunk to start on a 16-byte boundary.
template <typename T>
int packet_width(const PatchGeometry& g, int64_t tile_w, const void* a, const void* b) {
  constexpr int vec = kPacketElems<T>;
  const bool divides = g.W % vec == 0 && (tile_w * g.pw) % vec == 0 && g.num_features() % vec == 0;
  return aligned16({a, b}) && divides ? vec : 1;
}

template <bool kToTokens, typename T>
void launch(const PatchGeometry& g, int64_t batch, T* video, T* tokens) {
  const int64_t token_bytes = g.num_features() * sizeof(T);
  TORCH_CHECK(token_bytes <= 48 * 1024, "vdit: a token of ", token_bytes,
              " bytes exceeds the 48 KiB shared-memory tile of the CUDA patchify kernel");
  int64_t tile_w = std::min<int64_t>(g.grid_w(), std::max<int64_t>(1, kTileBytes / token_bytes));
  // Keep the tile a whole number of packets when the row allows it.
  if (tile_w < g.grid_w()) tile_w = std::max<int64_t>(1, tile_w & ~int64_t(15));
  TokenTiling L{g, tile_w, (g.grid_w() + tile_w - 1) / tile_w};
  const int64_t blocks = batch * g.grid_t() * g.grid_h() * L.tiles_w;
  if (blocks == 0) return;
  const size_t smem = tile_w * token_bytes;
  // 8-byte elements (float64) stay scalar: a two-element packet of them costs a stack frame.
  constexpr int kVec = sizeof(T) >= 8 ? 1 : kPacketElems<T>;
  const bool vec = kVec > 1 && packet_width<T>(g, tile_w, video, tokens) == kVec;
  launch_kernel(vec ? patch_transpose_kernel<T, kVec, kToTokens> : patch_transpose_kernel<T, 1, kToTokens>,
                checked_grid_x(blocks, "vdit patchify"), kThreads, smem, c10::cuda::getCurrentCUDAStream(), video,
                tokens, L);
}

at::Tensor patchify_3d_cuda(const at::Tensor& x, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_video(x, patch);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor tokens = new_output(tokens_sizes(g, x.size(0)), x.options());
  with_element_pointers(x, tokens, [&](auto* video, auto* tok) { launch<true>(g, x.size(0), video, tok); });
  return tokens;
}

at::Tensor unpatchify_3d_cuda(const at::Tensor& tokens, at::IntArrayRef grid, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_tokens(tokens, grid, patch);
  c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor x = new_output(video_sizes(g, tokens.size(0)), tokens.options());
  with_element_pointers(x, tokens, [&](auto* video, auto* tok) { launch<false>(g, tokens.size(0), video, tok); });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CUDA, m) {
  m.impl("patchify_3d", &patchify_3d_cuda);
  m.impl("unpatchify_3d", &unpatchify_3d_cuda);
}

}  // namespace vdit
