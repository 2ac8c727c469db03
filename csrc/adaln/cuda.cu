// CUDA kernels for vdit::adaln_modulate, vdit::gated_residual and their backwards.
//
// Row kernels (adaln forward, adaln grad_x, gated residual, gated grad_y): one warp per token row,
// 8 rows per block. A warp finds its row's sample by binary search over cu_seqlens (B + 1 ints,
// cached), so no per-token index tensor exists. Loads and stores are 16-byte packets when every
// pointer is 16-byte aligned and C is a multiple of the packet. The adaln forward is two-pass
// (mean, then squared deviations): for C up to 32 (or 96) values per lane the row stays in
// registers; wider rows are re-read (from L1/L2) for each pass.
// Parameter gradients: a column kernel sums over fixed blocks of kColRows rows with one thread
// per column (coalesced), writing one partial per (block, sample) slot; a second kernel adds the
// slots of each sample in block order (adaln/math.h). No atomics: results are deterministic.
// The per-element math is the CPU kernels' (adaln/math.h); shape checks: adaln/shape.h; packets,
// warp sums and launches: common/cuda_helpers.cuh.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adaln/shape.h"
#include "common/alloc.h"
#include "common/cuda_helpers.cuh"

namespace vdit {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kColThreads = 256;
constexpr int64_t kColRows = 64;  // rows per partial-sum block of the column kernels
// Blocks per SM promised to ptxas: with 256 threads, 2 caps registers at 128 (row kernels), 4 at
// 64 (column kernels), 1 at 255 (forward with 96 values per lane in registers). Given the thread
// count alone, ptxas (CUDA 13) chose 32 registers and spilled in some of these kernels.
constexpr int kRowMinBlocks = 2;
constexpr int kColMinBlocks = 4;

// ---- adaln_modulate forward -------------------------------------------------------------------

// ITEMS > 0: each lane keeps ITEMS packets of its row in registers (C <= 32 * VEC * ITEMS);
// ITEMS == 0: the row is read from memory once per pass.
template <typename T, typename A, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads, ITEMS * VEC > 32 ? 1 : kRowMinBlocks)
    adaln_forward_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                         T* __restrict__ out, A* __restrict__ mean_out, A* __restrict__ rstd_out, Segments seg,
                         int64_t rows, int64_t C, A eps) {
  const auto [row, lane] = warp_row<kWarps>();
  if (row >= rows) return;
  const int64_t s = seg.sample_of(row);
  const T* xr = x + row * C;
  const T* sc = scale + s * C;
  const T* sf = shift + s * C;
  T* o = out + row * C;
  constexpr int64_t kStride = 32 * VEC;
  using P = Packet<T, VEC>;

  A sum = 0, sq = 0, mean, rstd;
  if constexpr (ITEMS > 0) {
    A v[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = i * kStride + lane * VEC;
      if (c < C) {
        const P p = load_packet<T, VEC>(xr + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[i][j] = static_cast<A>(p.v[j]);
          sum += v[i][j];
        }
      }
    }
    mean = warp_sum(sum) / A(C);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i * kStride + lane * VEC < C) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) sq += (v[i][j] - mean) * (v[i][j] - mean);
      }
    }
    rstd = adaln_rstd(warp_sum(sq), C, eps);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c = i * kStride + lane * VEC;
      if (c < C) {
        const P ps = load_packet<T, VEC>(sc + c), pf = load_packet<T, VEC>(sf + c);
        P r;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          r.v[j] = static_cast<T>(adaln_element(v[i][j], mean, rstd, A(1) + static_cast<A>(ps.v[j]),
                                                static_cast<A>(pf.v[j])));
        }
        store_packet(o + c, r);
      }
    }
  } else {
    for (int64_t c = lane * VEC; c < C; c += kStride) {
      const P p = load_packet<T, VEC>(xr + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += static_cast<A>(p.v[j]);
    }
    mean = warp_sum(sum) / A(C);
    for (int64_t c = lane * VEC; c < C; c += kStride) {
      const P p = load_packet<T, VEC>(xr + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = static_cast<A>(p.v[j]) - mean;
        sq += d * d;
      }
    }
    rstd = adaln_rstd(warp_sum(sq), C, eps);
    for (int64_t c = lane * VEC; c < C; c += kStride) {
      const P p = load_packet<T, VEC>(xr + c), ps = load_packet<T, VEC>(sc + c), pf = load_packet<T, VEC>(sf + c);
      P r;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        r.v[j] = static_cast<T>(adaln_element(static_cast<A>(p.v[j]), mean, rstd, A(1) + static_cast<A>(ps.v[j]),
                                              static_cast<A>(pf.v[j])));
      }
      store_packet(o + c, r);
    }
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// ---- adaln_modulate backward: grad_x ----------------------------------------------------------

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    adaln_grad_x_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ scale,
                        const A* __restrict__ mean, const A* __restrict__ rstd, T* __restrict__ grad_x, Segments seg,
                        int64_t rows, int64_t C) {
  const auto [row, lane] = warp_row<kWarps>();
  if (row >= rows) return;
  const int64_t s = seg.sample_of(row);
  const T* gr = grad + row * C;
  const T* xr = x + row * C;
  const T* sc = scale + s * C;
  const A m = mean[row], rs = rstd[row];
  constexpr int64_t kStride = 32 * VEC;
  using P = Packet<T, VEC>;

  A sum_dxhat = 0, sum_dxhat_xhat = 0;
  for (int64_t c = lane * VEC; c < C; c += kStride) {
    const P pg = load_packet<T, VEC>(gr + c), px = load_packet<T, VEC>(xr + c), ps = load_packet<T, VEC>(sc + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A dxhat = static_cast<A>(pg.v[j]) * (A(1) + static_cast<A>(ps.v[j]));
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * (static_cast<A>(px.v[j]) - m) * rs;
    }
  }
  const A a = warp_sum(sum_dxhat) / A(C), b = warp_sum(sum_dxhat_xhat) / A(C);
  for (int64_t c = lane * VEC; c < C; c += kStride) {
    const P pg = load_packet<T, VEC>(gr + c), px = load_packet<T, VEC>(xr + c), ps = load_packet<T, VEC>(sc + c);
    P r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A dxhat = static_cast<A>(pg.v[j]) * (A(1) + static_cast<A>(ps.v[j]));
      r.v[j] = static_cast<T>(adaln_grad_x(dxhat, (static_cast<A>(px.v[j]) - m) * rs, rs, a, b));
    }
    store_packet(grad_x + row * C + c, r);
  }
}

