// CPU kernels for the vdit::rope_3d* operators (3D rotary embedding, optional fused RMS QK-norm).
//
// Work is split into blocks of consecutive tokens (at::parallel_for over blocks). For a token the
// kernel computes the cos / sin of its rotation pairs once and applies them to every head of q
// and k. Consecutive tokens usually share their t and h coordinates (row-major grids), so each
// thread remembers the last coordinate of every axis and recomputes only the axis chunks whose
// coordinate changed: in a (t, h, w) grid that is mostly the w chunk. Rows are rotated by plain
// loops over contiguous pairs that the compiler vectorizes (-O3 -march=native); the per-element
// math is rope/math.h, shared with the CUDA kernel; tensor views and checks: rope/shape.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "rope/shape.h"

namespace vdit {
namespace {

// Rotate one head row: x (compute type, D channels) -> y (output type). `sn` already carries the
// sign of the rotation (negated for the inverse).
template <typename A, typename T>
inline void rotate_row(const A* __restrict__ x, T* __restrict__ y, const A* __restrict__ cs,
                       const A* __restrict__ sn, const RopeChannels& L) {
  if (L.interleaved) {
    const int R = L.rotated / 2;
    for (int p = 0; p < R; ++p) {
      const A a = x[2 * p], b = x[2 * p + 1];
      y[2 * p] = static_cast<T>(rope_rotate(a, b, cs[p], sn[p], true));
      y[2 * p + 1] = static_cast<T>(rope_rotate(b, a, cs[p], sn[p], false));
    }
  } else {
    for (int ax = 0; ax < 3; ++ax) {
      const int h = L.dims[ax] / 2;
      const A* xa = x + L.start[ax];
      const A* xb = xa + h;
      T* ya = y + L.start[ax];
      T* yb = ya + h;
      const A* c = cs + L.pair_start[ax];
      const A* s = sn + L.pair_start[ax];
      for (int j = 0; j < h; ++j) {
        const A a = xa[j], b = xb[j];
        ya[j] = static_cast<T>(rope_rotate(a, b, c[j], s[j], true));
        yb[j] = static_cast<T>(rope_rotate(b, a, c[j], s[j], false));
      }
    }
  }
  for (int c = L.rotated; c < L.head_dim; ++c) y[c] = static_cast<T>(x[c]);
}

// Sum of a[c] * b[c] over D channels in 8 independent lanes: a single running sum would be one long
// dependency chain that the compiler may not reorder (no -ffast-math), this one vectorizes.
template <typename A, typename T, typename U>
inline A dot_lanes(const T* __restrict__ a, const U* __restrict__ b, int D) {
  A lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int c = 0;
  for (; c + 8 <= D; c += 8) {
    for (int e = 0; e < 8; ++e) lanes[e] += static_cast<A>(a[c + e]) * static_cast<A>(b[c + e]);
  }
  for (; c < D; ++c) lanes[0] += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

// Loads a row into the compute type; with a weight, RMS-normalizes it (times the weight) and
// returns the scale 1 / rms, else returns 1.
template <typename A, typename T>
inline A load_row(const T* __restrict__ src, A* __restrict__ dst, const A* __restrict__ weight, int D, A eps) {
  if (weight == nullptr) {
    for (int c = 0; c < D; ++c) dst[c] = static_cast<A>(src[c]);
    return A(1);
  }
  const A r = rms_scale(dot_lanes<A>(src, src, D), D, eps);
  for (int c = 0; c < D; ++c) dst[c] = static_cast<A>(src[c]) * r * weight[c];
  return r;
}

// Per-thread cos / sin of one token's pairs, recomputed per axis only when that axis's coordinate
// differs from the previous token's.
template <typename A, typename P>
struct AngleCache {
  const RopeProblem& pb;
  const std::vector<double>& inv_freq;
  bool inverse;
  std::vector<A> cs, sn;
  P last[3];
  bool valid[3] = {false, false, false};

  AngleCache(const RopeProblem& pb_, const std::vector<double>& f, bool inv)
      : pb(pb_), inv_freq(f), inverse(inv), cs(std::max<size_t>(f.size(), 1)), sn(std::max<size_t>(f.size(), 1)) {}

  void update(int64_t b, int64_t l) {
    const P* pos = static_cast<const P*>(pb.pos.data) + b * pb.pos.sb + l * pb.pos.sl;
    const RopeChannels& L = pb.channels;
    for (int ax = 0; ax < 3; ++ax) {
      const P v = pos[ax * pb.pos.sa];
      if (valid[ax] && last[ax] == v) continue;
      valid[ax] = true;
      last[ax] = v;
      const int p0 = L.pair_start[ax], p1 = p0 + L.dims[ax] / 2;
      for (int p = p0; p < p1; ++p) {
        A sin_v, cos_v;
        rope_sincos(rope_angle<A>(v, inv_freq[p]), &sin_v, &cos_v);
        cs[p] = cos_v;
        sn[p] = inverse ? -sin_v : sin_v;
      }
    }
  }
};

std::vector<double> inverse_frequencies(const RopeProblem& pb) {
  std::vector<double> f(pb.channels.rotated / 2);
  for (int p = 0; p < int(f.size()); ++p) f[p] = rope_inv_freq(pb.channels, pb.log_theta, p);
  return f;
}

// How the B * L tokens split into parallel tasks: enough rows per task to amortize scheduling, and at
// most 1024 tasks (the backward keeps one weight-gradient partial per task).
struct TokenTasks {
  int64_t tokens, per_task, count;
};

TokenTasks token_tasks(const RopeProblem& pb, const std::vector<RopeRows>& sets) {
  int64_t row_elems = 0;
  for (const RopeRows& r : sets) row_elems += r.heads * pb.channels.head_dim;
  const int64_t tokens = pb.B * pb.L;
  const int64_t per_task =
      std::max({int64_t(1), 16384 / std::max<int64_t>(row_elems, 1), (tokens + 1023) / 1024});
  return {tokens, per_task, (tokens + per_task - 1) / per_task};
}

// Runs fn(task, b, l, cs, sn, scratch) for every token (b, l) of every task, in parallel over the
// tasks; cs / sn are the token's cos / sin per pair (sin negated when `inverse`), scratch holds
// scratch_rows * D compute-type values per thread.
template <typename A, typename P, typename Fn>
void for_each_token(const RopeProblem& pb, const TokenTasks& split, bool inverse, int scratch_rows, Fn&& fn) {
  const std::vector<double> inv_freq = inverse_frequencies(pb);
  at::parallel_for(0, split.count, 1, [&](int64_t t0, int64_t t1) {
    AngleCache<A, P> angles(pb, inv_freq, inverse);
    std::vector<A> scratch(size_t(scratch_rows) * pb.channels.head_dim);
    for (int64_t task = t0; task < t1; ++task) {
      for (int64_t n = task * split.per_task; n < std::min(split.tokens, (task + 1) * split.per_task); ++n) {
        const int64_t b = n / pb.L, l = n % pb.L;
        angles.update(b, l);
        fn(task, b, l, angles.cs.data(), angles.sn.data(), scratch.data());
      }
    }
  });
}

template <typename T, typename P>
void forward_impl(const RopeProblem& pb, std::vector<RopeRows>& sets, bool inverse, double eps_d) {
  using A = at::opmath_type<T>;
  const RopeChannels& L = pb.channels;
  const int D = L.head_dim;
  const A eps = static_cast<A>(eps_d);
  for_each_token<A, P>(pb, token_tasks(pb, sets), inverse, 1,
                       [&](int64_t, int64_t b, int64_t l, const A* cs, const A* sn, A* buf) {
    for (const RopeRows& r : sets) {
      const T* in = static_cast<const T*>(r.in) + b * r.in_sb + l * r.in_sl;
      T* out = static_cast<T*>(r.out) + b * r.out_sb + l * r.out_sl;
      const A* w = static_cast<const A*>(r.weight);
      for (int64_t h = 0; h < r.heads; ++h) {
        const T* src = in + h * r.in_sh;
        T* dst = out + h * r.out_sh;
        // fp32 / fp64 rows without a norm rotate straight from the input, unless in place.
        if (std::is_same<A, T>::value && w == nullptr && static_cast<const void*>(src) != dst) {
          rotate_row<A, T>(reinterpret_cast<const A*>(src), dst, cs, sn, L);
        } else {
          load_row<A, T>(src, buf, w, D, eps);
          rotate_row<A, T>(buf, dst, cs, sn, L);
        }
      }
    }
  });
}

// Backward: grad_x of y = rotate(norm(x)) given grad_y (rows.in), x (rows.x); the weight gradient
// accumulates into partial[task][D] (compute type), summed by the caller.
template <typename T, typename P>
void backward_impl(const RopeProblem& pb, std::vector<RopeRows>& sets, std::vector<at::Tensor>& partials,
                   double eps_d) {
  using A = at::opmath_type<T>;
  const RopeChannels& L = pb.channels;
  const int D = L.head_dim;
  const A eps = static_cast<A>(eps_d);
  const TokenTasks split = token_tasks(pb, sets);
  for (size_t s = 0; s < sets.size(); ++s) {
    partials[s] = sets[s].weight ? at::zeros({std::max<int64_t>(split.count, 1), D}, at::TensorOptions().dtype(
                                                 c10::CppTypeToScalarType<A>::value))
                                 : at::Tensor();
  }
  for_each_token<A, P>(pb, split, /*inverse=*/true, 3,
                       [&](int64_t task, int64_t b, int64_t l, const A* cs, const A* sn, A* scratch) {
    A* gy = scratch;
    A* g = gy + D;
    A* xh = g + D;
    for (size_t s = 0; s < sets.size(); ++s) {
      const RopeRows& r = sets[s];
      const T* gin = static_cast<const T*>(r.in) + b * r.in_sb + l * r.in_sl;
      const T* xin = static_cast<const T*>(r.x) + b * r.x_sb + l * r.x_sl;
      T* out = static_cast<T*>(r.out) + b * r.out_sb + l * r.out_sl;
      const A* w = static_cast<const A*>(r.weight);
      A* gw = w ? partials[s].template data_ptr<A>() + task * D : nullptr;
      for (int64_t h = 0; h < r.heads; ++h) {
        load_row<A, T>(gin + h * r.in_sh, gy, nullptr, D, eps);
        T* dst = out + h * r.out_sh;
        if (w == nullptr) {
          rotate_row<A, T>(gy, dst, cs, sn, L);
          continue;
        }
        // g = dL/d(normalized * weight): the inverse rotation of the incoming gradient.
        rotate_row<A, A>(gy, g, cs, sn, L);
        const T* x = xin + h * r.x_sh;
        const A rr = rms_scale(dot_lanes<A>(x, x, D), D, eps);
        for (int c = 0; c < D; ++c) {
          xh[c] = static_cast<A>(x[c]) * rr;
          gw[c] += g[c] * xh[c];
          g[c] *= w[c];
        }
        const A dot = dot_lanes<A>(g, xh, D) / A(D);
        for (int c = 0; c < D; ++c) dst[c] = static_cast<T>(rms_norm_grad(g[c], xh[c], rr, dot));
      }
    }
  });
}

template <typename F>
void dispatch_positions(at::ScalarType pd, F&& f) {
  switch (pd) {
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK(false, "vdit rope: unsupported positions dtype ", pd);
  }
}

// A fresh output of hundreds of MB costs one page fault per 4 KiB page on first write, which takes
// longer than the rotation itself. Ask for transparent huge pages on the 2 MiB-aligned interior of
// large outputs (Linux, THP in "madvise" mode; a no-op where unsupported). Torch's own allocator does
// the same for every allocation when THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + uintptr_t(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first + kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

at::Tensor new_large_output(const at::Tensor& like) {
  at::Tensor out = new_output_like(like);
  advise_huge_pages(out);
  return out;
}

void run_forward(const RopeProblem& pb, std::vector<RopeRows>& sets, at::ScalarType dtype, bool inverse, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vdit_rope_3d_cpu", [&] {
    dispatch_positions(pb.pos.dtype, [&](auto p) { forward_impl<scalar_t, decltype(p)>(pb, sets, inverse, eps); });
  });
}

at::Tensor rope_3d_cpu(const at::Tensor& x, const at::Tensor& positions, at::IntArrayRef dims, double theta,
                       bool interleaved, bool inverse, const c10::optional<at::Tensor>& weight, double eps) {
  const RopeProblem pb = rope_problem(x, positions, dims, theta, interleaved);
  at::Tensor out = new_large_output(x);
  const at::Tensor w = weight_in_compute_type(weight, x);
  std::vector<RopeRows> sets{rope_rows(x, out, w)};
  run_forward(pb, sets, x.scalar_type(), inverse, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_3d_qk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                                  at::IntArrayRef dims, double theta, bool interleaved, bool inverse,
                                                  const c10::optional<at::Tensor>& q_weight,
                                                  const c10::optional<at::Tensor>& k_weight, double eps) {
  rope_check_pair(q, k);
  const RopeProblem pb = rope_problem(q, positions, dims, theta, interleaved);
  at::Tensor q_out = new_large_output(q);
  at::Tensor k_out = new_large_output(k);
  const at::Tensor qw = weight_in_compute_type(q_weight, q), kw = weight_in_compute_type(k_weight, k);
  std::vector<RopeRows> sets{rope_rows(q, q_out, qw), rope_rows(k, k_out, kw)};
  run_forward(pb, sets, q.scalar_type(), inverse, eps);
  return {q_out, k_out};
}

void rope_3d_qk_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, at::IntArrayRef dims,
                            double theta, bool interleaved, const c10::optional<at::Tensor>& q_weight,
                            const c10::optional<at::Tensor>& k_weight, double eps) {
  rope_check_pair(q, k);
  const RopeProblem pb = rope_problem(q, positions, dims, theta, interleaved);
  const at::Tensor qw = weight_in_compute_type(q_weight, q), kw = weight_in_compute_type(k_weight, k);
  std::vector<RopeRows> sets{rope_rows(q, q, qw), rope_rows(k, k, kw)};
  run_forward(pb, sets, q.scalar_type(), false, eps);
}

// grad_x for each set, and the weight gradients (empty where there is no weight).
std::vector<at::Tensor> run_backward(const RopeProblem& pb, const std::vector<at::Tensor>& grads,
                                     const std::vector<at::Tensor>& xs,
                                     const std::vector<c10::optional<at::Tensor>>& weights, double eps) {
  std::vector<RopeRows> sets;
  std::vector<at::Tensor> outs, ws;
  for (size_t s = 0; s < xs.size(); ++s) {
    outs.push_back(new_large_output(xs[s]));
    ws.push_back(weight_in_compute_type(weights[s], xs[s]));
    sets.push_back(rope_backward_rows(grads[s], xs[s], outs[s], ws[s]));
  }
  std::vector<at::Tensor> partials(xs.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "vdit_rope_3d_backward_cpu", [&] {
    dispatch_positions(pb.pos.dtype, [&](auto p) { backward_impl<scalar_t, decltype(p)>(pb, sets, partials, eps); });
  });
  for (const at::Tensor& gw : rope_weight_grads(partials, weights, xs)) outs.push_back(gw);
  return outs;  // grad_x..., grad_w...
}

std::tuple<at::Tensor, at::Tensor> rope_3d_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& positions, at::IntArrayRef dims, double theta,
                                                        bool interleaved, const c10::optional<at::Tensor>& weight,
                                                        double eps) {
  const RopeProblem pb = rope_problem(x, positions, dims, theta, interleaved);
  auto outs = run_backward(pb, {grad}, {x}, {weight}, eps);
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rope_3d_qk_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& positions, at::IntArrayRef dims, double theta, bool interleaved,
    const c10::optional<at::Tensor>& q_weight, const c10::optional<at::Tensor>& k_weight, double eps) {
  rope_check_pair(q, k);
  const RopeProblem pb = rope_problem(q, positions, dims, theta, interleaved);
  auto outs = run_backward(pb, {grad_q, grad_k}, {q, k}, {q_weight, k_weight}, eps);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("rope_3d", &rope_3d_cpu);
  m.impl("rope_3d_qk", &rope_3d_qk_cpu);
  m.impl("rope_3d_qk_", &rope_3d_qk_inplace_cpu);
  m.impl("rope_3d_backward", &rope_3d_backward_cpu);
  m.impl("rope_3d_qk_backward", &rope_3d_qk_backward_cpu);
}

}  // namespace vdit
