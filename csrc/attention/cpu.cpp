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
// Per-element math: attention/math.h; shape checks and the problem descriptor: attention/shape.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's AVX-512 headers build unmasked intrinsics from an intentionally undefined vector, which
// -Wmaybe-uninitialized reports wherever they are inlined; nothing here reads an undefined lane.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "attention/shape.h"
#include "common/alloc.h"

// Fortran BLAS entry points; weak so the extension still loads against a torch without them.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace vdit {
namespace {

// Row-major C (M x N) = alpha * op(A) (M x K) * op(B) (K x N) + beta * C. With ta, A is stored K x M;
// with tb, B is stored N x K. Leading dimensions are row strides.
template <typename T>
void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  std::vector<T> row(N);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), T(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = ta ? A[kk * lda + i] : A[i * lda + kk];
      if (tb) {
        for (int64_t j = 0; j < N; ++j) row[j] += a * B[j * ldb + kk];
      } else {
        const T* b = B + kk * ldb;
        for (int64_t j = 0; j < N; ++j) row[j] += a * b[j];
      }
    }
    T* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[j] + (beta == T(0) ? T(0) : beta * c[j]);
  }
}

template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  // Column-major BLAS sees each row-major matrix transposed: compute C^T = op(B)^T op(A)^T.
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
  gemm_loops(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Scores are kept in log2 units (scaled by log2(e) in the GEMM's alpha), so the softmax calls 2^x.
inline float exp2_t(float x) { return exp2_approx(x); }
inline double exp2_t(double x) { return std::exp2(x); }
template <typename T>
constexpr T kLog2e = T(1.4426950408889634074);
template <typename T>
constexpr T kLn2 = T(0.6931471805599453094);

// max(row[0 .. n)); -inf for n = 0.
template <typename T>
T row_max(const T* row, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = row[c] > mx ? row[c] : mx;  // (std::max does not vectorize)
  return mx;
}

// row[c] = 2^(row[c] - m) for c < n, returning their sum: the online softmax's hot loop.
template <typename T>
T exp2_shifted_sum(T* row, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const T e = exp2_t(row[c] - m);
    row[c] = e;
    sum += e;
  }
  return sum;
}

#if defined(__AVX512F__)
// AVX-512 versions for float: full-width vectors (compilers tuned for recent x86 prefer 256-bit ones
// for auto-vectorized loops) and vscalefps, which applies 2^n in one instruction. Same polynomial and
// the same "0 below 2^-126" rule as exp2_approx.
inline __m512 exp2_avx512(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));  // x <= 0 in the softmax
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[k]));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
}

template <>
inline float row_max<float>(const float* row, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, row + c));
  }
  return _mm512_reduce_max_ps(mx);
}

template <>
inline float exp2_shifted_sum<float>(float* row, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    const __m512 e = exp2_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + c), vm));
    _mm512_mask_storeu_ps(row + c, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#endif

// A per-thread buffer of at least n elements, kept across calls and not zeroed: allocating and faulting
// in the half-megabyte score tile on every call costs as much as a short sequence's whole attention.
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < n) {
    buffer.reset(new T[n]);
    capacity = n;
  }
  return buffer.get();
}

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

// Runs fn(item, scratch) over items [0, n) in order of the list, handing them out one at a time to
// the ATen threads (dynamic balance); each thread makes its scratch once with make_scratch().
template <typename MakeScratch, typename Fn>
void run_items(int64_t n, MakeScratch make_scratch, Fn fn) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t it = next.fetch_add(1); it < n; it = next.fetch_add(1)) fn(it, scratch);
    }
  });
}

struct Item {
  int64_t b, h, i0, n, cost;
};

