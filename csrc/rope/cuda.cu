// CUDA kernels for the vdit::rope_3d* operators (3D rotary embedding, optional fused RMS QK-norm).
//
// One thread block owns a tile of `tok` consecutive tokens and every head of q and k for them.
// It first computes the cos / sin of each (token, pair) once into shared memory, then walks the
// (token, head) rows: a group of G lanes (G a power of two <= 32, within one warp) owns a row and
// each lane moves VEC channels at a time with 16-byte loads and stores when alignment allows.
// A lane keeps its channels in registers (at most 8 per lane: head dims up to 256), so the RMS
// norm needs one read of the row (sum of squares reduced with warp shuffles inside the group).
// Pair partners: with interleaved pairs a pair sits inside one vector; otherwise the partner is
// read from global memory (L1 hit: the same group just read the row). Results are written only
// after the whole group has read its row (__syncwarp), which makes the in-place op safe.
// Per-element math: rope/math.h, shared with the CPU kernel; tensor views and checks: rope/shape.h;
// packets, group sums, loops and launches: common/cuda_helpers.cuh.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/alloc.h"
#include "common/cuda_helpers.cuh"
#include "rope/shape.h"

namespace vdit {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPerLane = 8;  // channels a lane holds: D <= 256 with G = 32
constexpr int kMaxHeadDim = 256;

struct Problem {
  RopeChannels L;
  double log_theta;
  int64_t B, Lt;
  const double* pos;
  int64_t psb, psl, psa;
  RopeRows sets[2];
  int nsets;
  int tok;    // tokens per block
  int group;  // lanes per row
  bool inverse;
  bool any_norm;
  double eps;
};

// Rows (heads of q and k) per token.
__host__ __device__ __forceinline__ int64_t heads_per_token(const Problem& P) {
  return P.sets[0].heads + (P.nsets > 1 ? P.sets[1].heads : 0);
}

// This block's tile, tokens [tok0, tok0 + ntok), and the cos / sin of each of its (token, pair) in
// shared memory: cs[t * R + p], sn[t * R + p] for R = rotated / 2 pairs per token.
template <typename A>
struct AngleTile {
  int64_t tok0;
  int ntok, R;
  A* cs;
  A* sn;
};

// Fills the tile's cos / sin (sin negated for `inverse`) at the start of `smem`; the caller syncs.
template <typename A>
__device__ __forceinline__ AngleTile<A> angle_tile(const Problem& P, unsigned char* smem, bool inverse) {
  AngleTile<A> tile;
  const int R = P.L.rotated / 2;
  tile.R = R;
  tile.cs = reinterpret_cast<A*>(smem);
  tile.sn = tile.cs + P.tok * R;
  const int64_t tokens = P.B * P.Lt;
  tile.tok0 = int64_t(blockIdx.x) * P.tok;
  tile.ntok = int(min(int64_t(P.tok), tokens - tile.tok0));
  block_stride_loop(tile.ntok * R, [&](int i) {
    const int t = i / R, p = i % R;
    const int64_t n = tile.tok0 + t;
    const int64_t b = n / P.Lt, l = n % P.Lt;
    const int ax = rope_pair_axis(P.L, p);
    const double pos = P.pos[b * P.psb + l * P.psl + ax * P.psa];
    const A angle = rope_angle<A>(pos, rope_inv_freq(P.L, P.log_theta, p));
    A s, c;
    rope_sincos(angle, &s, &c);
    tile.cs[i] = c;
    tile.sn[i] = inverse ? -s : s;
  });
  return tile;
}

// Rotated value of channel c = c0 + e from a lane's registers `v` (already normalized by
// `scale * weight` when w != null); the partner comes from registers or from `row` in global.
template <typename T, int VEC>
__device__ __forceinline__ at::opmath_type<T> rotated_value(const RopeChannels& L, const at::opmath_type<T>* v, int e,
                                                            int c, const T* row, const at::opmath_type<T>* w,
                                                            at::opmath_type<T> scale, const at::opmath_type<T>* cs,
                                                            const at::opmath_type<T>* sn) {
  using A = at::opmath_type<T>;
  if (c >= L.rotated) return v[e];
  const RopeSlot slot = rope_slot(L, c);
  A partner;
  if (VEC >= 2 && L.interleaved) {
    partner = v[e ^ 1];
  } else {
    partner = static_cast<A>(row[slot.partner]);
    if (w != nullptr) partner = partner * scale * w[slot.partner];
  }
  return rope_rotate(v[e], partner, cs[slot.pair], sn[slot.pair], slot.first);
}

// A copy of one row set, picked without indexing the kernel parameter array dynamically (which
// would copy the parameters to local memory).
__host__ __device__ __forceinline__ RopeRows pick_set(const Problem& P, int s) {
  return s == 0 ? P.sets[0] : P.sets[1];
}

// Row `row` of the tile -> (set, token in tile, head).
__device__ __forceinline__ void row_coords(const Problem& P, int64_t row, int* set, int* t, int64_t* h) {
  const int64_t per_tok = heads_per_token(P);
  *t = int(row / per_tok);
  const int64_t hr = row % per_tok;
  *set = hr < P.sets[0].heads ? 0 : 1;
  *h = *set == 0 ? hr : hr - P.sets[0].heads;
}

// Row `row` of the tile as a kernel reads it: its set (q or k), its token t in the tile (cos / sin
// at tile.cs / tile.sn + t * tile.R), channel 0 of the row in each of the set's tensors, and the
// set's norm weight. An inactive row (row >= rows) gets the coordinates of the tile's first row and
// must not be read or written.
template <typename T, typename A>
struct TileRow {
  int set, t;
  const T* in;  // input (forward) or incoming gradient (backward)
  const T* x;   // backward: the forward input
  T* out;
  const A* w;   // norm weight in the compute type, or null
};

template <typename T, typename A>
__device__ __forceinline__ TileRow<T, A> tile_row(const Problem& P, int64_t tok0, int64_t row, bool active) {
  TileRow<T, A> r;
  int64_t h = 0;
  r.set = 0;
  r.t = 0;
  if (active) row_coords(P, row, &r.set, &r.t, &h);
  const RopeRows S = pick_set(P, r.set);
  const int64_t n = tok0 + r.t, b = n / P.Lt, l = n % P.Lt;
  r.in = static_cast<const T*>(S.in) + b * S.in_sb + l * S.in_sl + h * S.in_sh;
  r.x = static_cast<const T*>(S.x) + b * S.x_sb + l * S.x_sl + h * S.x_sh;
  r.out = static_cast<T*>(S.out) + b * S.out_sb + l * S.out_sl + h * S.out_sh;
  r.w = static_cast<const A*>(S.weight);
  return r;
}

template <typename T, int VEC>
// minBlocksPerSM 2 caps registers at 128; without it ptxas spilled 4-8 bytes in the fp32 kernel on sm_90.
__global__ void __launch_bounds__(kThreads, 2) rope_fwd_kernel(Problem P) {
  using A = at::opmath_type<T>;
  constexpr int kIters = kMaxPerLane / VEC;
  extern __shared__ __align__(16) unsigned char smem[];
  const AngleTile<A> tile = angle_tile<A>(P, smem, P.inverse);
  __syncthreads();

  const GroupRows walk = group_rows(int64_t(tile.ntok) * heads_per_token(P), P.group);
  const int G = walk.G, lane = walk.lane;
  const int D = P.L.head_dim, nvec = D / VEC;
  const A eps = static_cast<A>(P.eps);
  // Every lane runs the same number of iterations so that shuffles and __syncwarp see the whole warp.
  for (const int64_t row : walk) {
    const bool active = walk.active(row);
    const TileRow<T, A> r = tile_row<T, A>(P, tile.tok0, row, active);
    const A* w = r.w;
    A v[kIters][VEC];
    A ss = 0;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) {
        load_packet_as<VEC>(r.in + vi * VEC, v[i]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss += v[i][e] * v[i][e];
      }
    }
    A scale = 1;
    if (P.any_norm) {
      ss = group_sum(ss, G);
      if (w != nullptr) scale = rms_scale(ss, D, eps);
    }
    A y[kIters][VEC];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) {
        if (w != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[i][e] = v[i][e] * scale * w[vi * VEC + e];
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          y[i][e] = rotated_value<T, VEC>(P.L, v[i], e, vi * VEC + e, r.in, w, scale, tile.cs + r.t * tile.R,
                                          tile.sn + r.t * tile.R);
        }
      }
    }
    __syncwarp();  // the whole row is read before any lane overwrites it (in-place)
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) store_packet_as<VEC>(r.out + vi * VEC, y[i]);
    }
    __syncwarp();
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope_bwd_kernel(Problem P) {
  using A = at::opmath_type<T>;
  constexpr int kIters = kMaxPerLane / VEC;
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = P.L.head_dim;
  const AngleTile<A> tile = angle_tile<A>(P, smem, /*inverse=*/true);
  A* gw_tile = tile.sn + P.tok * tile.R;  // (nsets, D) weight-gradient sums of this block
  block_stride_loop(P.nsets * D, [&](int i) { gw_tile[i] = 0; });
  __syncthreads();

  const GroupRows walk = group_rows(int64_t(tile.ntok) * heads_per_token(P), P.group);
  const int G = walk.G, lane = walk.lane, nvec = D / VEC;
  const A eps = static_cast<A>(P.eps);
  for (const int64_t row : walk) {
    const bool active = walk.active(row);
    const TileRow<T, A> r = tile_row<T, A>(P, tile.tok0, row, active);
    const A* w = r.w;
    const A* cs = tile.cs + r.t * tile.R;
    const A* sn = tile.sn + r.t * tile.R;
    // g = inverse rotation of the incoming gradient (sn holds -sin).
    A gy[kIters][VEC], g[kIters][VEC], xh[kIters][VEC];
    A ss = 0;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) {
        load_packet_as<VEC>(r.in + vi * VEC, gy[i]);
        if (w != nullptr) {
          load_packet_as<VEC>(r.x + vi * VEC, xh[i]);
#pragma unroll
          for (int e = 0; e < VEC; ++e) ss += xh[i][e] * xh[i][e];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[i][e] = rotated_value<T, VEC>(P.L, gy[i], e, vi * VEC + e, r.in, nullptr, A(1), cs, sn);
        }
      }
    }
    A scale = 1, dot = 0;
    if (P.any_norm) {
      ss = group_sum(ss, G);
      if (w != nullptr) scale = rms_scale(ss, D, eps);
#pragma unroll
      for (int i = 0; i < kIters; ++i) {
        const int vi = lane + i * G;
        if (active && vi < nvec && w != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int c = vi * VEC + e;
            xh[i][e] *= scale;
            atomicAdd(gw_tile + r.set * D + c, g[i][e] * xh[i][e]);
            g[i][e] *= w[c];
            dot += g[i][e] * xh[i][e];
          }
        }
      }
      dot = group_sum(dot, G) / A(D);
    }
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int vi = lane + i * G;
      if (active && vi < nvec) {
        if (w != nullptr) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) g[i][e] = rms_norm_grad(g[i][e], xh[i][e], scale, dot);
        }
        store_packet_as<VEC>(r.out + vi * VEC, g[i]);
      }
    }
  }
  __syncthreads();
  for (int s = 0; s < P.nsets; ++s) {
    A* partial = static_cast<A*>(pick_set(P, s).gw_partial);
    if (partial == nullptr) continue;
    block_stride_loop(D, [&](int c) { partial[int64_t(blockIdx.x) * D + c] = gw_tile[s * D + c]; });
  }
}

