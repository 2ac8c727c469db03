// CPU kernels of the patch embedding ops (schemas in vdit/kernels/schemas.py).
//
// patch_embed_3d is Conv3d with stride == kernel, i.e. tokens = patches @ W^T + b where patches is
// the patchify of the video. Materializing all patches (im2col) and then running one GEMM writes and
// re-reads a patch matrix as large as the video and leaves the GEMM to multi-thread a skinny
// (N x F) @ (F x D) product poorly. Instead the token rows are cut into blocks of a few hundred
// tokens; each thread gathers a block's patches into a cache-resident buffer and runs a
// single-threaded BLAS GEMM (ATen's at::mm / at::addmm) that writes the block's tokens in place.
//
// One block pass serves every op of the family, by which of its optional parts are switched on:
//   gather    P  = patchify(videos_in)[block]                 (m x F, compute dtype)
//   emit      tokens_out[block] = P @ w_fd + bias_d            (m x D)
//   project   Y  = tokens_in[block] @ w_df + bias_f; unpatchify Y into videos_out
//   reduce    acc_w += P^T @ tokens_in[block] (F x D); acc_bd += colsum(tokens_in); acc_bf += colsum(P)
// patch_embed forward   = gather + emit;   backward = gather + project (grad x) + reduce (grad W, b).
// patch_unembed forward = project;         backward = gather (of grad video) + emit (grad tokens) + reduce.
// Patches never overlap, so the unpatchify scatter of the x gradient needs no atomics; weight and
// bias gradients are reduced per thread and summed at the end.
//
// Dense (B, C, T, H, W) batches and packed lists of videos of different sizes use the same pass: a
// dense batch is B samples of one size. Per-sample shapes and offsets live in a small int64 metadata
// table (patch_embed/math.h; built by patch_embed/shape.h, which also holds the shape checks); the
// pixel index math is patchify/math.h's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "patch_embed/shape.h"

namespace vdit {
namespace {

// Outputs are written once, and token outputs are large (D / F times the video: 75 MB for one
// 16x64x64 latent at D = 1152). On fresh 4 KiB pages the kernel's page faults cost about twice the GEMM's CPU time
// (measured on the 2-core CI machine: 26 ms of faults vs ~13 ms of GEMM per 75 MB), so outputs of
// at least kHugeOutputBytes (tokens, and videos of large latents) are placed on transparent huge
// pages (madvise; a no-op where THP is off).
// PyTorch's own CPU allocator does the same only under THP_MEM_ALLOC_ENABLE=1.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeOutputBytes = size_t{4} << 20;

at::Tensor new_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kHugeOutputBytes) return new_output(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, rounded);
  if (data == nullptr) return new_output(sizes, options);
  madvise(data, rounded, MADV_HUGEPAGE);
  at::Tensor out = at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// Copies a block of finished tokens to the output with non-temporal stores: the output is far
// larger than the caches and not read again here, and plain stores would first read every output
// line from memory (read-for-ownership), doubling the memory traffic of the forward pass.
void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__AVX512F__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
  }
  std::memcpy(d, s, bytes);
  _mm_sfence();
#else
  std::memcpy(dst, src, bytes);
#endif
}

// A block: token rows [row_begin, row_end) of one sample; its tokens are the contiguous rows
// [token_begin, token_begin + (row_end - row_begin) * Wp) of the packed token matrix.
struct Block {
  int64_t sample, row_begin, row_end, token_begin;
};

// Working set of one block (its tokens' D features plus F patch features, compute dtype) aimed
// at half of a core's L2 so that a block's token matrix is still cached when the reduce step
// re-reads it.
constexpr int64_t kBlockBytes = 1 << 20;

// The packed batch and its blocks.
struct Plan : PackedPatches {
  int64_t max_block_tokens = 0;
  std::vector<Block> blocks;
};

