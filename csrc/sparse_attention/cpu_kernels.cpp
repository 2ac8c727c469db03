// The hot loops of the CPU kernels for vdit::block_sparse_attention_fwd / _bwd (entry points:
// sparse_attention/cpu.cpp), compiled once per ISA into vdit::VDIT_ISA_NS (setup.py; dispatch:
// attention/cpu_kernels.h): attention over a
// packed batch in tile order where each (query tile, query head) attends a list of whole key tiles.
//
// Work scales with the visible tiles: a work item only ever touches the tiles of its list, and -1
// slots (and repeated tiles) are dropped before any work or cost is counted.
// Forward: one item per (query tile, query head), FlashAttention-2 style on the tile machinery of the
// dense kernel (attention/tiles.h): the list's tiles, ascending, become runs of contiguous tokens
// (consecutive tiles are adjacent in tile order, so a window row is one run); the runs fill score tiles
// of up to fwd_k keys (tile_plan()), one online-softmax step per score tile, GEMMs straight on the k / v rows.
// Consecutive query tiles of a head whose lists are equal (e.g. the edge tiles of a sliding window, or
// every tile when the whole grid is visible) share one item of up to fwd_q rows, so the GEMMs stay
// as large as the dense kernel's.
// Backward: recomputes P = exp(S * scale - lse), delta = rowsum(dout * out) precomputed per (row, head).
// Two kinds of items in one cost-sorted list: dq per (query tile, query head) over its key tiles, and
// dk / dv per (key tile, kv head) over its q_tiles entries (the query tiles of every query head of the
// kv head's group), so the group's sum happens inside the item, with no partials and no atomics. Both
// recompute P, so a tile pair costs 3 + 4 GEMMs where the dense kernel's single pass needs 5; a closed
// dense block (query tiles that all list the same key tiles, which nobody else lists: a short video
// inside its window, a head that sees everything) is done in one single-pass item instead, when that
// item is no larger than one thread's share of the work (dense_blocks).
// Items are sorted by cost (longest first) and handed out dynamically (run_items), like the dense kernel.
//
// Why it is deterministic and race-free: every output row has exactly one writer. The forward item
// (rows R of head h) alone writes out[R, h] and lse[h, R]; the dq item (rows R, head h) alone writes
// dq[R, h]; the dk/dv item (key rows J, kv head hk) alone writes dk[J, hk] and dv[J, hk]; a dense-block
// item alone writes dq of its (query tile, head) pairs and dk / dv of its (key tile, kv head) pairs, which
// get no dq or dk/dv item (q_done / k_done). Items own disjoint row ranges because the tiles partition the
// tokens and each item covers a row range of its tile group. delta is written by a separate parallel
// pass over disjoint rows before any item reads it. Everything else an item reads (q, k, v, dout, out,
// lse, delta, the lists) is read-only, and its tiles live in per-thread scratch. Each item adds its
// contributions in a fixed order (tiles ascending, query heads ascending, fixed chunk sizes), independent
// of the thread that runs it and of the order in which items are handed out, with single-threaded BLAS
// calls on 64-byte aligned scratch; so repeated runs with the same thread count give bit-identical
// results (the thread count picks the item grouping, see balanced_items and dense_blocks).
// Shape checks, list value checks and the problem descriptor: sparse_attention/shape.h.
#include <algorithm>
#include <vector>

#include "attention/cpu_kernels.h"
#include "attention/tiles.h"

