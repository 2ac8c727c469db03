// CPU tile machinery of the attention kernels, shared by attention/cpu_kernels.cpp (dense varlen attention)
// and sparse_attention/cpu_kernels.cpp (block-sparse attention): row-major GEMMs on the BLAS that
// libtorch_cpu exports, the exp2 softmax loops, the online-softmax step of one score tile and its epilogue,
// the backward's probability and softmax-gradient tiles, the tile sizes, per-thread scratch and the
// dynamic work list.
//
// Scores are kept in log2 units (the score GEMM's alpha carries scale * log2(e)), so the softmax calls
// 2^x; lse stays in natural-log units. Math is fp32 (fp64 for fp64 inputs). Host (CPU) only: ATen
// threads; explicit AVX-512 or AVX2 + FMA loops for float, whichever the including file is compiled for.
// The files that include this one are compiled once per ISA (setup.py), each copy inside its own namespace
// vdit::VDIT_ISA_NS, so the copies never merge at link time; the per-element math that a device kernel
// could share stays in attention/math.h.
#pragma once

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
// GCC 12's AVX-512 headers build unmasked intrinsics from an intentionally undefined vector, which
// -Wmaybe-uninitialized reports wherever they are inlined; nothing here reads an undefined lane.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "attention/math.h"

#ifndef VDIT_ISA_NS
#error "attention/tiles.h is compiled once per ISA: define VDIT_ISA_NS (setup.py does)"
#endif

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
namespace VDIT_ISA_NS {
namespace attention_tiles {

// ---- GEMM -------------------------------------------------------------------------------------

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

// ---- softmax loops ----------------------------------------------------------------------------

inline float exp2_t(float x) { return exp2_approx(x); }
inline double exp2_t(double x) { return std::exp2(x); }
template <typename T>
constexpr T kLog2e = T(1.4426950408889634074);
template <typename T>
constexpr T kLn2 = T(0.6931471805599453094);
template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Generic loops (fp64, and float without a vector version below). OpenMP simd, because std::max and a
// plain sum do not vectorize on their own.

// max(row[0 .. n)); -inf for n = 0.
template <typename T>
inline T row_max(const T* row, int64_t n) {
  T mx = kNegInf<T>;
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < n; ++c) mx = row[c] > mx ? row[c] : mx;
  return mx;
}

// row[c] = 2^(row[c] - m) for c < n, returning their sum: the online softmax's hot loop.
template <typename T>
inline T exp2_shifted_sum(T* row, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const T e = exp2_t(row[c] - m);
    row[c] = e;
    sum += e;
  }
  return sum;
}

// row[c] = 2^(row[c] - m) for c < n: the backward's probability recompute.
template <typename T>
inline void exp2_shifted(T* row, int64_t n, T m) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) row[c] = exp2_t(row[c] - m);
}

#if defined(__AVX512F__)
// AVX-512 versions for float: full-width vectors (compilers tuned for recent x86 prefer 256-bit ones
// for auto-vectorized loops), masked tails, and vscalefps, which applies 2^n in one instruction. Same
// polynomial and the same "0 below 2^-126" rule as exp2_approx.
inline __m512 exp2_avx512(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));  // x <= 0 in the softmax
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[k]));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

template <>
inline float row_max<float>(const float* row, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = tail_mask(n - c);
    mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, row + c));
  }
  return _mm512_reduce_max_ps(mx);
}

template <>
inline float exp2_shifted_sum<float>(float* row, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = tail_mask(n - c);
    const __m512 e = exp2_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + c), vm));
    _mm512_mask_storeu_ps(row + c, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <>
inline void exp2_shifted<float>(float* row, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = tail_mask(n - c);
    _mm512_mask_storeu_ps(row + c, tail, exp2_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + c), vm)));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA versions for float: 8 lanes, the same polynomial and "0 below 2^-126" rule as exp2_approx,
