// CPU kernels for vdit::varlen_attention_fwd / vdit::varlen_attention_bwd.
//
// Forward: FlashAttention-2 style. Each work item is one (sequence, query head, query tile); it
// streams the sequence's keys in tiles, keeps a running row max m and row sum l (online softmax)
// and an fp32 accumulator, so no Lq x Lk matrix is ever stored. Items go into one flattened list,
// sorted by cost (longest first) and handed out dynamically, so a 3000-token video next to
// 200-token ones keeps every thread busy.
// Backward: one item per (sequence, query head) recomputes P = exp(S - lse) tile by tile and
// accumulates dq, dk, dv in a fixed order (deterministic). Grouped-query heads write per-query-head
// dk/dv partials that are summed per kv head afterwards (no atomics).
// The tile products are GEMMs: the BLAS that libtorch_cpu exports (MKL in the x86 wheels) when
// present, else a plain loop. Math is fp32 (fp64 for fp64 inputs); fp16/bf16 are converted.
// Tile machinery (GEMMs, online-softmax step, backward tile steps, scratch, work list), shared with
// the block-sparse kernel (sparse_attention/cpu.cpp): attention/tiles.h. Per-element math:
// attention/math.h; shape checks and the problem descriptor: attention/shape.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/shape.h"
#include "attention/tiles.h"
#include "common/alloc.h"

