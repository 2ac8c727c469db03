// CPU entry points of vdit::block_sparse_attention_fwd / vdit::block_sparse_attention_bwd: checks,
// conversion to the compute dtype, outputs, and the call into the kernels of the active ISA
// (attention/cpu_kernels.h, common/cpu_isa.h). The kernels (work items, dense blocks, the reasons they are
// deterministic and race-free) are in sparse_attention/cpu_kernels.cpp; shape checks, list value checks
// and the problem descriptor in sparse_attention/shape.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/cpu_kernels.h"
#include "common/alloc.h"
#include "sparse_attention/shape.h"

namespace vdit {
namespace {

using Problem = BlockSparseProblem;

// ---- operator entry points --------------------------------------------------------------------

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& tile_offsets,
                                                                  const at::Tensor& kv_tiles, int64_t max_tile,
                                                                  double softmax_scale) {
  const Problem p = block_sparse_problem(q, k, v, tile_offsets, kv_tiles, max_tile);
  check_block_sparse_lists_host(p);
  const at::ScalarType ct = acc_type_of(q.scalar_type());
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  at::Tensor out = new_output(q.sizes(), q.options().dtype(ct));
  at::Tensor lse = new_output({p.Hq, p.total}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "block_sparse_attention_fwd_cpu", [&] {
    VDIT_CPU_ISA_CALL(block_sparse_forward<scalar_t>, p, static_cast<scalar_t>(softmax_scale),
                      qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& tile_offsets, const at::Tensor& kv_tiles, const at::Tensor& q_tiles,
    int64_t max_tile, double softmax_scale) {
  Problem p = block_sparse_problem(q, k, v, tile_offsets, kv_tiles, max_tile);
  check_block_sparse_backward(p, q, dout, out, lse, q_tiles);
  check_block_sparse_lists_host(p);
  const at::ScalarType ct = acc_type_of(q.scalar_type());
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  const at::Tensor doc = as_compute(dout, ct), oc = as_compute(out, ct);
  at::Tensor dq = new_output(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = new_output(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = new_output(v.sizes(), v.options().dtype(ct));
  at::Tensor delta = new_output({p.Hq, p.total}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "block_sparse_attention_bwd_cpu", [&] {
    VDIT_CPU_ISA_CALL(block_sparse_backward<scalar_t>, p, static_cast<scalar_t>(softmax_scale),
                      doc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                      vc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                      delta.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                      dv.data_ptr<scalar_t>());
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdit, CPU, m) {
  m.impl("block_sparse_attention_fwd", &block_sparse_attention_fwd_cpu);
  m.impl("block_sparse_attention_bwd", &block_sparse_attention_bwd_cpu);
}

}  // namespace vdit