// 2^n built in the exponent field; tails of fewer than 8 columns are masked loads / stores.
inline __m256 exp2_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(127.0f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[k]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 live = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // false for -inf and NaN: 0, as with AVX-512
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), live);
}

// Lanes [0, left) set (all when left >= 8), for maskload / maskstore.
inline __m256i tail_mask8(int64_t left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), lane);
}

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

template <>
inline float row_max<float>(const float* row, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf;  // two chains: vmaxps latency
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + c));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(row + c + 8));
  }
  for (; c < n; c += 8) {
    const __m256i tail = tail_mask8(n - c);
    m0 = _mm256_max_ps(m0, _mm256_blendv_ps(ninf, _mm256_maskload_ps(row + c, tail), _mm256_castsi256_ps(tail)));
  }
  return hmax8(_mm256_max_ps(m0, m1));
}

template <>
inline float exp2_shifted_sum<float>(float* row, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + c), vm));
    _mm256_storeu_ps(row + c, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (c < n) {
    const __m256i tail = tail_mask8(n - c);
    const __m256 e = _mm256_and_ps(exp2_avx2(_mm256_sub_ps(_mm256_maskload_ps(row + c, tail), vm)),
                                   _mm256_castsi256_ps(tail));
    _mm256_maskstore_ps(row + c, tail, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum8(sum);
}

template <>
inline void exp2_shifted<float>(float* row, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(row + c, exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + c), vm)));
  if (c < n) {
    const __m256i tail = tail_mask8(n - c);
    _mm256_maskstore_ps(row + c, tail, exp2_avx2(_mm256_sub_ps(_mm256_maskload_ps(row + c, tail), vm)));
  }
}
#endif

// ---- forward tile steps -----------------------------------------------------------------------

// The online-softmax step of one score tile. S (nq x nk, row stride lds) holds the scores of the rows'
// next nk keys in log2 units; row r sees its first visible(r) columns. Turns S into the unnormalized
// probabilities 2^(S - m_new) (0 in the columns a row does not see), updates the running row max m
// and row sum l (log2 units) and rescales the accumulator rows (acc, nq x D) to the new max; the
// caller then adds S V to acc.
template <typename T, typename Visible>
inline void online_softmax_tile(T* S, int64_t lds, int64_t nq, int64_t nk, Visible visible, T* m, T* l, T* acc,
                                int64_t D) {
  for (int64_t r = 0; r < nq; ++r) {
    T* row = S + r * lds;
    const int64_t vis = visible(r);
    if (vis == 0) {
      std::fill_n(row, nk, T(0));
      continue;
    }
    const T m_old = m[r], m_new = std::max(m_old, row_max(row, vis));
    const T sum = exp2_shifted_sum(row, vis, m_new);
    std::fill(row + vis, row + nk, T(0));
    const T alpha = exp2_t(m_old - m_new);  // 0 on the first visible tile (m_old = -inf)
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != T(1)) {
      T* a = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
    }
  }
}

// Running state of nq rows before their first key tile: acc = 0, m = -inf, l = 0.
template <typename T>
inline void start_rows(int64_t nq, int64_t D, T* acc, T* m, T* l) {
  std::fill_n(acc, nq * D, T(0));
  std::fill_n(m, nq, kNegInf<T>);
  std::fill_n(l, nq, T(0));
}

// The forward's epilogue: out row r (row stride ldo) = acc[r] / l[r] and lse[r] = ln(sum exp(scores)),
// or 0 and -inf for a row that saw no key (l = 0). lse rows are consecutive.
template <typename T>
inline void finish_rows(int64_t nq, int64_t D, const T* acc, const T* m, const T* l, T* out, int64_t ldo, T* lse) {
  for (int64_t r = 0; r < nq; ++r) {
    T* o = out + r * ldo;
    if (l[r] > T(0)) {
      const T inv = T(1) / l[r];
      const T* a = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      lse[r] = (m[r] + std::log2(l[r])) * kLn2<T>;
    } else {
      std::fill_n(o, D, T(0));
      lse[r] = kNegInf<T>;
    }
  }
}