Plan make_plan(const VideoSizes& sizes, int64_t C, at::IntArrayRef patch, int64_t D, int64_t acc_bytes) {
  Plan plan;
  static_cast<PackedPatches&>(plan) = packed_patches(sizes, C, patch);
  // Enough blocks to keep every thread busy on small inputs, otherwise cache-sized ones.
  const int64_t threads = at::get_num_threads();
  int64_t target = std::max<int64_t>(1, kBlockBytes / ((D + plan.F) * acc_bytes));
  target = std::min(target, std::max<int64_t>(1, plan.total_tokens / (4 * threads)));
  for (int64_t s = 0; s < plan.batch(); ++s) {
    const PatchGeometry g = plan.geometry(s);
    const int64_t Wp = g.grid_w(), sample_rows = g.grid_t() * g.grid_h();
    const int64_t rows_per_block = std::max<int64_t>(1, target / Wp);
    for (int64_t r = 0; r < sample_rows; r += rows_per_block) {
      const int64_t end = std::min(r + rows_per_block, sample_rows);
      plan.blocks.push_back({s, r, end, plan.token_offset(s) + r * Wp});
      plan.max_block_tokens = std::max(plan.max_block_tokens, (end - r) * Wp);
    }
  }
  return plan;
}

// Gather (kToPatches) a block's patches from its video into P (m x F, row-major), or scatter P back.
template <typename scalar_t, typename acc_t, bool kToPatches>
void move_block(const PatchGeometry& g, const Block& blk, scalar_t* video, acc_t* P) {
  const int64_t Hp = g.grid_h(), Wp = g.grid_w(), F = g.num_features(), pw = g.pw;
  for (int64_t row = blk.row_begin; row < blk.row_end; ++row) {
    acc_t* chunk = P + (row - blk.row_begin) * Wp * F;
    for (int64_t r = 0; r < g.rows_per_token_row(); ++r) {
      int64_t video_offset, feature_offset;
      patch_row(g, row / Hp, row % Hp, r, &video_offset, &feature_offset);
      scalar_t* v = video + video_offset;
      acc_t* c = chunk + feature_offset;
      for (int64_t ww = 0; ww < Wp; ++ww) {
        for (int64_t k = 0; k < pw; ++k) {
          if constexpr (kToPatches) {
            c[ww * F + k] = static_cast<acc_t>(v[ww * pw + k]);
          } else {
            v[ww * pw + k] = static_cast<scalar_t>(c[ww * F + k]);
          }
        }
      }
    }
  }
}

// The optional parts of a block pass; an undefined tensor / empty vector switches a part off.
struct PassArgs {
  std::vector<void*> videos_in, videos_out;  // per-sample base pointers, video dtype
  at::Tensor tokens_in, tokens_out;          // (total, D), video dtype, contiguous
  at::Tensor w_fd, bias_d;                   // emit: (F, D), (D,), compute dtype
  at::Tensor w_df, bias_f;                   // project: (D, F), (F,), compute dtype
  bool reduce_w = false, reduce_bd = false, reduce_bf = false;
};

struct PassResult {
  at::Tensor w;   // (F, D) = sum over blocks of P^T @ tokens_in
  at::Tensor bd;  // (D,) column sums of tokens_in
  at::Tensor bf;  // (F,) column sums of P
};

