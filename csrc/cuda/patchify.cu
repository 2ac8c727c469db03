// CUDA kernels for vdit::patchify_3d and vdit::unpatchify_3d.
//
// One thread block owns a tile of up to `tile_w` tokens of one token row (b, tt, hh). Those tokens
// are a contiguous chunk of the token tensor and come from C * pt * ph contiguous video row
// segments. The block moves the row segments through shared memory, so both global sides are
// read and written with coalesced (and, when aligned, 16-byte) accesses. The index math is the
// one the CPU kernel uses (csrc/common/patchify.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../alloc.h"
#include "../patchify_shape.h"

namespace vdit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBytes = 16 * 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

struct TileLayout {
  PatchGeometry g;
  int64_t tile_w;   // tokens per tile
  int64_t tiles_w;  // tiles per token row
};

// kToTokens: video -> tokens (patchify); otherwise tokens -> video (unpatchify).
template <typename T, int VEC, bool kToTokens>
__global__ void __launch_bounds__(kThreads) patch_transpose_kernel(T* __restrict__ video, T* __restrict__ tokens,
                                                                   TileLayout L) {
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
  using P = Packet<T, VEC>;

  if (kToTokens) {
    for (int64_t e = threadIdx.x * VEC; e < rows * seg_len; e += kThreads * VEC) {
      const int64_t r = e / seg_len, col = e % seg_len;
      int64_t row, feature;
      patch_row(g, tt, hh, r, &row, &feature);
      const P p = *reinterpret_cast<const P*>(video_b + row + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) tile[chunk_offset(g, feature, col + v)] = p.v[v];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x * VEC; e < n_w * F; e += kThreads * VEC) {
      *reinterpret_cast<P*>(chunk + e) = *reinterpret_cast<const P*>(tile + e);
    }
  } else {
    for (int64_t e = threadIdx.x * VEC; e < n_w * F; e += kThreads * VEC) {
      *reinterpret_cast<P*>(tile + e) = *reinterpret_cast<const P*>(chunk + e);
    }
    __syncthreads();
    for (int64_t e = threadIdx.x * VEC; e < rows * seg_len; e += kThreads * VEC) {
      const int64_t r = e / seg_len, col = e % seg_len;
      int64_t row, feature;
      patch_row(g, tt, hh, r, &row, &feature);
      P p;
#pragma unroll
      for (int v = 0; v < VEC; ++v) p.v[v] = tile[chunk_offset(g, feature, col + v)];
      *reinterpret_cast<P*>(video_b + row + col) = p;
    }
  }
}

// 16-byte packets need every row segment and chunk to start on a 16-byte boundary.
template <typename T>
int packet_width(const PatchGeometry& g, int64_t tile_w, const void* a, const void* b) {
  constexpr int vec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  const bool divides = g.W % vec == 0 && (tile_w * g.pw) % vec == 0 && g.num_features() % vec == 0;
  return aligned && divides ? vec : 1;
}

template <typename T, bool kToTokens>
void launch(const PatchGeometry& g, int64_t batch, void* video, void* tokens) {
  const int64_t token_bytes = g.num_features() * sizeof(T);
  TORCH_CHECK(token_bytes <= 48 * 1024, "vdit: a token of ", token_bytes,
              " bytes exceeds the 48 KiB shared-memory tile of the CUDA patchify kernel");
  int64_t tile_w = std::min<int64_t>(g.grid_w(), std::max<int64_t>(1, kTileBytes / token_bytes));
  // Keep the tile a whole number of packets when the row allows it.
  if (tile_w < g.grid_w()) tile_w = std::max<int64_t>(1, tile_w & ~int64_t(15));
  TileLayout L{g, tile_w, (g.grid_w() + tile_w - 1) / tile_w};
  const int64_t blocks = batch * g.grid_t() * g.grid_h() * L.tiles_w;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "vdit: patchify grid too large");
  const size_t smem = tile_w * token_bytes;
  auto stream = c10::cuda::getCurrentCUDAStream();
  T* v = static_cast<T*>(video);
  T* t = static_cast<T*>(tokens);
  // 8-byte elements (float64) stay scalar: a two-element packet of them costs a stack frame.
  constexpr int kVec = sizeof(T) >= 8 ? 1 : 16 / sizeof(T);
  if (kVec > 1 && packet_width<T>(g, tile_w, video, tokens) == kVec) {
    patch_transpose_kernel<T, kVec, kToTokens><<<blocks, kThreads, smem, stream>>>(v, t, L);
  } else {
    patch_transpose_kernel<T, 1, kToTokens><<<blocks, kThreads, smem, stream>>>(v, t, L);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kToTokens>
void dispatch_element_size(const PatchGeometry& g, int64_t batch, void* video, void* tokens, int64_t elem) {
  switch (elem) {
    case 1: return launch<uint8_t, kToTokens>(g, batch, video, tokens);
    case 2: return launch<uint16_t, kToTokens>(g, batch, video, tokens);
    case 4: return launch<uint32_t, kToTokens>(g, batch, video, tokens);
    case 8: return launch<uint64_t, kToTokens>(g, batch, video, tokens);
    default: TORCH_CHECK(false, "vdit: unsupported element size ", elem);
  }
}

at::Tensor patchify_3d_cuda(const at::Tensor& x, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_video(x, patch);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor tokens = new_output({x.size(0), g.num_tokens(), g.num_features()}, x.options());
  dispatch_element_size<true>(g, x.size(0), x.data_ptr(), tokens.data_ptr(), x.element_size());
  return tokens;
}

at::Tensor unpatchify_3d_cuda(const at::Tensor& tokens, at::IntArrayRef grid, at::IntArrayRef patch) {
  const PatchGeometry g = geometry_from_tokens(tokens, grid, patch);
  c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor x = new_output({tokens.size(0), g.C, g.T, g.H, g.W}, tokens.options());
  dispatch_element_size<false>(g, tokens.size(0), x.data_ptr(), tokens.data_ptr(), tokens.element_size());
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CUDA, m) {
  m.impl("patchify_3d", &patchify_3d_cuda);
  m.impl("unpatchify_3d", &unpatchify_3d_cuda);
}

}  // namespace vdit