// ---- gated_residual (forward, and grad_y = gate * grad_out without x) -------------------------

template <typename T, typename A, int VEC, bool kHasX>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    gated_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate, T* __restrict__ out,
                 Segments seg, int64_t rows, int64_t C) {
  const auto [row, lane] = warp_row<kWarps>();
  if (row >= rows) return;
  const T* gt = gate + seg.sample_of(row) * C;
  using P = Packet<T, VEC>;
  // Bounded unroll: fully unrolled, the double variant needed 128 registers and spilled on sm_90.
#pragma unroll 4
  for (int64_t c = lane * VEC; c < C; c += 32 * VEC) {
    const P py = load_packet<T, VEC>(y + row * C + c), pg = load_packet<T, VEC>(gt + c);
    P px;
    if constexpr (kHasX) px = load_packet<T, VEC>(x + row * C + c);
    P r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A xv = kHasX ? static_cast<A>(px.v[j]) : A(0);
      r.v[j] = static_cast<T>(gated_element(xv, static_cast<A>(pg.v[j]), static_cast<A>(py.v[j])));
    }
    store_packet(out + row * C + c, r);
  }
}

// ---- parameter gradients: column partial sums and their per-sample reduction ------------------

// kAdaln: slot gets [sum grad, sum grad * xhat] (other = x); else [sum grad * y] (other = y).
template <typename T, typename A, bool kAdaln>
__global__ void __launch_bounds__(kColThreads, kColMinBlocks)
    column_partials_kernel(const T* __restrict__ grad, const T* __restrict__ other, const A* __restrict__ mean,
                           const A* __restrict__ rstd, A* __restrict__ partials, Segments seg, int64_t rows,
                           int64_t C) {
  constexpr int kAcc = kAdaln ? 2 : 1;
  const int64_t k = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t block_end = min(rows, (k + 1) * kColRows);
  int64_t r = k * kColRows;
  while (r < block_end) {
    const int64_t s = seg.sample_of(r);
    const int64_t e = min(block_end, max(seg.end(s), r + 1));
    A a0 = 0, a1 = 0;
    for (; r < e; ++r) {
      const A g = static_cast<A>(grad[r * C + c]);
      const A v = static_cast<A>(other[r * C + c]);
      if constexpr (kAdaln) {
        a0 += g;
        a1 += g * ((v - mean[r]) * rstd[r]);
      } else {
        a0 += g * v;
      }
    }
    A* p = partials + partial_slot(k, s) * kAcc * C;
    p[c] = a0;
    if constexpr (kAdaln) p[C + c] = a1;
  }
}