void sort_by_cost(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

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
  std::fill_n(acc, nq * D, T(0));
  std::fill_n(sc.m, nq, -std::numeric_limits<T>::infinity());
  std::fill_n(sc.l, nq, T(0));
  const int64_t kend = p.key_end(it.b, it.i0, nq);
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdTileK) {
    const int64_t nk = std::min(kFwdTileK, kend - j0);
    gemm<T>(false, true, nq, nk, D, scale * kLog2e<T>, Q, ldq, K + j0 * ldk, ldk, T(0), S, kFwdTileK);
    for (int64_t r = 0; r < nq; ++r) {
      T* row = S + r * kFwdTileK;
      const int64_t vis = p.visible(it.b, it.i0 + r, j0, nk);
      if (vis == 0) {
        std::fill_n(row, nk, T(0));
        continue;
      }
      const T m_old = sc.m[r], m_new = std::max(m_old, row_max(row, vis));
      const T sum = exp2_shifted_sum(row, vis, m_new);
      std::fill(row + vis, row + nk, T(0));
      const T alpha = exp2_t(m_old - m_new);  // 0 on the first visible tile (m_old = -inf)
      sc.l[r] = sc.l[r] * alpha + sum;
      sc.m[r] = m_new;
      if (alpha != T(1)) {
        T* a = acc + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
      }
    }
    gemm<T>(false, false, nq, D, nk, T(1), S, kFwdTileK, V + j0 * ldk, ldk, T(1), acc, D);
  }
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + (qrow + r) * ldq + it.h * D;
    const T l = sc.l[r];
    if (l > T(0)) {
      const T inv = T(1) / l;
      const T* a = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      lse[it.h * p.total_q + qrow + r] = (sc.m[r] + std::log2(l)) * kLn2<T>;
    } else {  // the row sees no key
      std::fill_n(o, D, T(0));
      lse[it.h * p.total_q + qrow + r] = -std::numeric_limits<T>::infinity();
    }
  }
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
  for (int64_t i = 0; i < Lq; ++i) {
    T s = 0;
    const T* a = dO + i * ldq;
    const T* o = O + i * ldq;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += a[d] * o[d];
    sc.delta[i] = s;
  }
  T* P = sc.p;
  T* dS = sc.dp;
  const int64_t offset = Lk - Lq;  // causal: row i sees keys j <= i + offset
  for (int64_t j0 = 0; j0 < Lk; j0 += kBwdTileK) {
    const int64_t nk = std::min(kBwdTileK, Lk - j0);
    const int64_t first_row = p.causal ? std::max<int64_t>(0, j0 - offset) : 0;
    for (int64_t i0 = first_row; i0 < Lq; i0 += kBwdTileQ) {
      const int64_t nq = std::min(kBwdTileQ, Lq - i0);
      gemm<T>(false, true, nq, nk, D, scale * kLog2e<T>, Q + i0 * ldq, ldq, K + j0 * ldk, ldk, T(0), P, kBwdTileK);
      for (int64_t r = 0; r < nq; ++r) {
        T* row = P + r * kBwdTileK;
        const T l = L[i0 + r];
        const int64_t vis = l == -std::numeric_limits<T>::infinity() ? 0 : p.visible(b, i0 + r, j0, nk);
        const T l2 = l * kLog2e<T>;
#pragma omp simd
        for (int64_t c = 0; c < vis; ++c) row[c] = exp2_t(row[c] - l2);
        std::fill(row + vis, row + nk, T(0));
      }
      // dV_j += P^T dO_i
      gemm<T>(true, false, nk, D, nq, T(1), P, kBwdTileK, dO + i0 * ldq, ldq, T(1), dV + j0 * ld_dkv, ld_dkv);
      // dP = dO_i V_j^T, then dS = P * (dP - delta)
      gemm<T>(false, true, nq, nk, D, T(1), dO + i0 * ldq, ldq, V + j0 * ldk, ldk, T(0), dS, kBwdTileK);
      for (int64_t r = 0; r < nq; ++r) {
        const T* pr = P + r * kBwdTileK;
        T* dr = dS + r * kBwdTileK;
        const T dl = sc.delta[i0 + r];
#pragma omp simd
        for (int64_t c = 0; c < nk; ++c) dr[c] = pr[c] * (dr[c] - dl);
      }
      // dK_j += scale dS^T Q_i;  dQ_i += scale dS K_j
      gemm<T>(true, false, nk, D, nq, scale, dS, kBwdTileK, Q + i0 * ldq, ldq, T(1), dK + j0 * ld_dkv, ld_dkv);
      gemm<T>(false, false, nq, D, nk, scale, dS, kBwdTileK, K + j0 * ldk, ldk, T(1), dQ + i0 * ldq, ldq);
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
