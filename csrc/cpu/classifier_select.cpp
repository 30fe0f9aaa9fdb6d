// CPU kernels for classifier selection (the CAB-CNN head).
//
// h (B, F), gate_weight (K, F), gate_bias (K,), weight (K, C, F), bias (K, C):
//   scores (B, K + K*C) = h · [gate_weight; weight]ᵀ + [gate_bias; bias]
//   gates  (B, K)       = softmax(scores[:, :K] / temperature)
//   out    (B, C)       = Σ_k gates[:, k] · scores[:, K + k*C : K + (k+1)*C]
// The GEMMs go to at::mm (MKL/oneDNN); the softmax and the weighted contraction, which touch
// each score once, run fused per row around them (bf16/fp16 inputs: in fp32). Forward returns the scores so the backward
// reuses them instead of redoing the GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "symfast_module.h"

namespace {

struct Dims {
  int64_t b, f, k, c;
};

Dims check_inputs(const at::Tensor& h, const at::Tensor& gate_weight, const at::Tensor& weight,
                  double temperature) {
  TORCH_CHECK(h.device().is_cpu() && gate_weight.device().is_cpu() && weight.device().is_cpu(),
              "classifier_select_cpu needs CPU tensors");
  TORCH_CHECK(h.dim() == 2, "h must be (B, F), got ", h.sizes());
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(1) == h.size(1),
              "gate_weight must be (K, ", h.size(1), "), got ", gate_weight.sizes());
  const int64_t k = gate_weight.size(0);
  TORCH_CHECK(k >= 1, "need at least one classifier (K >= 1)");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == k && weight.size(2) == h.size(1),
              "weight must be (", k, ", C, ", h.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, "need at least one class (C >= 1)");
  TORCH_CHECK(gate_weight.scalar_type() == h.scalar_type() && weight.scalar_type() == h.scalar_type(),
              "h, gate_weight and weight must share a dtype");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ",
              temperature);
  return {h.size(0), h.size(1), k, weight.size(1)};
}

// Numerically stable softmax of the K scaled gate scores into g.
template <typename scalar_t>
inline void gate_softmax(const scalar_t* __restrict s, int64_t k, scalar_t inv_t,
                         scalar_t* __restrict g) {
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < k; ++j) mx = std::max(mx, s[j] * inv_t);
  scalar_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    g[j] = std::exp(s[j] * inv_t - mx);
    total += g[j];
  }
  const scalar_t inv_total = scalar_t(1) / total;
  for (int64_t j = 0; j < k; ++j) g[j] *= inv_total;
}

// Adds the biases to one row of scores in place (the backward reuses them), then mixes.
template <typename scalar_t>
SYMFAST_MULTIVERSION void mix_row(scalar_t* __restrict s, const scalar_t* __restrict bias,
                                  const Dims& d, scalar_t inv_t, scalar_t* __restrict g,
                                  scalar_t* __restrict acc, scalar_t* __restrict out) {
  const int64_t n = d.k + d.k * d.c;
  for (int64_t j = 0; j < n; ++j) s[j] += bias[j];
  gate_softmax(s, d.k, inv_t, g);
  std::fill(acc, acc + d.c, scalar_t(0));
  const scalar_t* logits = s + d.k;
  for (int64_t j = 0; j < d.k; ++j) {
    const scalar_t gj = g[j];
    const scalar_t* row = logits + j * d.c;
    for (int64_t c = 0; c < d.c; ++c) acc[c] += gj * row[c];
  }
  std::copy(acc, acc + d.c, out);
}