// 16-byte vectors need every row start of every tensor on a 16-byte boundary and D a multiple of VEC.
bool can_vectorize(const Problem& P, int vec) {
  if (P.L.head_dim % vec != 0) return false;
  for (int s = 0; s < P.nsets; ++s) {
    const RopeRows S = pick_set(P, s);
    const int64_t strides[] = {S.in_sb, S.in_sl, S.in_sh, S.out_sb, S.out_sl, S.out_sh, S.x_sb, S.x_sl, S.x_sh};
    for (int64_t st : strides)
      if (st % vec != 0) return false;
    if (!aligned16({S.in, S.out, S.x})) return false;  // (a null x is aligned)
  }
  return true;
}

template <typename T>
int64_t configure(Problem& P, int* vec) {
  using A = at::opmath_type<T>;
  constexpr int kVec = kPacketElems<T>;
  *vec = can_vectorize(P, kVec) ? kVec : 1;
  const int nvec = P.L.head_dim / *vec;
  int G = 1;
  while (G < nvec && G < 32) G <<= 1;
  P.group = G;
  const int64_t per_tok = heads_per_token(P);
  const int64_t rows_per_pass = kThreads / G;
  // About four passes of the block's row groups per tile, and at most 64 tokens.
  P.tok = int(std::max<int64_t>(1, std::min<int64_t>(64, (4 * rows_per_pass + per_tok - 1) / per_tok)));
  // Shared memory for the tile's cos / sin: at most 32 KiB.
  const int64_t per_tok_bytes = 2 * int64_t(P.L.rotated / 2) * sizeof(A);
  if (per_tok_bytes > 0) P.tok = int(std::max<int64_t>(1, std::min<int64_t>(P.tok, 32768 / per_tok_bytes)));
  const int64_t tokens = P.B * P.Lt;
  return (tokens + P.tok - 1) / P.tok;
}

