// CPU entry points of vdit::varlen_attention_fwd / vdit::varlen_attention_bwd: checks, conversion to the
// compute dtype (fp32, fp64 for fp64 inputs; fp16/bf16 are converted), outputs, and the call into the
// kernels of the active ISA (attention/cpu_kernels.h, common/cpu_isa.h). The kernels themselves (work
// items, tiles, online softmax) are in attention/cpu_kernels.cpp; shape checks and the problem descriptor
// in attention/shape.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/cpu_kernels.h"
#include "attention/shape.h"
#include "common/alloc.h"

namespace vdit {
namespace {

using Problem = AttentionProblem;

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
    VDIT_CPU_ISA_CALL(varlen_forward<scalar_t>, p, static_cast<scalar_t>(softmax_scale), qc.data_ptr<scalar_t>(),
                      kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                      lse.data_ptr<scalar_t>());
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
    VDIT_CPU_ISA_CALL(varlen_backward<scalar_t>, p, static_cast<scalar_t>(softmax_scale), doc.data_ptr<scalar_t>(),
                      qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                      oc.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                      dk_h.data_ptr<scalar_t>(), dv_h.data_ptr<scalar_t>(), dk_h.size(1) * p.D, grouped ? 1 : 0);
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