namespace vdit {
namespace {

using namespace attention_tiles;

// Tile sizes, measured on AVX-512 Xeon and EPYC machines: the larger the query tile, the closer the
// GEMMs run to peak (up to 256 rows; 512 keys per tile).
constexpr int64_t kFwdTileQ = 256, kFwdTileK = 512;
constexpr int64_t kBwdTileQ = 128, kBwdTileK = 256;

// Query rows per forward work item: the largest tile that still gives every thread several items, so
// that the cost-sorted list balances; smaller tiles only when the whole batch is short.
int64_t forward_tile_q(const int32_t* cu_q, int64_t batch, int64_t heads, int64_t threads) {
  for (const int64_t tile : {kFwdTileQ, int64_t(128), int64_t(64)}) {
    int64_t items = 0;
    for (int64_t b = 0; b < batch; ++b) items += (cu_q[b + 1] - cu_q[b] + tile - 1) / tile * heads;
    if (items >= 4 * threads) return tile;
  }
  return 32;
}

using Problem = AttentionProblem;

struct Item {
  int64_t b, h, i0, n, cost;
};

// ---- forward ----------------------------------------------------------------------------------

// Tile buffers of one thread: scores S (kFwdTileQ x kFwdTileK), accumulator (kFwdTileQ x D), row max m
// and row sum l (both in log2 units).
template <typename T>
struct FwdScratch {
  T *s, *acc, *m, *l;
  explicit FwdScratch(int64_t D) {
    s = thread_buffer<T>(kFwdTileQ * (kFwdTileK + D + 2));
    acc = s + kFwdTileQ * kFwdTileK;
    m = acc + kFwdTileQ * D;
    l = m + kFwdTileQ;
  }
};

template <typename T>
void forward_tile(const Problem& p, const Item& it, T scale, const T* q, const T* k, const T* v, T* out, T* lse,
                  FwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D, hk = it.h / p.group();
  const int64_t qrow = p.q_start(it.b) + it.i0, nq = it.n;
  const T* Q = q + qrow * ldq + it.h * D;
  const T* K = k + p.k_start(it.b) * ldk + hk * D;
  const T* V = v + p.k_start(it.b) * ldk + hk * D;
  T* S = sc.s;
  T* acc = sc.acc;
  start_rows(nq, D, acc, sc.m, sc.l);
  const int64_t kend = p.key_end(it.b, it.i0, nq);
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdTileK) {
    const int64_t nk = std::min(kFwdTileK, kend - j0);
    gemm<T>(false, true, nq, nk, D, scale * kLog2e<T>, Q, ldq, K + j0 * ldk, ldk, T(0), S, kFwdTileK);
    online_softmax_tile(S, kFwdTileK, nq, nk, [&](int64_t r) { return p.visible(it.b, it.i0 + r, j0, nk); }, sc.m,
                        sc.l, acc, D);
    gemm<T>(false, false, nq, D, nk, T(1), S, kFwdTileK, V + j0 * ldk, ldk, T(1), acc, D);
  }
  finish_rows(nq, D, acc, sc.m, sc.l, out + qrow * ldq + it.h * D, ldq, lse + it.h * p.total_q + qrow);
}

template <typename T>
void forward(const Problem& p, T scale, const T* q, const T* k, const T* v, T* out, T* lse) {
  std::vector<Item> items;
  const int64_t tile = forward_tile_q(p.cu_q, p.batch, p.Hq, at::get_num_threads());
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t Lq = p.len_q(b);
    for (int64_t i0 = 0; i0 < Lq; i0 += tile) {
      const int64_t n = std::min(tile, Lq - i0);
      const int64_t cost = n * (p.key_end(b, i0, n) + 1);
      for (int64_t h = 0; h < p.Hq; ++h) items.push_back({b, h, i0, n, cost});
    }
  }
  sort_by_cost(items);
  run_items(
      static_cast<int64_t>(items.size()), [&] { return FwdScratch<T>(p.D); },
      [&](int64_t i, FwdScratch<T>& sc) { forward_tile<T>(p, items[i], scale, q, k, v, out, lse, sc); });
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T>
struct BwdScratch {
  T *p, *dp;               // probabilities and their gradient, kBwdTileQ x kBwdTileK each
  std::vector<T> delta;    // one per query row of the current sequence
  BwdScratch() : p(thread_buffer<T>(2 * kBwdTileQ * kBwdTileK)), dp(p + kBwdTileQ * kBwdTileK) {}
};

// Gradients of one (sequence b, query head h). dk_h / dv_h hold this head's contribution with row
// stride ld_dkv (the final dk/dv when there is no head grouping, else a per-query-head partial).
template <typename T>
void backward_head(const Problem& p, const Item& it, T scale, const T* dout, const T* q, const T* k, const T* v,
                   const T* out, const T* lse, T* dq, T* dk_h, T* dv_h, int64_t ld_dkv, BwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D, hk = it.h / p.group(), b = it.b;
  const int64_t qs = p.q_start(b), ks = p.k_start(b), Lq = p.len_q(b), Lk = p.len_k(b);
  const T* Q = q + qs * ldq + it.h * D;
  const T* dO = dout + qs * ldq + it.h * D;
  const T* O = out + qs * ldq + it.h * D;
  const T* K = k + ks * ldk + hk * D;
  const T* V = v + ks * ldk + hk * D;
  const T* L = lse + it.h * p.total_q + qs;
  T* dQ = dq + qs * ldq + it.h * D;
  T* dK = dk_h + ks * ld_dkv;
  T* dV = dv_h + ks * ld_dkv;
  for (int64_t i = 0; i < Lq; ++i) std::fill_n(dQ + i * ldq, D, T(0));
  for (int64_t j = 0; j < Lk; ++j) {
    std::fill_n(dK + j * ld_dkv, D, T(0));
    std::fill_n(dV + j * ld_dkv, D, T(0));
  }
  if (Lq == 0 || Lk == 0) return;
  // delta_i = sum_d dO[i, d] * O[i, d] = sum_j P[i, j] dP[i, j], the softmax backward's row term.
  sc.delta.resize(Lq);
  row_dots(Lq, D, dO, O, ldq, sc.delta.data());
  T* P = sc.p;
  T* dS = sc.dp;
  const int64_t offset = Lk - Lq;  // causal: row i sees keys j <= i + offset
  for (int64_t j0 = 0; j0 < Lk; j0 += kBwdTileK) {
    const int64_t nk = std::min(kBwdTileK, Lk - j0);
    const int64_t first_row = p.causal ? std::max<int64_t>(0, j0 - offset) : 0;
    for (int64_t i0 = first_row; i0 < Lq; i0 += kBwdTileQ) {
      const int64_t nq = std::min(kBwdTileQ, Lq - i0);
      // dV_j += P^T dO_i, dK_j += scale dS^T Q_i, dQ_i += scale dS K_j
      backward_tile_pair<true, true>(nq, nk, D, scale, Q + i0 * ldq, dO + i0 * ldq, ldq, K + j0 * ldk, V + j0 * ldk,
                                     ldk, L + i0, sc.delta.data() + i0, P, dS, kBwdTileK, dQ + i0 * ldq,
                                     dK + j0 * ld_dkv, dV + j0 * ld_dkv, ld_dkv,
                                     [&](int64_t r) { return p.visible(b, i0 + r, j0, nk); });
    }
  }
}

template <typename T>
void backward(const Problem& p, T scale, const T* dout, const T* q, const T* k, const T* v, const T* out,
              const T* lse, T* dq, T* dk_h, T* dv_h, int64_t ld_dkv, int64_t dkv_head_stride) {
  std::vector<Item> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t cost = p.len_q(b) * p.len_k(b) + p.len_q(b) + p.len_k(b);
    if (cost == 0) continue;
    for (int64_t h = 0; h < p.Hq; ++h) items.push_back({b, h, 0, p.len_q(b), cost});
  }
  sort_by_cost(items);
  run_items(
      static_cast<int64_t>(items.size()), [] { return BwdScratch<T>(); },
      [&](int64_t i, BwdScratch<T>& sc) {
        const Item& it = items[i];
        const int64_t slot = dkv_head_stride == 0 ? it.h / p.group() : it.h;
        backward_head<T>(p, it, scale, dout, q, k, v, out, lse, dq, dk_h + slot * p.D, dv_h + slot * p.D, ld_dkv,
                         sc);
      });
}