template <typename scalar_t>
PassResult run_pass(const Plan& plan, const PassArgs& a, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // GEMMs read/write tokens in place
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t F = plan.F, threads = at::get_num_threads();
  const bool gather = !a.videos_in.empty(), project = !a.videos_out.empty(), emit = a.tokens_out.defined();
  PassResult result;
  at::Tensor acc_w = a.reduce_w ? at::zeros({threads, F, D}, acc) : at::Tensor();
  at::Tensor acc_bd = a.reduce_bd ? at::zeros({threads, D}, acc) : at::Tensor();
  at::Tensor acc_bf = a.reduce_bf ? at::zeros({threads, F}, acc) : at::Tensor();
  const int64_t max_m = plan.max_block_tokens;

  // Small problems run on the calling thread: waking the pool costs more than their GEMMs (and much
  // more on a loaded machine, where a worker may wait a whole scheduler time slice).
  const int64_t num_blocks = static_cast<int64_t>(plan.blocks.size());
  const bool small = plan.total_tokens * D * F < (int64_t{1} << 21);
  at::parallel_for(0, num_blocks, small ? std::max<int64_t>(num_blocks, 1) : 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch guard (see dispatch_pass).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t tid = at::get_thread_num();
    at::Tensor p_buf = gather ? at::empty({max_m, F}, acc) : at::Tensor();
    at::Tensor y_buf = project ? at::empty({max_m, F}, acc) : at::Tensor();
    // Large outputs are computed block by block into a cached buffer and streamed out (stream_copy).
    const bool stream = emit && plan.total_tokens * D * static_cast<int64_t>(sizeof(scalar_t)) >=
                                    static_cast<int64_t>(kHugeOutputBytes);
    at::Tensor o_buf = emit && (!kDirect || stream) ? at::empty({max_m, D}, acc) : at::Tensor();
    // Column sums as GEMVs with a ones vector: ATen's dim-0 sum is several times slower here.
    at::Tensor ones = a.reduce_bd || a.reduce_bf ? at::ones({max_m}, acc) : at::Tensor();
    at::Tensor my_w = a.reduce_w ? acc_w[tid] : at::Tensor();
    at::Tensor my_bd = a.reduce_bd ? acc_bd[tid] : at::Tensor();
    at::Tensor my_bf = a.reduce_bf ? acc_bf[tid] : at::Tensor();
    for (int64_t b = begin; b < end; ++b) {
      const Block& blk = plan.blocks[b];
      const PatchGeometry g = plan.geometry(blk.sample);
      const int64_t m = (blk.row_end - blk.row_begin) * g.grid_w();
      at::Tensor P, tokens;
      if (gather) {
        P = p_buf.narrow(0, 0, m);
        move_block<scalar_t, acc_t, true>(g, blk, static_cast<scalar_t*>(a.videos_in[blk.sample]),
                                          P.data_ptr<acc_t>());
      }
      if (a.tokens_in.defined()) {
        tokens = a.tokens_in.narrow(0, blk.token_begin, m);
        if constexpr (!kDirect) tokens = tokens.to(acc.dtype());
      }
      if (emit) {
        at::Tensor out = a.tokens_out.narrow(0, blk.token_begin, m);
        at::Tensor target = kDirect && !stream ? out : o_buf.narrow(0, 0, m);
        if (a.bias_d.defined()) at::addmm_out(target, a.bias_d, P, a.w_fd);
        else at::mm_out(target, P, a.w_fd);
        if constexpr (!kDirect) {
          out.copy_(target);
        } else if (stream) {
          stream_copy(out.data_ptr(), target.data_ptr(), m * D * sizeof(scalar_t));
        }
      }
      if (project) {
        at::Tensor Y = y_buf.narrow(0, 0, m);
        if (a.bias_f.defined()) at::addmm_out(Y, a.bias_f, tokens, a.w_df);
        else at::mm_out(Y, tokens, a.w_df);
        move_block<scalar_t, acc_t, false>(g, blk, static_cast<scalar_t*>(a.videos_out[blk.sample]),
                                           Y.data_ptr<acc_t>());
      }
      // (F x D) orientation: the long D side is the GEMM's contiguous output dimension.
      if (a.reduce_w) my_w.addmm_(P.t(), tokens);
      if (a.reduce_bd) my_bd.addmv_(tokens.t(), ones.narrow(0, 0, m));
      if (a.reduce_bf) my_bf.addmv_(P.t(), ones.narrow(0, 0, m));
    }
  });
  if (a.reduce_w) result.w = acc_w.sum(0);
  if (a.reduce_bd) result.bd = acc_bd.sum(0);
  if (a.reduce_bf) result.bf = acc_bf.sum(0);
  return result;
}

// Every op entry point holds an AutoDispatchBelowADInplaceOrView guard: the ATen calls inside (GEMMs
// on views of inputs that may require grad) are kernel internals and must not record autograd history.
PassResult dispatch_pass(const Plan& plan, const PassArgs& a, int64_t D, at::ScalarType dtype) {
  PassResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vdit_patch_embed_cpu",
                                  [&] { result = run_pass<scalar_t>(plan, a, D); });
  return result;
}

// ---- patch_embed_3d -----------------------------------------------------------------------