namespace vdit {
namespace VDIT_ISA_NS {
namespace {

using namespace attention_tiles;
using Problem = BlockSparseProblem;

// Tiles: the dense kernel's (tile_plan(), attention/tiles.h). Forward: query rows per item (fwd_q) and
// key columns per score tile (fwd_k). Backward: a probability tile holds at most bwd_q x bwd_k elements;
// dq items have up to bwd_q rows, dk / dv items up to bwd_k keys.

// A run of contiguous tokens [start, start + len) of one head.
struct Run {
  int64_t start, len, head;
};

// A piece of a run, placed at column `col` of a forward score tile.
struct Piece {
  int64_t start, len, col;
};

// One work item: rows [row0, row0 + rows) of head `head`, inside the group of consecutive tiles that
// starts at tile `tile` and shares its list. kind: forward, dq (query rows) or dkdv (key rows, head =
// kv head); kBlock: the whole dense block number `tile` (below).
enum class Kind : uint8_t { kForward, kDq, kDkDv, kBlock };
struct TileItem {
  int64_t row0, rows, head, tile, cost;
  Kind kind;
};

// Work items of one side (list_of(t, h): the list of tile t and head h, for heads heads): per head,
// consecutive tiles whose lists are equal are grouped up to max_rows rows (the rows see exactly the same tiles, so they can share the
// GEMMs); a larger tile is split into chunks of max_rows. Cost = rows * (reach + 1) * gemms, with
// reach(list) the keys (or query rows) the list reaches. Tiles with skip[t * heads + h] set (done by a
// dense block) get no item; an empty skip skips nothing.
template <typename ListOf, typename Reach>
void group_items(const Problem& p, ListOf list_of, int64_t heads, int64_t max_rows, Kind kind, int64_t gemms,
                 Reach reach, const std::vector<uint8_t>& skip, std::vector<TileItem>& items) {
  auto same = [](TileList a, TileList b) { return a.len == b.len && std::equal(a.data, a.data + a.len, b.data); };
  auto skipped = [&](int64_t t, int64_t h) { return !skip.empty() && skip[t * heads + h] != 0; };
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < p.num_tiles;) {
      if (skipped(t, h)) {
        ++t;
        continue;
      }
      const TileList list = list_of(t, h);
      int64_t end = t + 1, rows = p.tile_len(t);
      while (end < p.num_tiles && rows + p.tile_len(end) <= max_rows && !skipped(end, h) &&
             same(list, list_of(end, h))) {
        rows += p.tile_len(end);
        ++end;
      }
      const int64_t r = rows > 0 ? reach(list) : 0;
      for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
        const int64_t n = std::min(max_rows, rows - r0);
        items.push_back({p.tile_start(t) + r0, n, h, t, n * (r + 1) * gemms, kind});
      }
      t = end;
    }
  }
}

// The largest grouping (max_rows halving from `rows` down to 32) that still gives every thread several
// items, so that the cost-sorted list balances.
template <typename Build>
std::vector<TileItem> balanced_items(int64_t rows, Build build) {
  const size_t enough = 4 * static_cast<size_t>(at::get_num_threads());
  std::vector<TileItem> items;
  for (;; rows /= 2) {
    items.clear();
    build(rows, items);
    if (rows <= 32 || items.size() >= enough) break;
  }
  sort_by_cost(items);
  return items;
}

int64_t key_reach(const Problem& p, TileList list) {  // keys of a kv_tiles list (repeats counted)
  int64_t n = 0;
  for (int64_t s = 0; s < list.len; ++s) n += list.data[s] >= 0 ? p.tile_len(list.data[s]) : 0;
  return n;
}

int64_t query_reach(const Problem& p, TileList list) {  // query rows of a q_tiles list
  int64_t n = 0;
  for (int64_t s = 0; s < list.len; ++s) n += p.tile_len(list.data[s] / p.Hq);
  return n;
}

// The distinct non-empty key tiles of a kv_tiles list (-1 slots, repeats and empty tiles dropped),
// ascending, appended to `tiles`.
void distinct_key_tiles(const Problem& p, TileList list, std::vector<int32_t>& tiles) {
  const size_t first = tiles.size();
  for (int64_t s = 0; s < list.len; ++s) {
    if (list.data[s] >= 0 && p.tile_len(list.data[s]) > 0) tiles.push_back(list.data[s]);
  }
  std::sort(tiles.begin() + first, tiles.end());
  tiles.erase(std::unique(tiles.begin() + first, tiles.end()), tiles.end());
}