// d scores of one row: d logits[k, c] = g_k · dout[c];
// d gate score k = g_k (dg_k − Σ_j g_j dg_j) / T, with dg_k = Σ_c dout[c] · logits[k, c].
template <typename scalar_t>
SYMFAST_MULTIVERSION void mix_row_backward(const scalar_t* __restrict s,
                                           const scalar_t* __restrict dout, const Dims& d,
                                           scalar_t inv_t, scalar_t* __restrict g,
                                           scalar_t* __restrict dg, scalar_t* __restrict ds) {
  gate_softmax(s, d.k, inv_t, g);
  const scalar_t* logits = s + d.k;
  scalar_t* dlogits = ds + d.k;
  scalar_t mean_dg = 0;
  for (int64_t j = 0; j < d.k; ++j) {
    const scalar_t* row = logits + j * d.c;
    scalar_t* drow = dlogits + j * d.c;
    const scalar_t gj = g[j];
    scalar_t acc = 0;
    // Without the simd reduction the compiler keeps this dot product scalar (no reassociation).
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d.c; ++c) {
      acc += dout[c] * row[c];
      drow[c] = gj * dout[c];
    }
    dg[j] = acc;
    mean_dg += gj * acc;
  }
  for (int64_t j = 0; j < d.k; ++j) ds[j] = g[j] * (dg[j] - mean_dg) * inv_t;
}

// Rows are independent; ~32K scores per task amortises the OpenMP fork for small batches.
int64_t row_grain(const Dims& d) { return std::max<int64_t>(1, 32768 / (d.k + d.k * d.c)); }

