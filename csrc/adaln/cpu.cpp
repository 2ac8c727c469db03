// CPU kernels for vdit::adaln_modulate, vdit::gated_residual and their backwards.
//
// Forward: rows are split into chunks across threads; a chunk finds the sample of its first row
// by binary search over cu_seqlens and then walks sample boundaries linearly, so no per-row index
// is built. Each row is normalized two-pass (mean, then squared deviations) from a float copy in
// cache; the inner loops are `omp simd` so the reductions vectorize.
// Backward: fixed blocks of kRowsPerBlock rows, one task each; a task writes grad_x / grad_y for
// its rows and one partial column sum per sample it touches (adaln/math.h), which a second
// parallel pass adds per sample in block order (deterministic for any thread count).
// Shape checks: adaln/shape.h; math: adaln/math.h, shared with adaln/cuda.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "adaln/shape.h"
#include "common/alloc.h"

namespace vdit {
namespace {

constexpr int64_t kRowsPerBlock = 32;

// `src` as a row of A: the row itself when T is A, else converted into `buf`.
template <typename T, typename A>
const A* as_acc(const T* src, int64_t C, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<A>(src[c]);
    return buf;
  }
}

// Calls run(s, r0, r1) for each maximal run [r0, r1) of rows in [begin, end) that lie in one sample.
template <typename F>
void for_sample_runs(const Segments& seg, int64_t begin, int64_t end, F&& run) {
  int64_t r = begin;
  while (r < end) {
    const int64_t s = seg.sample_of(r);
    const int64_t e = std::min(end, std::max(seg.end(s), r + 1));
    run(s, r, e);
    r = e;
  }
}

// ---- adaln_modulate ---------------------------------------------------------------------------

template <typename T, typename A>
void adaln_forward(const T* x, const T* shift, const T* scale, T* out, A* mean_out, A* rstd_out,
                   const AdalnShape& sh, A eps) {
  const int64_t C = sh.C;
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, sh.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> xbuf(C), gain(C), bias(C);
    for_sample_runs(sh.seg, begin, end, [&](int64_t s, int64_t r0, int64_t r1) {
      for (int64_t c = 0; c < C; ++c) {
        gain[c] = A(1) + static_cast<A>(scale[s * C + c]);
        bias[c] = static_cast<A>(shift[s * C + c]);
      }
      const A* g = gain.data();
      const A* b = bias.data();
      for (int64_t r = r0; r < r1; ++r) {
        const A* xr = as_acc(x + r * C, C, xbuf.data());
        A sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < C; ++c) sum += xr[c];
        const A mean = sum / A(C);
        A sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
        const A rstd = adaln_rstd(sq, C, eps);
        T* o = out + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(adaln_element(xr[c], mean, rstd, g[c], b[c]));
        mean_out[r] = mean;
        rstd_out[r] = rstd;
      }
    });
  });
}

// Adds the slots of each sample (in block order) into `outs[j]` (B, C), j < kAcc; empty samples get 0.
template <typename T, typename A, int kAcc>
void reduce_partials(const A* partials, const AdalnShape& sh, int64_t rows_per_block, T* const* outs) {
  const int64_t C = sh.C;
  at::parallel_for(0, sh.seg.batch, 1, [&](int64_t sb, int64_t se) {
    std::vector<A> acc(kAcc * C);
    for (int64_t s = sb; s < se; ++s) {
      std::fill(acc.begin(), acc.end(), A(0));
      const int64_t r0 = sh.seg.begin(s), r1 = sh.seg.end(s);
      if (r1 > r0) {
        for (int64_t k = r0 / rows_per_block; k <= (r1 - 1) / rows_per_block; ++k) {
          const A* p = partials + partial_slot(k, s) * kAcc * C;
#pragma omp simd
          for (int64_t i = 0; i < kAcc * C; ++i) acc[i] += p[i];
        }
      }
      for (int j = 0; j < kAcc; ++j) {
        for (int64_t c = 0; c < C; ++c) outs[j][s * C + c] = static_cast<T>(acc[j * C + c]);
      }
    }
  });
}

// Parameter gradients as column sums over each sample's rows, kAcc of them: rows are cut into blocks of
// kRowsPerBlock (in parallel); run(s, r0, r1, acc, scratch) adds rows [r0, r1) of sample s into acc
// (kAcc * C values, zero on entry: the partial slot of this block and sample, adaln/math.h), with
// scratch_rows * C values of per-thread scratch. The per-sample sums land in outs[j] (B, C), j < kAcc.
template <typename T, typename A, int kAcc, typename F>
void param_grads(const AdalnShape& sh, int64_t scratch_rows, T* const* outs, F&& run) {
  const int64_t C = sh.C, R = kRowsPerBlock;
  const int64_t blocks = num_row_blocks(sh.rows, R);
  std::vector<A> partials(num_partial_slots(blocks, sh.seg.batch) * kAcc * C);
  at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
    std::vector<A> scratch(scratch_rows * C);
    for (int64_t k = kb; k < ke; ++k) {
      for_sample_runs(sh.seg, k * R, std::min(sh.rows, (k + 1) * R), [&](int64_t s, int64_t r0, int64_t r1) {
        A* acc = partials.data() + partial_slot(k, s) * kAcc * C;
        std::fill(acc, acc + kAcc * C, A(0));
        run(s, r0, r1, acc, scratch.data());
      });
    }
  });
  reduce_partials<T, A, kAcc>(partials.data(), sh, R, outs);
}