template <typename T, typename A, int kAcc>
__global__ void __launch_bounds__(kColThreads, kColMinBlocks)
    reduce_partials_kernel(const A* __restrict__ partials, T* __restrict__ out0, T* __restrict__ out1, Segments seg,
                           int64_t rows, int64_t C) {
  const int64_t s = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kColThreads + threadIdx.x;
  if (c >= C) return;
  // Clamped so that inconsistent offsets (validated in Python) cannot index past the slots.
  const int64_t r0 = min(max(seg.begin(s), int64_t(0)), rows);
  const int64_t r1 = min(max(seg.end(s), r0), rows);
  A a0 = 0, a1 = 0;
  if (r1 > r0) {
    for (int64_t k = r0 / kColRows; k <= (r1 - 1) / kColRows; ++k) {
      const A* p = partials + partial_slot(k, s) * kAcc * C;
      a0 += p[c];
      if constexpr (kAcc == 2) a1 += p[C + c];
    }
  }
  out0[s * C + c] = static_cast<T>(a0);
  if constexpr (kAcc == 2) out1[s * C + c] = static_cast<T>(a1);
}

// ---- launchers --------------------------------------------------------------------------------

// Row kernels: one warp per row, kWarps rows per block.
unsigned row_blocks(int64_t rows) { return checked_grid_x((rows + kWarps - 1) / kWarps, "vdit adaln"); }

template <typename T, typename A>
void launch_forward(const T* x, const T* shift, const T* scale, T* out, A* mean, A* rstd, const AdalnShape& sh,
                    A eps, cudaStream_t stream) {
  constexpr int V = kPacketElems<T>;
  const int64_t C = sh.C;
  auto kernel = adaln_forward_kernel<T, A, 1, 0>;
  if (C % V == 0 && aligned16({x, shift, scale, out})) {
    const int64_t per_lane = (C + 32 * V - 1) / (32 * V) * V;  // values per lane
    // Register-cached rows: up to 32 values per lane, or 96 for float math (C = 3072 at 16 bits or
    // fp32); doubles take two registers each, so double rows above 32 values per lane are re-read.
    constexpr int kWide = sizeof(A) == 4 ? 96 : 32;
    if (per_lane <= 32) {
      kernel = adaln_forward_kernel<T, A, V, 32 / V>;
    } else if (kWide > 32 && per_lane <= kWide) {
      kernel = adaln_forward_kernel<T, A, V, kWide / V>;
    } else {
      kernel = adaln_forward_kernel<T, A, V, 0>;
    }
  }
  launch_kernel(kernel, row_blocks(sh.rows), kThreads, 0, stream, x, shift, scale, out, mean, rstd, sh.seg, sh.rows,
                C, eps);
}

template <typename T, typename A>
void launch_grad_x(const T* grad, const T* x, const T* scale, const A* mean, const A* rstd, T* grad_x,
                   const AdalnShape& sh, cudaStream_t stream) {
  constexpr int V = kPacketElems<T>;
  const bool vec = sh.C % V == 0 && aligned16({grad, x, scale, grad_x});
  launch_kernel(vec ? adaln_grad_x_kernel<T, A, V> : adaln_grad_x_kernel<T, A, 1>, row_blocks(sh.rows), kThreads, 0,
                stream, grad, x, scale, mean, rstd, grad_x, sh.seg, sh.rows, sh.C);
}

template <typename T, typename A>
void launch_gated(const T* x, const T* y, const T* gate, T* out, const AdalnShape& sh, cudaStream_t stream) {
  constexpr int V = kPacketElems<T>;
  const bool vec = sh.C % V == 0 && aligned16({x, y, gate, out});
  auto kernel = x ? (vec ? gated_kernel<T, A, V, true> : gated_kernel<T, A, 1, true>)
                  : (vec ? gated_kernel<T, A, V, false> : gated_kernel<T, A, 1, false>);
  launch_kernel(kernel, row_blocks(sh.rows), kThreads, 0, stream, x, y, gate, out, sh.seg, sh.rows, sh.C);
}