// bf16/fp16 inputs are computed in fp32 (scores kept in fp32, results rounded once): the gate
// gradient g·(dg − Σ g dg) cancels, and bf16 scores cost ~2% there.
at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> classifier_select_fwd_cpu(
    const at::Tensor& h_in, const at::Tensor& gate_weight_in, const at::Tensor& gate_bias_in,
    const at::Tensor& weight_in, const at::Tensor& bias_in, double temperature) {
  const Dims d = check_inputs(h_in, gate_weight_in, weight_in, temperature);
  TORCH_CHECK(gate_bias_in.dim() == 1 && gate_bias_in.size(0) == d.k,
              "gate_bias must be (", d.k, ",), got ", gate_bias_in.sizes());
  TORCH_CHECK(bias_in.dim() == 2 && bias_in.size(0) == d.k && bias_in.size(1) == d.c,
              "bias must be (", d.k, ", ", d.c, "), got ", bias_in.sizes());
  TORCH_CHECK(gate_bias_in.scalar_type() == h_in.scalar_type() &&
                  bias_in.scalar_type() == h_in.scalar_type(),
              "gate_bias and bias must have h's dtype");
  const at::ScalarType ct = compute_type(h_in.scalar_type());
  const int64_t n = d.k + d.k * d.c;
  // Two GEMMs write straight into the column blocks of one scores buffer (BLAS with ldc = n),
  // instead of one GEMM against torch.cat([gate_weight, weight]): the cat copies 1.7 MB of
  // weights per call and measured no faster at B=F=512, K=16, C=50 (18.8 vs 18.1 ms, 1 thread).
  at::Tensor scores = at::empty({d.b, n}, h_in.options().dtype(ct));
  const at::Tensor h = h_in.to(ct);
  at::Tensor gate_block = scores.narrow(1, 0, d.k);
  at::Tensor logit_block = scores.narrow(1, d.k, d.k * d.c);
  at::mm_out(gate_block, h, gate_weight_in.to(ct).t());
  at::mm_out(logit_block, h, weight_in.reshape({d.k * d.c, d.f}).to(ct).t());
  const at::Tensor stacked_bias =
      at::cat({gate_bias_in, bias_in.reshape({d.k * d.c})}, 0).to(ct).contiguous();
  at::Tensor out = at::empty({d.b, d.c}, scores.options());
  if (d.b > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "classifier_select_fwd_cpu", [&] {
      scalar_t* sp = scores.data_ptr<scalar_t>();
      const scalar_t* bp = stacked_bias.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
      at::parallel_for(0, d.b, row_grain(d), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> g(d.k), acc(d.c);
        for (int64_t r = begin; r < end; ++r)
          mix_row<scalar_t>(sp + r * n, bp, d, inv_t, g.data(), acc.data(), op + r * d.c);
      });
    });
  }
  return {out.to(h_in.scalar_type()), scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> classifier_select_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& scores_in, const at::Tensor& h_in,
    const at::Tensor& gate_weight_in, const at::Tensor& weight_in, double temperature) {
  const Dims d = check_inputs(h_in, gate_weight_in, weight_in, temperature);
  const int64_t n = d.k + d.k * d.c;
  const at::ScalarType dtype = h_in.scalar_type(), ct = compute_type(dtype);
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.size(0) == d.b && scores_in.size(1) == n,
              "scores must be (", d.b, ", ", n, "), got ", scores_in.sizes());
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == d.b && grad_out_in.size(1) == d.c,
              "grad_out must be (", d.b, ", ", d.c, "), got ", grad_out_in.sizes());
  TORCH_CHECK(scores_in.scalar_type() == ct, "scores must be ", ct, ", got ",
              scores_in.scalar_type());
  TORCH_CHECK(grad_out_in.scalar_type() == dtype, "grad_out must have h's dtype");
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(ct).contiguous();
  at::Tensor dscores = at::empty({d.b, n}, scores.options());
  if (d.b > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "classifier_select_bwd_cpu", [&] {
      const scalar_t* sp = scores.data_ptr<scalar_t>();
      const scalar_t* gp = grad_out.data_ptr<scalar_t>();
      scalar_t* dp = dscores.data_ptr<scalar_t>();
      const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
      at::parallel_for(0, d.b, row_grain(d), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> g(d.k), dg(d.k);
        for (int64_t r = begin; r < end; ++r)
          mix_row_backward<scalar_t>(sp + r * n, gp + r * d.c, d, inv_t, g.data(), dg.data(),
                                     dp + r * n);
      });
    });
  }
  const at::Tensor h = h_in.to(ct);
  // Column slices of dscores are BLAS-strided views (leading dim n): no copies before the GEMMs.
  const at::Tensor dgate = dscores.narrow(1, 0, d.k);
  const at::Tensor dlogits = dscores.narrow(1, d.k, d.k * d.c);
  at::Tensor grad_h = at::mm(dlogits, weight_in.reshape({d.k * d.c, d.f}).to(ct));
  grad_h.addmm_(dgate, gate_weight_in.to(ct));
  // One GEMM and one column sum over all n = K + K·C score columns, split afterwards: every
  // extra OpenMP region costs a barrier, and on a loaded 2-core machine a barrier waiting for a
  // descheduled thread is what dominated the 2-thread timings.
  const at::Tensor grad_stacked = at::mm(dscores.t(), h);  // (n, F)
  const at::Tensor grad_stacked_bias = dscores.sum(0);     // (n,)
  // grad weight is a view into grad_stacked (no copy); the K-row gate part is copied out so
  // the two outputs do not share storage.
  return {grad_h.to(dtype),
          grad_stacked.narrow(0, 0, d.k).to(dtype, /*non_blocking=*/false, /*copy=*/true),
          grad_stacked_bias.narrow(0, 0, d.k).to(dtype, false, true),
          grad_stacked.narrow(0, d.k, d.k * d.c).view({d.k, d.c, d.f}).to(dtype),
          grad_stacked_bias.narrow(0, d.k, d.k * d.c).view({d.k, d.c}).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def("classifier_select_fwd_cpu(Tensor h, Tensor gate_weight, Tensor gate_bias, Tensor weight, "
        "Tensor bias, float temperature) -> (Tensor, Tensor)");
  m.def("classifier_select_bwd_cpu(Tensor grad_out, Tensor scores, Tensor h, Tensor gate_weight, "
        "Tensor weight, float temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("classifier_select_fwd_cpu", &classifier_select_fwd_cpu);
  m.impl("classifier_select_bwd_cpu", &classifier_select_bwd_cpu);
}

SYMFAST_PY_MODULE()