// ---- backward tile steps ----------------------------------------------------------------------

// delta[r] = sum_d a[r, d] * b[r, d] for r < n (rows of stride ld): with a = dO and b = O, the softmax
// backward's row term sum_j P[r, j] dP[r, j].
template <typename T>
inline void row_dots(int64_t n, int64_t D, const T* a, const T* b, int64_t ld, T* delta) {
  for (int64_t r = 0; r < n; ++r) {
    T s = 0;
    const T* x = a + r * ld;
    const T* y = b + r * ld;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += x[d] * y[d];
    delta[r] = s;
  }
}

// P (nq x nk, row stride ldp) holds scores in log2 units; recompute the probabilities in place:
// P = 2^(P - lse * log2(e)) in the visible(r) first columns of row r, 0 elsewhere and in rows that
// see no key (lse = -inf). lse rows are consecutive.
template <typename T, typename Visible>
inline void probabilities_tile(T* P, int64_t ldp, int64_t nq, int64_t nk, const T* lse, Visible visible) {
  for (int64_t r = 0; r < nq; ++r) {
    T* row = P + r * ldp;
    const T l = lse[r];
    const int64_t vis = l == kNegInf<T> ? 0 : visible(r);
    exp2_shifted(row, vis, l * kLog2e<T>);
    std::fill(row + vis, row + nk, T(0));
  }
}

// dS = P * (dP - delta), in place of dP (both nq x nk, row stride ld); delta rows are consecutive.
template <typename T>
inline void softmax_grad_tile(T* dS, const T* P, int64_t ld, int64_t nq, int64_t nk, const T* delta) {
  for (int64_t r = 0; r < nq; ++r) {
    const T* pr = P + r * ld;
    T* dr = dS + r * ld;
    const T dl = delta[r];
#pragma omp simd
    for (int64_t c = 0; c < nk; ++c) dr[c] = pr[c] * (dr[c] - dl);
  }
}

// One (query rows, key rows) tile pair of the backward: nq query rows (Q, dO with row stride ldq; their
// lse and delta consecutive), nk key rows (K, V with row stride ldk); P and dS are nq x nk scratch tiles
// with row stride ldp. Recomputes P = exp(S * scale - lse) (row r sees its first visible(r) keys), then
// with kDkDv  dV += P^T dO and dK += scale * dS^T Q (rows of stride ld_dkv), and with kDq dQ += scale * dS K
// (row stride ldq), where dS = P * (dO V^T - delta). The dense kernel's backward does both, the block-sparse
// kernel's dq and dk / dv items one each.
template <bool kDq, bool kDkDv, typename T, typename Visible>
inline void backward_tile_pair(int64_t nq, int64_t nk, int64_t D, T scale, const T* Q, const T* dO, int64_t ldq,
                               const T* K, const T* V, int64_t ldk, const T* lse, const T* delta, T* P, T* dS,
                               int64_t ldp, T* dQ, T* dK, T* dV, int64_t ld_dkv, Visible visible) {
  gemm<T>(false, true, nq, nk, D, scale * kLog2e<T>, Q, ldq, K, ldk, T(0), P, ldp);
  probabilities_tile(P, ldp, nq, nk, lse, visible);
  if constexpr (kDkDv) gemm<T>(true, false, nk, D, nq, T(1), P, ldp, dO, ldq, T(1), dV, ld_dkv);  // dV += P^T dO
  gemm<T>(false, true, nq, nk, D, T(1), dO, ldq, V, ldk, T(0), dS, ldp);  // dP = dO V^T
  softmax_grad_tile(dS, P, ldp, nq, nk, delta);
  if constexpr (kDkDv) gemm<T>(true, false, nk, D, nq, scale, dS, ldp, Q, ldq, T(1), dK, ld_dkv);  // dK += scale dS^T Q
  if constexpr (kDq) gemm<T>(false, false, nq, D, nk, scale, dS, ldp, K, ldk, T(1), dQ, ldq);  // dQ += scale dS K
}