// Ascending non-empty tiles as runs of contiguous tokens (consecutive tiles are adjacent in tile order).
void tile_runs(const Problem& p, const int32_t* tiles, size_t n, std::vector<Run>& runs) {
  runs.clear();
  for (size_t i = 0; i < n; ++i) {
    const int64_t start = p.tile_start(tiles[i]), len = p.tile_len(tiles[i]);
    if (!runs.empty() && runs.back().start + runs.back().len == start) {
      runs.back().len += len;
    } else {
      runs.push_back({start, len, 0});
    }
  }
}

// The distinct key tiles of a kv_tiles list as runs of contiguous tokens. `tiles` is scratch.
void key_runs(const Problem& p, TileList list, std::vector<int32_t>& tiles, std::vector<Run>& runs) {
  tiles.clear();
  distinct_key_tiles(p, list, tiles);
  tile_runs(p, tiles.data(), tiles.size(), runs);
}

// The distinct (query tile, query head) entries of a q_tiles list, ordered by head then tile, as runs of
// contiguous tokens of one head. `entries` is scratch.
void query_runs(const Problem& p, TileList list, std::vector<int32_t>& entries, std::vector<Run>& runs) {
  entries.assign(list.data, list.data + list.len);
  const int64_t Hq = p.Hq;
  auto by_head = [Hq](int32_t a, int32_t b) { return a % Hq != b % Hq ? a % Hq < b % Hq : a < b; };
  std::sort(entries.begin(), entries.end(), by_head);
  entries.erase(std::unique(entries.begin(), entries.end()), entries.end());
  runs.clear();
  for (const int32_t e : entries) {
    const int64_t t = e / Hq, h = e % Hq, start = p.tile_start(t), len = p.tile_len(t);
    if (len == 0) continue;
    if (!runs.empty() && runs.back().head == h && runs.back().start + runs.back().len == start) {
      runs.back().len += len;
    } else {
      runs.push_back({start, len, h});
    }
  }
}