template <typename T, typename A>
void adaln_backward(const T* grad, const T* x, const T* scale, const A* mean, const A* rstd, T* grad_x,
                    T* grad_shift, T* grad_scale, const AdalnShape& sh) {
  const int64_t C = sh.C;
  // Per slot: [sum of grad (-> grad_shift), sum of grad * xhat (-> grad_scale)].
  T* outs[2] = {grad_shift, grad_scale};
  param_grads<T, A, 2>(sh, 5, outs, [&](int64_t s, int64_t r0, int64_t r1, A* dshift, A* scratch) {
    A* dscale = dshift + C;
    A* gbuf = scratch;
    A* xbuf = gbuf + C;
    A* gn = xbuf + C;
    A* xh = gn + C;
    A* dxh = xh + C;
    for (int64_t c = 0; c < C; ++c) gn[c] = A(1) + static_cast<A>(scale[s * C + c]);
    for (int64_t r = r0; r < r1; ++r) {
      const A* gr = as_acc(grad + r * C, C, gbuf);
      const A* xr = as_acc(x + r * C, C, xbuf);
      const A m = mean[r], rs = rstd[r];
      A sum_dxhat = 0, sum_dxhat_xhat = 0;
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
      for (int64_t c = 0; c < C; ++c) {
        const A xv = (xr[c] - m) * rs;
        const A dv = gr[c] * gn[c];
        xh[c] = xv;
        dxh[c] = dv;
        sum_dxhat += dv;
        sum_dxhat_xhat += dv * xv;
        dshift[c] += gr[c];
        dscale[c] += gr[c] * xv;
      }
      const A a = sum_dxhat / A(C), b = sum_dxhat_xhat / A(C);
      T* gx = grad_x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gx[c] = static_cast<T>(adaln_grad_x(dxh[c], xh[c], rs, a, b));
    }
  });
}

// ---- gated_residual ---------------------------------------------------------------------------

// out = x + gate[s] * y; with x == nullptr, out = gate[s] * y (the backward's grad_y).
template <typename T, typename A>
void gated_forward(const T* x, const T* y, const T* gate, T* out, const AdalnShape& sh) {
  const int64_t C = sh.C;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, sh.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> gbuf(C), xbuf(C), ybuf(C);
    for_sample_runs(sh.seg, begin, end, [&](int64_t s, int64_t r0, int64_t r1) {
      const A* g = as_acc(gate + s * C, C, gbuf.data());
      for (int64_t r = r0; r < r1; ++r) {
        const A* yr = as_acc(y + r * C, C, ybuf.data());
        T* o = out + r * C;
        if (x) {
          const A* xr = as_acc(x + r * C, C, xbuf.data());
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(gated_element(xr[c], g[c], yr[c]));
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(gated_element(A(0), g[c], yr[c]));
        }
      }
    });
  });
}

template <typename T, typename A>
void gated_gate_grad(const T* grad, const T* y, T* grad_gate, const AdalnShape& sh) {
  const int64_t C = sh.C;
  T* outs[1] = {grad_gate};
  param_grads<T, A, 1>(sh, 2, outs, [&](int64_t, int64_t r0, int64_t r1, A* acc, A* scratch) {
    for (int64_t r = r0; r < r1; ++r) {
      const A* gr = as_acc(grad + r * C, C, scratch);
      const A* yr = as_acc(y + r * C, C, scratch + C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] += gr[c] * yr[c];
    }
  });
}

// ---- operator entry points --------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  double eps) {
  const AdalnShape sh = adaln_shape("vdit::adaln_modulate", x, scale, cu_seqlens);
  check_like(shift, scale, "vdit::adaln_modulate: shift must be like scale");
  check_adaln_offsets_host(sh);
  at::Tensor out = new_output_like(x);
  at::Tensor mean = new_row_stat(x);
  at::Tensor rstd = new_row_stat(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_modulate_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    adaln_forward<scalar_t, A>(x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), sh, A(eps));
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::adaln_modulate_backward", x, scale, cu_seqlens);
  check_adaln_backward(sh, grad, x, mean, rstd);
  check_adaln_offsets_host(sh);
  at::Tensor grad_x = new_output_like(x);
  at::Tensor grad_shift = new_output_like(scale);
  at::Tensor grad_scale = new_output_like(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_modulate_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    adaln_backward<scalar_t, A>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                mean.data_ptr<A>(), rstd.data_ptr<A>(), grad_x.data_ptr<scalar_t>(),
                                grad_shift.data_ptr<scalar_t>(), grad_scale.data_ptr<scalar_t>(), sh);
  });
  return {grad_x, grad_shift, grad_scale};
}

at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                              const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::gated_residual", x, gate, cu_seqlens);
  check_like(y, x, "vdit::gated_residual: y must be like x");
  check_adaln_offsets_host(sh);
  at::Tensor out = new_output_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_residual_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    gated_forward<scalar_t, A>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), sh);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                               const at::Tensor& gate,
                                                               const std::optional<at::Tensor>& cu_seqlens) {
  const AdalnShape sh = adaln_shape("vdit::gated_residual_backward", y, gate, cu_seqlens);
  check_like(grad, y, "vdit::gated_residual_backward: grad_out must be like y");
  check_adaln_offsets_host(sh);
  at::Tensor grad_y = new_output_like(y);
  at::Tensor grad_gate = new_output_like(gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gated_residual_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    gated_forward<scalar_t, A>(nullptr, grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                               grad_y.data_ptr<scalar_t>(), sh);
    gated_gate_grad<scalar_t, A>(grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), grad_gate.data_ptr<scalar_t>(), sh);
  });
  return {grad_y, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("adaln_modulate", &adaln_modulate_cpu);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cpu);
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("gated_residual_backward", &gated_residual_backward_cpu);
}

}  // namespace vdit
