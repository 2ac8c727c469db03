// Host-side checks and the problem descriptor of the block-sparse attention operators
// (vdit::block_sparse_attention_fwd / _bwd), for sparse_attention/cpu.cpp (and a future cuda.cu).
// Python validates first with friendly messages; these checks are the last line that keeps a kernel
// from reading out of bounds, also when torch.ops.vdit.* is called directly. The tile lists' values are
// read by check_block_sparse_lists_host (CPU tensors only). Tile machinery: attention/tiles.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/shape.h"

namespace vdit {

// `len` int32 list entries at `data`.
struct TileList {
  const int32_t* data;
  int64_t len;
};

// A packed batch in tile order: tile t is the token range [tile_offsets[t], tile_offsets[t + 1]) of the
// (total, heads, D) tensors. kv_tiles (num_tiles, Hq, K): the global key tiles that query tile t, head h
// attends (whole tiles), -1 unused. q_tiles, backward only: the transposed lists in one int32 buffer of
// q_len values (CSR): for key tile j and kv head hk, list i = j * Hk + hk is q_tiles[q_tiles[i] ..
// q_tiles[i + 1]), the entries query_tile * Hq + query_head of the (query tile, query head) pairs whose list
// holds j; the first num_tiles * Hk + 1 values are those offsets. Hq query heads share each of Hk kv heads in
// groups of Hq / Hk.
struct BlockSparseProblem {
  const int32_t* tile_offsets;
  const int32_t* kv_tiles;
  const int32_t* q_tiles;  // null in the forward
  int64_t num_tiles, Hq, Hk, D, total, K, q_len, max_tile;
  int64_t group() const { return Hq / Hk; }
  int64_t tile_start(int64_t t) const { return tile_offsets[t]; }
  int64_t tile_len(int64_t t) const { return tile_offsets[t + 1] - tile_offsets[t]; }
  TileList kv_list(int64_t t, int64_t h) const { return {kv_tiles + (t * Hq + h) * K, K}; }
  TileList q_list(int64_t j, int64_t hk) const {
    const int64_t i = j * Hk + hk;
    return {q_tiles + q_tiles[i], q_tiles[i + 1] - q_tiles[i]};
  }
};

namespace block_sparse_detail {

constexpr const char* kOp = "vdit block_sparse_attention";

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A (dim)-D int32 contiguous tensor on `device`.
inline void check_int_list(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt, kOp, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " must be on ", device, ", got ", t.device());
}

// Same shape as `like`, same dtype, contiguous, on its device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), kOp, ": ", name, " must have ", like_name, "'s shape ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), kOp, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

}  // namespace block_sparse_detail

// q (total, Hq, D), k and v (total, Hk, D) of one floating dtype (float16, bfloat16, float32, float64),
// contiguous; tile_offsets int32 (num_tiles + 1,); kv_tiles int32 (num_tiles, Hq, K); all on q's device.
// Reads no tensor data (the lists may live on the GPU): CPU kernels check the values with
// check_block_sparse_lists_host.
inline BlockSparseProblem block_sparse_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& tile_offsets, const at::Tensor& kv_tiles,
                                               int64_t max_tile) {
  using namespace block_sparse_detail;
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, kOp, ": q, k, v must be 3-D (total, heads, head_dim)");
  TORCH_CHECK(is_float_dtype(q.scalar_type()), kOp, ": q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(q.is_contiguous(), kOp, ": q must be contiguous");
  check_like(k, "k", v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, ": k and v must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), kOp, ": k and v must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(k.size(0) == q.size(0), kOp, ": q, k and v must have the same number of tokens, got ", q.size(0),
              " and ", k.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), kOp, ": q and k must have the same head dim, got ", q.size(2), " and ",
              k.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp, ": q heads (", q.size(1),
              ") must be a positive multiple of k heads (", k.size(1), ")");
  check_int_list(tile_offsets, "tile_offsets", 1, q.device());
  TORCH_CHECK(tile_offsets.numel() >= 1, kOp, ": tile_offsets must hold num_tiles + 1 >= 1 offsets");
  const int64_t num_tiles = tile_offsets.numel() - 1;
  check_int_list(kv_tiles, "kv_tiles", 3, q.device());
  TORCH_CHECK(kv_tiles.size(0) == num_tiles && kv_tiles.size(1) == q.size(1), kOp,
              ": kv_tiles must be (num_tiles, Hq, K) = (", num_tiles, ", ", q.size(1), ", K), got ", kv_tiles.sizes());
  TORCH_CHECK(max_tile >= 0, kOp, ": max_tile must be >= 0, got ", max_tile);
  return BlockSparseProblem{tile_offsets.data_ptr<int32_t>(),
                            kv_tiles.data_ptr<int32_t>(),
                            nullptr,
                            num_tiles,
                            q.size(1),
                            k.size(1),
                            q.size(2),
                            q.size(0),
                            kv_tiles.size(2),
                            0,
                            max_tile};
}