// Packs runs into score tiles of at most `cols` columns and calls tile(pieces, width) for each, in
// order. A run starts a new tile rather than being split, unless it is longer than a tile: the fewer
// and larger the pieces, the larger the GEMMs. `pieces` is scratch.
template <typename Fn>
void for_each_score_tile(const std::vector<Run>& runs, int64_t cols, std::vector<Piece>& pieces, Fn tile) {
  size_t r = 0;
  int64_t used = 0;  // tokens of runs[r] already placed
  while (r < runs.size()) {
    pieces.clear();
    int64_t width = 0;
    while (r < runs.size() && width < cols) {
      if (width > 0 && runs[r].len - used > cols - width) break;
      const int64_t n = std::min(runs[r].len - used, cols - width);
      pieces.push_back({runs[r].start + used, n, width});
      width += n;
      used += n;
      if (used == runs[r].len) {
        ++r;
        used = 0;
      }
    }
    tile(pieces, width);
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
struct FwdScratch {
  T *s, *acc, *m, *l;  // scores (fwd_q x fwd_k, row stride cols), accumulator (fwd_q x D), row max and sum
  int64_t cols;
  std::vector<int32_t> tiles;
  std::vector<Run> runs;
  std::vector<Piece> pieces;
  explicit FwdScratch(int64_t D) {
    const TilePlan& plan = tile_plan();
    cols = plan.fwd_k;
    s = thread_buffer<T>(plan.fwd_q * (plan.fwd_k + D + 2));
    acc = s + plan.fwd_q * plan.fwd_k;
    m = acc + plan.fwd_q * D;
    l = m + plan.fwd_q;
  }
};

// Rows [row0, row0 + rows) of query head h: out[rows, h] and lse[h, rows], written by this item only.
template <typename T>
void forward_item(const Problem& p, const TileItem& it, T scale, const T* q, const T* k, const T* v, T* out, T* lse,
                  FwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D, hk = it.head / p.group(), nq = it.rows;
  const T* Q = q + it.row0 * ldq + it.head * D;
  const T* K = k + hk * D;
  const T* V = v + hk * D;
  T* S = sc.s;
  key_runs(p, p.kv_list(it.tile, it.head), sc.tiles, sc.runs);
  start_rows(nq, D, sc.acc, sc.m, sc.l);
  for_each_score_tile(sc.runs, sc.cols, sc.pieces, [&](const std::vector<Piece>& pieces, int64_t width) {
    for (const Piece& pc : pieces) {
      gemm<T>(false, true, nq, pc.len, D, scale * kLog2e<T>, Q, ldq, K + pc.start * ldk, ldk, T(0), S + pc.col,
              sc.cols);
    }
    online_softmax_tile(S, sc.cols, nq, width, [width](int64_t) { return width; }, sc.m, sc.l, sc.acc, D);
    for (const Piece& pc : pieces) {
      gemm<T>(false, false, nq, D, pc.len, T(1), S + pc.col, sc.cols, V + pc.start * ldk, ldk, T(1), sc.acc, D);
    }
  });
  finish_rows(nq, D, sc.acc, sc.m, sc.l, out + it.row0 * ldq + it.head * D, ldq, lse + it.head * p.total + it.row0);
}

template <typename T>
void forward(const Problem& p, T scale, const T* q, const T* k, const T* v, T* out, T* lse) {
  auto kv_lists = [&](int64_t t, int64_t h) { return p.kv_list(t, h); };
  const std::vector<TileItem> items = balanced_items(tile_plan().fwd_q, [&](int64_t rows, std::vector<TileItem>& list) {
    group_items(p, kv_lists, p.Hq, rows, Kind::kForward, 2, [&](TileList l) { return key_reach(p, l); }, {}, list);
  });
  run_items(
      static_cast<int64_t>(items.size()), [&] { return FwdScratch<T>(p.D); },
      [&](int64_t i, FwdScratch<T>& sc) { forward_item<T>(p, items[i], scale, q, k, v, out, lse, sc); });
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T>
struct BwdScratch {
  int64_t rows, cols;  // tile_plan().bwd_q, bwd_k
  T *p, *ds;           // probabilities and their gradient, at most rows * cols elements each
  std::vector<int32_t> list;
  std::vector<Run> runs;
  BwdScratch()
      : rows(tile_plan().bwd_q), cols(tile_plan().bwd_k), p(thread_buffer<T>(2 * rows * cols)), ds(p + rows * cols) {}
};

// dq[rows, h] (rows [row0, row0 + rows), at most bwd_q, query head h), written by this item only:
// dq = scale * sum over the list's key chunks of dS K, dS = P * (dO V^T - delta).
template <typename T>
void dq_item(const Problem& p, const TileItem& it, T scale, const T* dout, const T* q, const T* k, const T* v,
             const T* lse, const T* delta, T* dq, BwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D, hk = it.head / p.group(), nq = it.rows;
  const int64_t qo = it.row0 * ldq + it.head * D, lo = it.head * p.total + it.row0;
  for (int64_t r = 0; r < nq; ++r) std::fill_n(dq + qo + r * ldq, D, T(0));
  key_runs(p, p.kv_list(it.tile, it.head), sc.list, sc.runs);
  for (const Run& run : sc.runs) {  // each key chunk on its own (tight) tile: nothing carries across
    for (int64_t j0 = 0; j0 < run.len; j0 += sc.cols) {
      const int64_t nk = std::min(sc.cols, run.len - j0), ko = (run.start + j0) * ldk + hk * D;
      backward_tile_pair<true, false>(nq, nk, D, scale, q + qo, dout + qo, ldq, k + ko, v + ko, ldk, lse + lo,
                                      delta + lo, sc.p, sc.ds, nk, dq + qo, static_cast<T*>(nullptr),
                                      static_cast<T*>(nullptr), ldk, [nk](int64_t) { return nk; });
    }
  }
}

// dk[keys, hk] and dv[keys, hk] (keys [row0, row0 + rows), at most bwd_k, kv head hk), written by
// this item only: sums over the q_tiles entries (every query head of the group, heads then tiles
// ascending) of dV += P^T dO and dK += scale * dS^T Q.
template <typename T>
void dkdv_item(const Problem& p, const TileItem& it, T scale, const T* dout, const T* q, const T* k, const T* v,
               const T* lse, const T* delta, T* dk, T* dv, BwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D, hk = it.head, nk = it.rows;
  const int64_t ko = it.row0 * ldk + hk * D;
  for (int64_t j = 0; j < nk; ++j) {
    std::fill_n(dk + ko + j * ldk, D, T(0));
    std::fill_n(dv + ko + j * ldk, D, T(0));
  }
  query_runs(p, p.q_list(it.tile, hk), sc.list, sc.runs);
  const int64_t max_rows = sc.rows * sc.cols / nk;  // query rows per probability tile
  for (const Run& run : sc.runs) {
    for (int64_t i0 = 0; i0 < run.len; i0 += max_rows) {
      const int64_t nq = std::min(max_rows, run.len - i0);
      const int64_t qo = (run.start + i0) * ldq + run.head * D, lo = run.head * p.total + run.start + i0;
      backward_tile_pair<false, true>(nq, nk, D, scale, q + qo, dout + qo, ldq, k + ko, v + ko, ldk, lse + lo,
                                      delta + lo, sc.p, sc.ds, nk, static_cast<T*>(nullptr), dk + ko, dv + ko, ldk,
                                      [nk](int64_t) { return nk; });
    }
  }
}

// ---- dense blocks -----------------------------------------------------------------------------

// A closed dense block of kv head hk: query nodes (query tile, query head of hk's group) that all list
// exactly the same key tiles, which no other query node of the group lists (e.g. a whole video when the
// window covers its tile grid, or a head that sees everything). Its dq, dk and dv depend on nothing
// outside the block, so one item computes all three in a single pass, 5 GEMMs per tile pair instead of
// the 3 + 4 of separate dq and dk / dv items, like the dense kernel's backward.
struct DenseBlock {
  int64_t hk, cost;
  std::vector<Run> queries;  // by head, then tiles ascending
  std::vector<Run> keys;     // ascending
};

// The closed dense blocks worth fusing; marks their (query tile, query head) in q_done and their (key
// tile, kv head) in k_done, which then get no dq / dk-dv item. A block is fused when its single-pass cost
// is at most one thread's fair share of the whole two-pass backward, so that the indivisible item still
// lets the list balance: with one thread every block, with many only the small ones. The blocks are
// derived from kv_tiles; q_tiles must be its transpose (as the schema says).
std::vector<DenseBlock> dense_blocks(const Problem& p, int64_t threads, std::vector<uint8_t>& q_done,
                                     std::vector<uint8_t>& k_done) {
  int64_t total = 0;  // the two-pass work in (query row, key) pairs
  for (int64_t t = 0; t < p.num_tiles; ++t) {
    for (int64_t h = 0; h < p.Hq; ++h) total += p.tile_len(t) * key_reach(p, p.kv_list(t, h));
  }
  std::vector<DenseBlock> blocks;
  q_done.assign(p.num_tiles * p.Hq, 0);
  k_done.assign(p.num_tiles * p.Hk, 0);
  std::vector<int32_t> keys, node, order, refs(p.num_tiles);
  std::vector<size_t> begin;
  for (int64_t hk = 0; hk < p.Hk; ++hk) {
    // Node n = (query tile, head) node[n] = t * Hq + h with rows and a non-empty list, in (head, tile)
    // order; its distinct key tiles are keys[begin[n], begin[n + 1]); refs[j]: the nodes that list j.
    keys.clear();
    node.clear();
    begin.assign(1, 0);
    for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
      for (int64_t t = 0; t < p.num_tiles; ++t) {
        if (p.tile_len(t) == 0) continue;
        distinct_key_tiles(p, p.kv_list(t, h), keys);
        if (keys.size() == begin.back()) continue;
        begin.push_back(keys.size());
        node.push_back(static_cast<int32_t>(t * p.Hq + h));
      }
    }
    std::fill(refs.begin(), refs.end(), 0);
    for (const int32_t j : keys) ++refs[j];
    // Classes of equal lists: sort the nodes by list (stable: (head, tile) order inside a class).
    auto less = [&](int32_t a, int32_t b) {
      return std::lexicographical_compare(keys.begin() + begin[a], keys.begin() + begin[a + 1],
                                          keys.begin() + begin[b], keys.begin() + begin[b + 1]);
    };
    order.resize(node.size());
    for (size_t n = 0; n < order.size(); ++n) order[n] = static_cast<int32_t>(n);
    std::stable_sort(order.begin(), order.end(), less);
    for (size_t i = 0, e; i < order.size(); i = e) {
      for (e = i + 1; e < order.size() && !less(order[i], order[e]);) ++e;
      const int32_t* k0 = keys.data() + begin[order[i]];
      const int32_t* k1 = keys.data() + begin[order[i] + 1];
      const int64_t members = static_cast<int64_t>(e - i);
      bool closed = true;
      int64_t cols = 0, rows = 0;
      for (const int32_t* j = k0; j != k1; ++j) {
        closed = closed && refs[*j] == members;
        cols += p.tile_len(*j);
      }
      for (size_t m = i; m < e; ++m) rows += p.tile_len(node[order[m]] / p.Hq);
      if (!closed || 5 * rows * cols * threads > 7 * total) continue;
      DenseBlock block{hk, 5 * rows * cols, {}, {}};
      tile_runs(p, k0, static_cast<size_t>(k1 - k0), block.keys);
      for (const int32_t* j = k0; j != k1; ++j) k_done[*j * p.Hk + hk] = 1;
      for (size_t m = i; m < e; ++m) {
        const int64_t t = node[order[m]] / p.Hq, h = node[order[m]] % p.Hq;
        const int64_t start = p.tile_start(t), len = p.tile_len(t);
        std::vector<Run>& runs = block.queries;
        if (!runs.empty() && runs.back().head == h && runs.back().start + runs.back().len == start) {
          runs.back().len += len;
        } else {
          runs.push_back({start, len, h});
        }
        q_done[node[order[m]]] = 1;
      }
      blocks.push_back(std::move(block));
    }
  }
  return blocks;
}

// dq of the block's query rows and dk, dv of its key rows (kv head hk), written by this item only: the
// dense kernel's single pass over key chunks (ascending) x query chunks (heads, then rows ascending).
template <typename T>
void block_item(const Problem& p, const DenseBlock& b, T scale, const T* dout, const T* q, const T* k, const T* v,
                const T* lse, const T* delta, T* dq, T* dk, T* dv, BwdScratch<T>& sc) {
  const int64_t D = p.D, ldq = p.Hq * D, ldk = p.Hk * D;
  for (const Run& r : b.queries) {
    for (int64_t i = 0; i < r.len; ++i) std::fill_n(dq + (r.start + i) * ldq + r.head * D, D, T(0));
  }
  for (const Run& r : b.keys) {
    for (int64_t j = 0; j < r.len; ++j) {
      std::fill_n(dk + (r.start + j) * ldk + b.hk * D, D, T(0));
      std::fill_n(dv + (r.start + j) * ldk + b.hk * D, D, T(0));
    }
  }
  for (const Run& kr : b.keys) {
    for (int64_t j0 = 0; j0 < kr.len; j0 += sc.cols) {
      const int64_t nk = std::min(sc.cols, kr.len - j0), ko = (kr.start + j0) * ldk + b.hk * D;
      for (const Run& qr : b.queries) {
        for (int64_t i0 = 0; i0 < qr.len; i0 += sc.rows) {
          const int64_t nq = std::min(sc.rows, qr.len - i0);
          const int64_t qo = (qr.start + i0) * ldq + qr.head * D, lo = qr.head * p.total + qr.start + i0;
          backward_tile_pair<true, true>(nq, nk, D, scale, q + qo, dout + qo, ldq, k + ko, v + ko, ldk, lse + lo,
                                         delta + lo, sc.p, sc.ds, nk, dq + qo, dk + ko, dv + ko, ldk,
                                         [nk](int64_t) { return nk; });
        }
      }
    }
  }
}

template <typename T>
void backward(const Problem& p, T scale, const T* dout, const T* q, const T* k, const T* v, const T* out,
              const T* lse, T* delta, T* dq, T* dk, T* dv) {
  const int64_t D = p.D, ldq = p.Hq * D;
  // delta[h, i] = sum_d dout[i, h, d] * out[i, h, d]: disjoint rows per thread, done before any item.
  at::parallel_for(0, p.total, 256, [&](int64_t begin, int64_t end) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      row_dots(end - begin, D, dout + begin * ldq + h * D, out + begin * ldq + h * D, ldq, delta + h * p.total + begin);
    }
  });
  std::vector<uint8_t> q_done, k_done;
  const std::vector<DenseBlock> blocks = dense_blocks(p, at::get_num_threads(), q_done, k_done);
  // One list for all kinds: they write disjoint outputs, and one cost-sorted list balances better than
  // separate passes. Costs count GEMMs: 3 per dq tile, 4 per dk / dv tile, 5 per dense-block tile.
  const TilePlan& plan = tile_plan();
  auto kv_lists = [&](int64_t t, int64_t h) { return p.kv_list(t, h); };
  auto q_lists = [&](int64_t j, int64_t hk) { return p.q_list(j, hk); };
  const std::vector<TileItem> items = balanced_items(plan.bwd_k, [&](int64_t rows, std::vector<TileItem>& list) {
    group_items(p, kv_lists, p.Hq, std::min(rows, plan.bwd_q), Kind::kDq, 3,
                [&](TileList l) { return key_reach(p, l); }, q_done, list);
    group_items(p, q_lists, p.Hk, rows, Kind::kDkDv, 4, [&](TileList l) { return query_reach(p, l); }, k_done, list);
    for (size_t b = 0; b < blocks.size(); ++b) {
      list.push_back({0, 0, blocks[b].hk, static_cast<int64_t>(b), blocks[b].cost, Kind::kBlock});
    }
  });
  run_items(
      static_cast<int64_t>(items.size()), [] { return BwdScratch<T>(); },
      [&](int64_t i, BwdScratch<T>& sc) {
        const TileItem& it = items[i];
        if (it.kind == Kind::kDq) {
          dq_item<T>(p, it, scale, dout, q, k, v, lse, delta, dq, sc);
        } else if (it.kind == Kind::kDkDv) {
          dkdv_item<T>(p, it, scale, dout, q, k, v, lse, delta, dk, dv, sc);
        } else {
          block_item<T>(p, blocks[it.tile], scale, dout, q, k, v, lse, delta, dq, dk, dv, sc);
        }
      });
}

}  // namespace

template <typename T>
void block_sparse_forward(const BlockSparseProblem& p, T scale, const T* q, const T* k, const T* v, T* out, T* lse) {
  forward<T>(p, scale, q, k, v, out, lse);
}

template <typename T>
void block_sparse_backward(const BlockSparseProblem& p, T scale, const T* dout, const T* q, const T* k, const T* v,
                           const T* out, const T* lse, T* delta, T* dq, T* dk, T* dv) {
  backward<T>(p, scale, dout, q, k, v, out, lse, delta, dq, dk, dv);
}

template void block_sparse_forward<float>(const BlockSparseProblem&, float, const float*, const float*, const float*,
                                          float*, float*);
template void block_sparse_forward<double>(const BlockSparseProblem&, double, const double*, const double*,
                                           const double*, double*, double*);
template void block_sparse_backward<float>(const BlockSparseProblem&, float, const float*, const float*, const float*,
                                           const float*, const float*, const float*, float*, float*, float*, float*);
template void block_sparse_backward<double>(const BlockSparseProblem&, double, const double*, const double*,
                                            const double*, const double*, const double*, const double*, double*,
                                            double*, double*, double*);

}  // namespace VDIT_ISA_NS
}  // namespace vdit