// Parameter gradients (B, C) into out0 (and out1 for adaln), via a float/double workspace.
template <typename T, typename A, bool kAdaln>
void launch_param_grads(const T* grad, const T* other, const A* mean, const A* rstd, T* out0, T* out1,
                        const AdalnShape& sh, const at::TensorOptions& options, cudaStream_t stream) {
  constexpr int kAcc = kAdaln ? 2 : 1;
  const int64_t blocks = num_row_blocks(sh.rows, kColRows);
  const int64_t col_tiles = (sh.C + kColThreads - 1) / kColThreads;
  TORCH_CHECK(col_tiles < 65536, "vdit adaln: too many features for one launch");
  at::Tensor partials =
      at::empty({num_partial_slots(blocks, sh.seg.batch) * kAcc * sh.C}, options.dtype(c10::CppTypeToScalarType<A>::value));
  A* p = partials.data_ptr<A>();
  if (blocks > 0) {
    launch_kernel(column_partials_kernel<T, A, kAdaln>, dim3(blocks, col_tiles), kColThreads, 0, stream, grad, other,
                  mean, rstd, p, sh.seg, sh.rows, sh.C);
  }
  launch_kernel(reduce_partials_kernel<T, A, kAcc>, dim3(sh.seg.batch, col_tiles), kColThreads, 0, stream, p, out0,
                out1, sh.seg, sh.rows, sh.C);
}

// ---- operator entry points --------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                                   const at::Tensor& scale,
                                                                   const std::optional<at::Tensor>& cu_seqlens,
                                                                   double eps) {
  const AdalnShape sh = adaln_shape("vdit::adaln_modulate", x, scale, cu_seqlens);
  check_like(shift, scale, "vdit::adaln_modulate: shift must be like scale");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output_like(x);
  at::Tensor mean = new_row_stat(x);
  at::Tensor rstd = new_row_stat(x);
  if (sh.rows == 0) return {out, mean, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_modulate_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    launch_forward<scalar_t, A>(x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), sh, A(eps), stream);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::adaln_modulate_backward", x, scale, cu_seqlens);
  check_adaln_backward(sh, grad, x, mean, rstd);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = new_output_like(x);
  at::Tensor grad_shift = new_output_like(scale);
  at::Tensor grad_scale = new_output_like(scale);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_modulate_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (sh.rows > 0) {
      launch_grad_x<scalar_t, A>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                 mean.data_ptr<A>(), rstd.data_ptr<A>(), grad_x.data_ptr<scalar_t>(), sh, stream);
    }
    launch_param_grads<scalar_t, A, true>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<A>(),
                                          rstd.data_ptr<A>(), grad_shift.data_ptr<scalar_t>(),
                                          grad_scale.data_ptr<scalar_t>(), sh, x.options(), stream);
  });
  return {grad_x, grad_shift, grad_scale};
}

at::Tensor gated_residual_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                               const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::gated_residual", x, gate, cu_seqlens);
  check_like(y, x, "vdit::gated_residual: y must be like x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output_like(x);
  if (sh.rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_residual_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    launch_gated<scalar_t, A>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), sh, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                                const at::Tensor& gate,
                                                                const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::gated_residual_backward", y, gate, cu_seqlens);
  check_like(grad, y, "vdit::gated_residual_backward: grad_out must be like y");
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor grad_y = new_output_like(y);
  at::Tensor grad_gate = new_output_like(gate);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gated_residual_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (sh.rows > 0) {
      launch_gated<scalar_t, A>(nullptr, grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                                grad_y.data_ptr<scalar_t>(), sh, stream);
    }
    launch_param_grads<scalar_t, A, false>(grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nullptr, nullptr,
                                           grad_gate.data_ptr<scalar_t>(), nullptr, sh, y.options(), stream);
  });
  return {grad_y, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CUDA, m) {
  m.impl("adaln_modulate", &adaln_modulate_cuda);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cuda);
  m.impl("gated_residual", &gated_residual_cuda);
  m.impl("gated_residual_backward", &gated_residual_backward_cuda);
}

}  // namespace vdit
