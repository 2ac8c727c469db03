// The hot loops of the CPU varlen attention kernels (entry points: attention/cpu.cpp), compiled once per
// ISA into vdit::VDIT_ISA_NS (setup.py; dispatch: attention/cpu_kernels.h).
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
// present, else a plain loop. Tile sizes: tile_plan() (attention/tiles.h), from the L2 size.
#include <algorithm>
#include <vector>

#include "attention/cpu_kernels.h"
#include "attention/tiles.h"

namespace vdit {
namespace VDIT_ISA_NS {
namespace {

using namespace attention_tiles;

// Query rows per forward work item: the largest tile up to tile_plan().fwd_q (the larger the query tile,
// the closer the GEMMs run to peak) that still gives every thread several items, so that the cost-sorted
// list balances; smaller tiles only when the whole batch is short.
int64_t forward_tile_q(const int32_t* cu_q, int64_t batch, int64_t heads, int64_t threads) {
  int64_t tile = tile_plan().fwd_q;
  for (; tile > 32; tile /= 2) {
    int64_t items = 0;
    for (int64_t b = 0; b < batch; ++b) items += (cu_q[b + 1] - cu_q[b] + tile - 1) / tile * heads;
    if (items >= 4 * threads) return tile;
  }
  return tile;
}

using Problem = AttentionProblem;

struct Item {
  int64_t b, h, i0, n, cost;
};

// ---- forward ----------------------------------------------------------------------------------

// Tile buffers of one thread: scores S (fwd_q x fwd_k, row stride lds = fwd_k), accumulator (fwd_q x D),
// row max m and row sum l (both in log2 units).
template <typename T>
struct FwdScratch {
  T *s, *acc, *m, *l;
  int64_t lds;
  explicit FwdScratch(int64_t D) {
    const TilePlan& plan = tile_plan();
    lds = plan.fwd_k;
    s = thread_buffer<T>(plan.fwd_q * (plan.fwd_k + D + 2));
    acc = s + plan.fwd_q * plan.fwd_k;
    m = acc + plan.fwd_q * D;
    l = m + plan.fwd_q;
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
  for (int64_t j0 = 0; j0 < kend; j0 += sc.lds) {
    const int64_t nk = std::min(sc.lds, kend - j0);
    gemm<T>(false, true, nq, nk, D, scale * kLog2e<T>, Q, ldq, K + j0 * ldk, ldk, T(0), S, sc.lds);
    online_softmax_tile(S, sc.lds, nq, nk, [&](int64_t r) { return p.visible(it.b, it.i0 + r, j0, nk); }, sc.m,
                        sc.l, acc, D);
    gemm<T>(false, false, nq, D, nk, T(1), S, sc.lds, V + j0 * ldk, ldk, T(1), acc, D);
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
  int64_t tq, tk;          // tile_plan().bwd_q x bwd_k
  T *p, *dp;               // probabilities and their gradient, tq x tk each (row stride tk)
  std::vector<T> delta;    // one per query row of the current sequence
  BwdScratch()
      : tq(tile_plan().bwd_q), tk(tile_plan().bwd_k), p(thread_buffer<T>(2 * tq * tk)), dp(p + tq * tk) {}
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
  for (int64_t j0 = 0; j0 < Lk; j0 += sc.tk) {
    const int64_t nk = std::min(sc.tk, Lk - j0);
    const int64_t first_row = p.causal ? std::max<int64_t>(0, j0 - offset) : 0;
    for (int64_t i0 = first_row; i0 < Lq; i0 += sc.tq) {
      const int64_t nq = std::min(sc.tq, Lq - i0);
      // dV_j += P^T dO_i, dK_j += scale dS^T Q_i, dQ_i += scale dS K_j
      backward_tile_pair<true, true>(nq, nk, D, scale, Q + i0 * ldq, dO + i0 * ldq, ldq, K + j0 * ldk, V + j0 * ldk,
                                     ldk, L + i0, sc.delta.data() + i0, P, dS, sc.tk, dQ + i0 * ldq,
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

}  // namespace

template <typename T>
void varlen_forward(const AttentionProblem& p, T scale, const T* q, const T* k, const T* v, T* out, T* lse) {
  forward<T>(p, scale, q, k, v, out, lse);
}

template <typename T>
void varlen_backward(const AttentionProblem& p, T scale, const T* dout, const T* q, const T* k, const T* v,
                     const T* out, const T* lse, T* dq, T* dk_h, T* dv_h, int64_t ld_dkv, int64_t dkv_head_stride) {
  backward<T>(p, scale, dout, q, k, v, out, lse, dq, dk_h, dv_h, ld_dkv, dkv_head_stride);
}

void tile_sizes(int64_t out[4]) {
  const TilePlan& plan = tile_plan();
  out[0] = plan.fwd_q;
  out[1] = plan.fwd_k;
  out[2] = plan.bwd_q;
  out[3] = plan.bwd_k;
}

template void varlen_forward<float>(const AttentionProblem&, float, const float*, const float*, const float*, float*,
                                    float*);
template void varlen_forward<double>(const AttentionProblem&, double, const double*, const double*, const double*,
                                     double*, double*);
template void varlen_backward<float>(const AttentionProblem&, float, const float*, const float*, const float*,
                                     const float*, const float*, const float*, float*, float*, float*, int64_t,
                                     int64_t);
template void varlen_backward<double>(const AttentionProblem&, double, const double*, const double*, const double*,
                                      const double*, const double*, const double*, double*, double*, double*, int64_t,
                                      int64_t);

}  // namespace VDIT_ISA_NS
}  // namespace vdit