template <typename T>
void launch(Problem& P, bool backward) {
  using A = at::opmath_type<T>;
  int vec;
  const int64_t blocks = configure<T>(P, &vec);
  if (blocks == 0) return;
  size_t smem = 2 * size_t(P.tok) * (P.L.rotated / 2) * sizeof(A);
  if (backward) smem += size_t(P.nsets) * P.L.head_dim * sizeof(A);
  constexpr int kVec = kPacketElems<T>;
  auto kernel = backward ? (vec == kVec ? rope_bwd_kernel<T, kVec> : rope_bwd_kernel<T, 1>)
                         : (vec == kVec ? rope_fwd_kernel<T, kVec> : rope_fwd_kernel<T, 1>);
  launch_kernel(kernel, checked_grid_x(blocks, "vdit rope"), kThreads, smem, c10::cuda::getCurrentCUDAStream(), P);
}

// The problem with positions converted to float64 (exact for integer coordinates below 2^53, so
// converting on to the compute type rounds like the reference's direct conversion).
Problem make_problem(const at::Tensor& x, const at::Tensor& positions, at::IntArrayRef dims, double theta,
                     bool interleaved, at::Tensor* pos64) {
  TORCH_CHECK(x.size(-1) <= kMaxHeadDim, "vdit rope: the CUDA kernel supports head dims up to ", kMaxHeadDim);
  const RopeProblem rp = rope_problem(x, positions, dims, theta, interleaved);
  *pos64 = positions.to(at::kDouble);
  Problem P{};
  P.L = rp.channels;
  P.log_theta = rp.log_theta;
  P.B = rp.B;
  P.Lt = rp.L;
  P.pos = pos64->data_ptr<double>();
  P.psa = pos64->stride(-1);
  if (pos64->dim() == 2) {
    P.psb = 0;
    P.psl = pos64->stride(0);
  } else {
    P.psb = pos64->stride(0);
    P.psl = pos64->stride(1);
  }
  return P;
}