// The backward's inputs besides the forward's: dout and out like q; lse (Hq, total) in the compute dtype
// (float32, float64 for float64 q); q_tiles int32 1-D, at least its num_tiles * Hk + 1 offsets. Sets
// p.q_tiles and p.q_len (the offsets and entries are checked by check_block_sparse_lists_host).
inline void check_block_sparse_backward(BlockSparseProblem& p, const at::Tensor& q, const at::Tensor& dout,
                                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q_tiles) {
  using namespace block_sparse_detail;
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == p.Hq && lse.size(1) == p.total, kOp, ": lse must be (Hq, total) = (",
              p.Hq, ", ", p.total, "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_type_of(q.scalar_type()), kOp, ": lse must be ",
              acc_type_of(q.scalar_type()), " for ", q.scalar_type(), " q, got ", lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous(), kOp, ": lse must be contiguous");
  TORCH_CHECK(lse.device() == q.device(), kOp, ": lse must be on ", q.device(), ", got ", lse.device());
  check_int_list(q_tiles, "q_tiles", 1, q.device());
  TORCH_CHECK(q_tiles.numel() >= p.num_tiles * p.Hk + 1, kOp,
              ": q_tiles must start with num_tiles * Hk + 1 = ", p.num_tiles * p.Hk + 1, " list offsets, got ",
              q_tiles.numel(), " values");
  p.q_tiles = q_tiles.data_ptr<int32_t>();
  p.q_len = q_tiles.numel();
}

// The lists' values, in host memory: tile_offsets start at 0, never decrease and end at total, no tile
// holds more than max_tile tokens; kv_tiles entries are -1 or a tile index < num_tiles; q_tiles (when
// present): its offsets start right after themselves, never decrease and end at q_len, and its entries are
// query_tile * Hq + query_head with query_tile < num_tiles and query_head in the list's kv head's group. One
// pass over each list: cheap next to the attention itself.
inline void check_block_sparse_lists_host(const BlockSparseProblem& p) {
  using namespace block_sparse_detail;
  check_offsets_host(kOp, "tile_offsets", p.tile_offsets, p.num_tiles, p.total);
  for (int64_t t = 0; t < p.num_tiles; ++t) {
    TORCH_CHECK(p.tile_len(t) <= p.max_tile, kOp, ": tile ", t, " holds ", p.tile_len(t),
                " tokens, more than max_tile = ", p.max_tile);
  }
  const int32_t* kv = p.kv_tiles;
  for (int64_t i = 0, n = p.num_tiles * p.Hq * p.K; i < n; ++i) {
    TORCH_CHECK(kv[i] >= -1 && kv[i] < p.num_tiles, kOp, ": kv_tiles entries must be -1 or a tile index < ",
                p.num_tiles, ", got ", kv[i], " (query tile ", i / (p.Hq * p.K), ", head ", i / p.K % p.Hq, ")");
  }
  if (p.q_tiles == nullptr) return;
  const int64_t lists = p.num_tiles * p.Hk;
  TORCH_CHECK(p.q_tiles[0] == lists + 1 && p.q_tiles[lists] == p.q_len, kOp,
              ": q_tiles' list offsets must start at num_tiles * Hk + 1 = ", lists + 1, " and end at its length ",
              p.q_len, ", got ", p.q_tiles[0], " and ", p.q_tiles[lists]);
  for (int64_t i = 0; i < lists; ++i) {
    TORCH_CHECK(p.q_tiles[i] <= p.q_tiles[i + 1], kOp, ": q_tiles' list offsets must be non-decreasing, got ",
                p.q_tiles[i], " then ", p.q_tiles[i + 1], " at list ", i);
  }
  for (int64_t j = 0; j < p.num_tiles; ++j) {
    for (int64_t hk = 0; hk < p.Hk; ++hk) {
      const TileList list = p.q_list(j, hk);
      for (int64_t s = 0; s < list.len; ++s) {
        const int64_t e = list.data[s];
        TORCH_CHECK(e >= 0 && e < p.num_tiles * p.Hq, kOp,
                    ": q_tiles entries must be query_tile * Hq + query_head < ", p.num_tiles * p.Hq, ", got ", e,
                    " (key tile ", j, ", kv head ", hk, ")");
        TORCH_CHECK(e % p.Hq / p.group() == hk, kOp, ": q_tiles entry ", e, " of kv head ", hk, " names query head ",
                    e % p.Hq, ", which uses kv head ", e % p.Hq / p.group());
      }
    }
  }
}

}  // namespace vdit