at::Tensor embed_tokens(const Plan& plan, std::vector<void*> videos, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::TensorOptions& options) {
  const int64_t D = weight.size(0);
  at::Tensor tokens = new_large_output({plan.total_tokens, D}, options);
  PassArgs a;
  a.videos_in = std::move(videos);
  a.tokens_out = tokens;
  a.w_fd = to_compute(weight.reshape({D, plan.F}).t());
  if (bias.has_value()) a.bias_d = to_compute(*bias);
  dispatch_pass(plan, a, D, options.dtype().toScalarType());
  return tokens;
}

at::Tensor patch_embed_3d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "vdit::patch_embed_3d";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input(op, "x", x, 5, x);
  check_embed_weight(op, weight, bias, x, x.size(1));
  const Plan plan = make_plan(dense_sizes(x), x.size(1), weight.sizes().slice(2), weight.size(0),
                              compute_bytes(x.scalar_type()));
  const int64_t N = plan.total_tokens / x.size(0);
  return embed_tokens(plan, batch_pointers(x), weight, bias, x.options()).view({x.size(0), N, weight.size(0)});
}

// Gradients of the embedding; grad_videos_out holds the per-sample pointers of the x gradient.
std::tuple<at::Tensor, at::Tensor> embed_backward(const Plan& plan, const at::Tensor& grad, std::vector<void*> videos,
                                                  std::vector<void*> grad_videos, const at::Tensor& weight,
                                                  bool need_w, bool need_b) {
  const int64_t D = weight.size(0);
  PassArgs a;
  a.tokens_in = grad.reshape({plan.total_tokens, D});
  if (need_w) a.videos_in = std::move(videos);
  if (!grad_videos.empty()) {
    a.videos_out = std::move(grad_videos);
    a.w_df = to_compute(weight.reshape({D, plan.F}));
  }
  a.reduce_w = need_w;
  a.reduce_bd = need_b;
  const PassResult r = dispatch_pass(plan, a, D, grad.scalar_type());
  at::Tensor gw = need_w ? r.w.t().to(weight.scalar_type()).reshape(weight.sizes()) : at::empty({0}, weight.options());
  at::Tensor gb = need_b ? r.bd.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_3d_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           std::array<bool, 3> mask) {
  const char* op = "vdit::patch_embed_3d_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input(op, "x", x, 5, x);
  check_input(op, "grad", grad, 3, x);
  check_embed_weight(op, weight, std::nullopt, x, x.size(1));
  const Plan plan = make_plan(dense_sizes(x), x.size(1), weight.sizes().slice(2), weight.size(0),
                              compute_bytes(x.scalar_type()));
  TORCH_CHECK(grad.numel() == plan.total_tokens * weight.size(0), op, ": grad has shape ", grad.sizes());
  at::Tensor gx = mask[0] ? new_large_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto [gw, gb] = embed_backward(plan, grad, batch_pointers(x), mask[0] ? batch_pointers(gx) : std::vector<void*>{},
                                 weight, mask[1], mask[2]);
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_3d_varlen_cpu(at::TensorList videos,
                                                                         const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias) {
  const char* op = "vdit::patch_embed_3d_varlen";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_video_list(op, videos);
  const at::Tensor& v0 = videos[0];
  check_embed_weight(op, weight, bias, v0, v0.size(0));
  const Plan plan = make_plan(list_sizes(videos), v0.size(0), weight.sizes().slice(2), weight.size(0),
                              compute_bytes(v0.scalar_type()));
  TORCH_CHECK(plan.total_tokens <= std::numeric_limits<int32_t>::max(), op, ": ", plan.total_tokens,
              " tokens do not fit int32 cu_seqlens");
  at::Tensor tokens = embed_tokens(plan, list_pointers(videos.vec()), weight, bias, v0.options());
  const int64_t B = static_cast<int64_t>(videos.size());
  at::Tensor cu_seqlens = at::empty({B + 1}, at::kInt);
  at::Tensor grids = at::empty({B, 3}, at::kInt);
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int32_t* grid = grids.data_ptr<int32_t>();
  for (int64_t s = 0; s < B; ++s) {
    const PatchGeometry g = plan.geometry(s);
    cu[s] = static_cast<int32_t>(plan.token_offset(s));
    grid[3 * s] = static_cast<int32_t>(g.grid_t());
    grid[3 * s + 1] = static_cast<int32_t>(g.grid_h());
    grid[3 * s + 2] = static_cast<int32_t>(g.grid_w());
  }
  cu[B] = static_cast<int32_t>(plan.total_tokens);
  return {tokens, cu_seqlens, grids};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> patch_embed_3d_varlen_backward_cpu(
    const at::Tensor& grad, at::TensorList videos, const at::Tensor& weight, std::array<bool, 3> mask) {
  const char* op = "vdit::patch_embed_3d_varlen_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_video_list(op, videos);
  const at::Tensor& v0 = videos[0];
  check_input(op, "grad", grad, 2, v0);
  check_embed_weight(op, weight, std::nullopt, v0, v0.size(0));
  const Plan plan = make_plan(list_sizes(videos), v0.size(0), weight.sizes().slice(2), weight.size(0),
                              compute_bytes(v0.scalar_type()));
  TORCH_CHECK(grad.size(0) == plan.total_tokens && grad.size(1) == weight.size(0), op, ": grad has shape ",
              grad.sizes());
  std::vector<at::Tensor> gx;
  if (mask[0]) {
    for (const auto& v : videos) gx.push_back(new_output_like(v));
  }
  auto [gw, gb] = embed_backward(plan, grad, list_pointers(videos.vec()), list_pointers(gx), weight, mask[1], mask[2]);
  return {gx, gw, gb};
}

// ---- patch_unembed_3d ---------------------------------------------------------------------

void unembed_videos(const Plan& plan, const at::Tensor& tokens, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, std::vector<void*> videos) {
  PassArgs a;
  a.tokens_in = tokens.reshape({plan.total_tokens, weight.size(1)});
  a.videos_out = std::move(videos);
  a.w_df = to_compute(weight.t());
  if (bias.has_value()) a.bias_f = to_compute(*bias);
  dispatch_pass(plan, a, weight.size(1), tokens.scalar_type());
}

// Gradients of the unembedding; grad_videos are the per-sample pointers of the output gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unembed_backward(const Plan& plan, std::vector<void*> grad_videos,
                                                                const at::Tensor& tokens, const at::Tensor& weight,
                                                                std::array<bool, 3> mask) {
  const int64_t D = weight.size(1);
  PassArgs a;
  a.videos_in = std::move(grad_videos);
  at::Tensor gt = mask[0] ? new_large_output(tokens.sizes(), tokens.options()) : at::empty({0}, tokens.options());
  if (mask[0]) {
    a.tokens_out = gt.view({plan.total_tokens, D});
    a.w_fd = to_compute(weight);
  }
  if (mask[1]) a.tokens_in = tokens.reshape({plan.total_tokens, D});
  a.reduce_w = mask[1];
  a.reduce_bf = mask[2];
  const PassResult r = dispatch_pass(plan, a, D, tokens.scalar_type());
  at::Tensor gw = mask[1] ? r.w.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor gb = mask[2] ? r.bf.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {gt, gw, gb};
}

at::Tensor patch_unembed_3d_cpu(const at::Tensor& tokens, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                at::IntArrayRef grid, at::IntArrayRef patch) {
  const char* op = "vdit::patch_unembed_3d";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t C = check_unembed(op, tokens, 3, weight, bias, patch);
  const int64_t B = tokens.size(0);
  const auto sizes = grid_sizes(grid, patch);
  TORCH_CHECK(tokens.size(1) == grid[0] * grid[1] * grid[2], op, ": tokens ", tokens.sizes(), " do not fill grid ",
              grid);
  const Plan plan = make_plan(VideoSizes(B, sizes[0]), C, patch, weight.size(1),
                              compute_bytes(tokens.scalar_type()));
  at::Tensor video = new_large_output({B, C, sizes[0][0], sizes[0][1], sizes[0][2]}, tokens.options());
  unembed_videos(plan, tokens, weight, bias, batch_pointers(video));
  return video;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_unembed_3d_backward_cpu(const at::Tensor& grad,
                                                                             const at::Tensor& tokens,
                                                                             const at::Tensor& weight,
                                                                             at::IntArrayRef grid,
                                                                             at::IntArrayRef patch,
                                                                             std::array<bool, 3> mask) {
  const char* op = "vdit::patch_unembed_3d_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t C = check_unembed(op, tokens, 3, weight, std::nullopt, patch);
  check_input(op, "grad", grad, 5, tokens);
  const int64_t B = tokens.size(0);
  const auto sizes = grid_sizes(grid, patch);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == C && grad.size(2) == sizes[0][0] && grad.size(3) == sizes[0][1] &&
                  grad.size(4) == sizes[0][2],
              op, ": grad has shape ", grad.sizes());
  const Plan plan = make_plan(VideoSizes(B, sizes[0]), C, patch, weight.size(1),
                              compute_bytes(tokens.scalar_type()));
  return unembed_backward(plan, batch_pointers(grad), tokens, weight, mask);
}

std::vector<at::Tensor> patch_unembed_3d_varlen_cpu(const at::Tensor& tokens, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, at::IntArrayRef grids,
                                                    at::IntArrayRef patch) {
  const char* op = "vdit::patch_unembed_3d_varlen";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t C = check_unembed(op, tokens, 2, weight, bias, patch);
  const auto sizes = grid_sizes(grids, patch);
  const Plan plan = make_plan(sizes, C, patch, weight.size(1), compute_bytes(tokens.scalar_type()));
  TORCH_CHECK(plan.total_tokens == tokens.size(0), op, ": grids hold ", plan.total_tokens, " tokens, tokens has ",
              tokens.size(0));
  std::vector<at::Tensor> videos;
  for (const auto& [T, H, W] : sizes) videos.push_back(new_output({C, T, H, W}, tokens.options()));
  unembed_videos(plan, tokens, weight, bias, list_pointers(videos));
  return videos;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_unembed_3d_varlen_backward_cpu(
    at::TensorList grads, const at::Tensor& tokens, const at::Tensor& weight, at::IntArrayRef grids,
    at::IntArrayRef patch, std::array<bool, 3> mask) {
  const char* op = "vdit::patch_unembed_3d_varlen_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t C = check_unembed(op, tokens, 2, weight, std::nullopt, patch);
  const auto sizes = grid_sizes(grids, patch);
  TORCH_CHECK(grads.size() == sizes.size(), op, ": expected ", sizes.size(), " gradients, got ", grads.size());
  for (size_t s = 0; s < sizes.size(); ++s) {
    check_input(op, "grads[i]", grads[s], 4, tokens);
    TORCH_CHECK(grads[s].size(0) == C && grads[s].size(1) == sizes[s][0] && grads[s].size(2) == sizes[s][1] &&
                    grads[s].size(3) == sizes[s][2],
                op, ": grads[", s, "] has shape ", grads[s].sizes());
  }
  const Plan plan = make_plan(sizes, C, patch, weight.size(1), compute_bytes(tokens.scalar_type()));
  TORCH_CHECK(plan.total_tokens == tokens.size(0), op, ": grids do not match tokens");
  return unembed_backward(plan, list_pointers(grads.vec()), tokens, weight, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("patch_embed_3d", &patch_embed_3d_cpu);
  m.impl("patch_embed_3d_backward", &patch_embed_3d_backward_cpu);
  m.impl("patch_embed_3d_varlen", &patch_embed_3d_varlen_cpu);
  m.impl("patch_embed_3d_varlen_backward", &patch_embed_3d_varlen_backward_cpu);
  m.impl("patch_unembed_3d", &patch_unembed_3d_cpu);
  m.impl("patch_unembed_3d_backward", &patch_unembed_3d_backward_cpu);
  m.impl("patch_unembed_3d_varlen", &patch_unembed_3d_varlen_cpu);
  m.impl("patch_unembed_3d_varlen_backward", &patch_unembed_3d_varlen_backward_cpu);
}

}  // namespace vdit