void dispatch(Problem& P, at::ScalarType dtype, bool backward) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vdit_rope_3d_cuda",
                                  [&] { launch<scalar_t>(P, backward); });
}

void forward(const at::Tensor& q, const at::Tensor& q_out, const at::Tensor& qw, const at::Tensor* k,
             const at::Tensor* k_out, const at::Tensor& kw, const at::Tensor& positions, at::IntArrayRef dims,
             double theta, bool interleaved, bool inverse, double eps) {
  at::Tensor pos64;
  Problem P = make_problem(q, positions, dims, theta, interleaved, &pos64);
  P.sets[0] = rope_rows(q, q_out, qw);
  P.nsets = 1;
  if (k != nullptr) {
    P.sets[1] = rope_rows(*k, *k_out, kw);
    P.nsets = 2;
  }
  P.inverse = inverse;
  P.any_norm = qw.defined() || kw.defined();
  P.eps = eps;
  dispatch(P, q.scalar_type(), /*backward=*/false);
}

at::Tensor rope_3d_cuda(const at::Tensor& x, const at::Tensor& positions, at::IntArrayRef dims, double theta,
                        bool interleaved, bool inverse, const c10::optional<at::Tensor>& weight, double eps) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output_like(x);
  forward(x, out, weight_in_compute_type(weight, x), nullptr, nullptr, at::Tensor(), positions, dims, theta,
          interleaved, inverse, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_3d_qk_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& positions, at::IntArrayRef dims, double theta,
                                                   bool interleaved, bool inverse,
                                                   const c10::optional<at::Tensor>& q_weight,
                                                   const c10::optional<at::Tensor>& k_weight, double eps) {
  rope_check_pair(q, k);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = new_output_like(q);
  at::Tensor k_out = new_output_like(k);
  forward(q, q_out, weight_in_compute_type(q_weight, q), &k, &k_out, weight_in_compute_type(k_weight, k), positions,
          dims, theta, interleaved, inverse, eps);
  return {q_out, k_out};
}