// ---- operator entry points --------------------------------------------------------------------

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                     const at::Tensor& cu_k, bool causal) {
  const Problem p = attention_problem(q, k, v, cu_q, cu_k, causal);
  check_attention_offsets_host(p);
  return p;
}

at::ScalarType compute_type(const at::Tensor& t) { return acc_type_of(t.scalar_type()); }

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_q,
                                                            const at::Tensor& cu_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const Problem p = make_problem(q, k, v, cu_q, cu_k, causal);
  const at::ScalarType ct = compute_type(q);
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  at::Tensor out = new_output(q.sizes(), q.options().dtype(ct));
  at::Tensor lse = new_output({p.Hq, p.total_q}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "varlen_attention_fwd_cpu", [&] {
    forward<scalar_t>(p, static_cast<scalar_t>(softmax_scale), qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                      vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal) {
  const Problem p = make_problem(q, k, v, cu_q, cu_k, causal);
  check_attention_backward(p, q, dout, out, lse);
  const at::ScalarType ct = compute_type(q);
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  const at::Tensor doc = as_compute(dout, ct), oc = as_compute(out, ct), lc = as_compute(lse, ct);
  at::Tensor dq = new_output(q.sizes(), q.options().dtype(ct));
  const bool grouped = p.Hq != p.Hk;
  // Grouped heads: per-query-head partials (total_k, Hq, D), summed per kv head below.
  at::Tensor dk_h = new_output({p.total_k, grouped ? p.Hq : p.Hk, p.D}, k.options().dtype(ct));
  at::Tensor dv_h = new_output({p.total_k, grouped ? p.Hq : p.Hk, p.D}, k.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "varlen_attention_bwd_cpu", [&] {
    backward<scalar_t>(p, static_cast<scalar_t>(softmax_scale), doc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(),
                       kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(),
                       lc.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk_h.data_ptr<scalar_t>(),
                       dv_h.data_ptr<scalar_t>(), dk_h.size(1) * p.D, grouped ? 1 : 0);
  });
  at::Tensor dk = dk_h, dv = dv_h;
  if (grouped) {
    dk = dk_h.view({p.total_k, p.Hk, p.group(), p.D}).sum(2);
    dv = dv_h.view({p.total_k, p.Hk, p.group(), p.D}).sum(2);
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace vdit