// ---- tile sizes ---------------------------------------------------------------------------------

// Rows x columns of the forward's score tile and of the backward's probability tile (two such tiles,
// P and dS, live at once).
struct TilePlan {
  int64_t fwd_q, fwd_k, bwd_q, bwd_k;
};

// Bytes of L2 cache per core: sysconf, else sysfs, else 1 MiB (a guess that keeps the measured tiles).
inline int64_t l2_cache_bytes() {
  const long sys = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (sys > 0) return sys;
  int64_t kib = 0;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index2/size", "r")) {
    if (std::fscanf(f, "%ld", &kib) != 1) kib = 0;  // "1024K"
    std::fclose(f);
  }
  return kib > 0 ? kib * 1024 : int64_t(1) << 20;
}

// The tiles for an L2 of l2 bytes: the forward's fp32 score tile takes at most half of L2 (the rest holds
// the K / V rows and the accumulator it streams), the backward's two tiles at most a quarter. Starting
// from 256 x 512 (forward) and 128 x 256 (backward), keys are halved before query rows: the query rows
// are the GEMMs' M; on the AVX2 path 128-row forward tiles ran 10-35% slower than 256-row ones and
// 256 x 256 about as fast as 256 x 512, and on the AVX-512 path no tile was clearly better
// (benchmarks/results/cpu-isa.md). So only the L2 size picks the tile, the same for both ISAs:
// 256 x 512 on a 1 MiB L2, 256 x 256 on 512 KiB.
inline TilePlan tile_plan_for(int64_t l2) {
  auto fit = [](int64_t q, int64_t k, int64_t budget) {
    while (q * k * int64_t(sizeof(float)) > budget && (q > 32 || k > 64)) {
      if (k >= 2 * q && k > 64) k /= 2; else q /= 2;
    }
    return std::pair<int64_t, int64_t>(q, k);
  };
  const auto fwd = fit(256, 512, l2 / 2), bwd = fit(128, 256, l2 / 8);
  return {fwd.first, fwd.second, bwd.first, bwd.second};
}

// VDIT_CPU_TILES="fwd_q,fwd_k,bwd_q,bwd_k" (positive multiples of 16) overrides the computed tiles, for
// tuning on a new machine; anything else is ignored.
inline TilePlan tile_plan_from_env(TilePlan plan) {
  const char* env = std::getenv("VDIT_CPU_TILES");
  long v[4];
  if (env == nullptr || std::sscanf(env, "%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3]) != 4) return plan;
  for (const long x : v) {
    if (x <= 0 || x % 16 != 0 || x > 4096) return plan;
  }
  return {v[0], v[1], v[2], v[3]};
}

// This process's tiles (read once).
inline const TilePlan& tile_plan() {
  static const TilePlan plan = tile_plan_from_env(tile_plan_for(l2_cache_bytes()));
  return plan;
}

// ---- scratch and scheduling -------------------------------------------------------------------

// A per-thread buffer of at least n elements, 64-byte aligned, kept across calls and not zeroed:
// allocating and faulting in the half-megabyte score tile on every call costs as much as a short
// sequence's whole attention. One buffer per element type and thread: a kernel takes all its tiles
// from one call.
template <typename T>
T* thread_buffer(int64_t n) {
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  thread_local std::unique_ptr<T[], Free> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < n) {
    buffer.reset(static_cast<T*>(::operator new[](static_cast<size_t>(n) * sizeof(T), std::align_val_t(64))));
    capacity = n;
  }
  return buffer.get();
}

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

// Longest first (stable, so equal costs keep their order): the cost-sorted list that run_items hands
// out keeps every thread busy until the end.
template <typename Item>
void sort_by_cost(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

}  // namespace attention_tiles
}  // namespace VDIT_ISA_NS
}  // namespace vdit