void rope_3d_qk_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                             at::IntArrayRef dims, double theta, bool interleaved,
                             const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight,
                             double eps) {
  rope_check_pair(q, k);
  c10::cuda::CUDAGuard guard(q.device());
  forward(q, q, weight_in_compute_type(q_weight, q), &k, &k, weight_in_compute_type(k_weight, k), positions, dims,
          theta, interleaved, false, eps);
}

std::vector<at::Tensor> backward(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& xs,
                                 const std::vector<c10::optional<at::Tensor>>& weights, const at::Tensor& positions,
                                 at::IntArrayRef dims, double theta, bool interleaved, double eps) {
  c10::cuda::CUDAGuard guard(xs[0].device());
  at::Tensor pos64;
  Problem P = make_problem(xs[0], positions, dims, theta, interleaved, &pos64);
  std::vector<at::Tensor> outs, ws;
  for (size_t s = 0; s < xs.size(); ++s) {
    outs.push_back(new_output_like(xs[s]));
    ws.push_back(weight_in_compute_type(weights[s], xs[s]));
    P.sets[s] = rope_backward_rows(grads[s], xs[s], outs[s], ws[s]);
  }
  P.nsets = int(xs.size());
  P.any_norm = false;
  for (auto& w : ws) P.any_norm = P.any_norm || w.defined();
  P.eps = eps;
  // The partial sums need the block count, which depends on the launch configuration.
  int vec;
  int64_t blocks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "vdit_rope_3d_cuda_config",
                                  [&] { blocks = configure<scalar_t>(P, &vec); });
  std::vector<at::Tensor> partials(xs.size());
  for (size_t s = 0; s < xs.size(); ++s) {
    if (ws[s].defined()) {
      partials[s] = at::zeros({std::max<int64_t>(blocks, 1), xs[s].size(-1)}, ws[s].options());
      P.sets[s].gw_partial = partials[s].data_ptr();
    }
  }
  dispatch(P, xs[0].scalar_type(), /*backward=*/true);
  for (const at::Tensor& gw : rope_weight_grads(partials, weights, xs)) outs.push_back(gw);
  return outs;  // grad_x..., grad_w...
}

std::tuple<at::Tensor, at::Tensor> rope_3d_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& positions, at::IntArrayRef dims,
                                                         double theta, bool interleaved,
                                                         const c10::optional<at::Tensor>& weight, double eps) {
  auto outs = backward({grad}, {x}, {weight}, positions, dims, theta, interleaved, eps);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rope_3d_qk_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& positions, at::IntArrayRef dims, double theta, bool interleaved,
    const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight, double eps) {
  rope_check_pair(q, k);
  auto outs = backward({grad_q, grad_k}, {q, k}, {q_weight, k_weight}, positions, dims, theta, interleaved, eps);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CUDA, m) {
  m.impl("rope_3d", &rope_3d_cuda);
  m.impl("rope_3d_qk", &rope_3d_qk_cuda);
  m.impl("rope_3d_qk_", &rope_3d_qk_inplace_cuda);
  m.impl("rope_3d_backward", &rope_3d_backward_cuda);
  m.impl("rope_3d_qk_backward", &rope_3d_qk_backward_cuda);
}

}  // namespace vdit
