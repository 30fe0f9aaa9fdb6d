// CPU kernels for classifier selection (the CAB-CNN head).
//
// h (B, F), gate_weight (K, F), gate_bias (K,), weight (K, C, F), bias (K, C):
//   scores (B, K + K*C) = h · [gate_weight; weight]ᵀ + [gate_bias; bias]
//   gates  (B, K)       = softmax(scores[:, :K] / temperature)
//   out    (B, C)       = Σ_k gates[:, k] · scores[:, K + k*C : K + (k+1)*C]
// The GEMMs go to at::mm (MKL/oneDNN); the softmax and the weighted contraction, which touch
// each score once, run fused per row around them (bf16/fp16 inputs: in fp32). Forward returns the
// scores so the backward reuses them instead of redoing the GEMM.
//
// Threading: with few threads and enough rows, each thread runs its own single-threaded GEMMs
// on its block of rows and the row epilogue right after (scores still in its cache), one parallel
// region per phase; otherwise the BLAS threads each GEMM and the row loops run in parallel
// between them. See row_blocks() for the measurement that decided.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
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

// Numerically stable softmax of the K scaled gate scores into g. The max is taken before the
// scaling, exp((s - max s) / T): with a small temperature s / T itself overflows (inf - inf = NaN),
// while (s - max s) / T is at most 0 and the gates tend to the argmax's one-hot.
template <typename scalar_t>
inline void gate_softmax(const scalar_t* __restrict s, int64_t k, scalar_t inv_t,
                         scalar_t* __restrict g) {
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < k; ++j) mx = std::max(mx, s[j]);
  scalar_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    g[j] = std::exp((s[j] - mx) * inv_t);
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

// sums[c] = Σ_r x[r·ld + c] for c < m: rows outer, so the inner loop runs along a contiguous row.
template <typename scalar_t>
SYMFAST_MULTIVERSION void column_sums(const scalar_t* __restrict x, int64_t rows, int64_t m,
                                      int64_t ld, scalar_t* __restrict sums) {
  std::fill(sums, sums + m, scalar_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * ld;
    for (int64_t c = 0; c < m; ++c) sums[c] += row[c];
  }
}

// Rows are independent; ~32K scores per task amortises the OpenMP fork for small batches.
int64_t row_grain(const Dims& d) { return std::max<int64_t>(1, 32768 / (d.k + d.k * d.c)); }

// Below this many rows per thread the BLAS threads each GEMM instead: MKL keeps ~70 GFLOP/s on
// one core from 32 rows up at F = 512, K + K·C = 816, but each thread packs the whole weight
// matrix for its own GEMM, and the rows must repay that.
constexpr int64_t kMinRowsPerThread = 64;

// Number of row blocks, one per thread, each with its own single-threaded GEMMs; 1 = the BLAS
// threads the GEMMs. The blocks run inside one parallel region, so MKL sees a nested call and
// runs each GEMM on one thread: 3 parallel regions per forward+backward instead of 8, and no
// barrier inside a GEMM. Measured at B = F = 512, K = 16, C = 50, 2 threads, Zen 3 (the raw
// forward and backward ops, medians of batches taken while the machine was otherwise idle):
// 11.4 ms blocked against 11.8-12.3 ms with MKL threading each GEMM (3 x torch.mm: 10.5-10.9);
// with other jobs on the 2 cores (load 4-6): 90 against 230 ms, since every barrier waits
// for a descheduled thread. Every thread gets a block or none does: a split that left threads
// idle would lose to the BLAS.
int64_t row_blocks(int64_t b) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || at::in_parallel_region() || b < threads * kMinRowsPerThread) return 1;
  return threads;
}

// Runs body(begin, end) over [0, n) split into `blocks` near-equal ranges, one parallel task each
// (blocks > 1), or once over the whole range on the calling thread (blocks == 1, so a GEMM in
// body is threaded by the BLAS). The tasks take on the calling thread's thread-local state
// (grad mode off, inference mode, dispatch keys): their at::mm_out calls take inputs that require
// grad and write outputs made under that state.
template <typename Body>
void for_blocks(int64_t n, int64_t blocks, const Body& body) {
  if (blocks <= 1) {
    body(int64_t{0}, n);
    return;
  }
  const at::ThreadLocalState caller;
  Chunks chunks(blocks, 1);
  parallel_team(blocks, [&] {
    at::ThreadLocalStateGuard guard(caller);
    for (int64_t t, first, last; chunks.take(t, first, last);)
      body(n * first / blocks, n * last / blocks);
  });
}

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
  const at::Tensor gate_weight_t = gate_weight_in.to(ct).t();
  const at::Tensor weight_t = weight_in.reshape({d.k * d.c, d.f}).to(ct).t();
  const at::Tensor stacked_bias =
      at::cat({gate_bias_in, bias_in.reshape({d.k * d.c})}, 0).to(ct).contiguous();
  at::Tensor out = at::empty({d.b, d.c}, scores.options());
  if (d.b == 0) return {out.to(h_in.scalar_type()), scores};
  AT_DISPATCH_FLOATING_TYPES(ct, "classifier_select_fwd_cpu", [&] {
    scalar_t* sp = scores.data_ptr<scalar_t>();
    const scalar_t* bp = stacked_bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
    const auto gemm = [&](int64_t r0, int64_t r1) {
      at::Tensor rows = scores.narrow(0, r0, r1 - r0);
      const at::Tensor h_rows = h.narrow(0, r0, r1 - r0);
      at::Tensor gate_block = rows.narrow(1, 0, d.k);
      at::Tensor logit_block = rows.narrow(1, d.k, d.k * d.c);
      at::mm_out(gate_block, h_rows, gate_weight_t);
      at::mm_out(logit_block, h_rows, weight_t);
    };
    const auto mix = [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> g(d.k), acc(d.c);
      for (int64_t r = r0; r < r1; ++r)
        mix_row<scalar_t>(sp + r * n, bp, d, inv_t, g.data(), acc.data(), op + r * d.c);
    };
    const int64_t blocks = row_blocks(d.b);
    if (blocks > 1) {
      for_blocks(d.b, blocks, [&](int64_t r0, int64_t r1) {
        gemm(r0, r1);
        mix(r0, r1);
      });
    } else {
      gemm(0, d.b);
      parallel_chunks(d.b, row_grain(d), [&](int64_t, int64_t r0, int64_t r1) { mix(r0, r1); });
    }
  });
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
  const at::Tensor h = h_in.to(ct);
  const at::Tensor gate_weight = gate_weight_in.to(ct);
  const at::Tensor weight = weight_in.reshape({d.k * d.c, d.f}).to(ct);
  at::Tensor dscores = at::empty({d.b, n}, scores.options());
  // grad h = dscores · [gate_weight; weight], grad [gate_weight; weight] = dscoresᵀ · h and the
  // bias grads are dscores' column sums: one (n, F) GEMM and one column sum over all n score
  // columns, split afterwards. Column slices of dscores are BLAS-strided views (leading dim n).
  at::Tensor grad_h = at::empty({d.b, d.f}, scores.options());
  at::Tensor grad_stacked = at::empty({n, d.f}, scores.options());
  at::Tensor grad_stacked_bias = at::empty({n}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "classifier_select_bwd_cpu", [&] {
    const scalar_t* sp = scores.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* dp = dscores.data_ptr<scalar_t>();
    scalar_t* bp = grad_stacked_bias.data_ptr<scalar_t>();
    const scalar_t inv_t = static_cast<scalar_t>(1.0 / temperature);
    const auto mix = [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> g(d.k), dg(d.k);
      for (int64_t r = r0; r < r1; ++r)
        mix_row_backward<scalar_t>(sp + r * n, gp + r * d.c, d, inv_t, g.data(), dg.data(),
                                   dp + r * n);
    };
    const auto grad_h_rows = [&](int64_t r0, int64_t r1) {
      at::Tensor out_rows = grad_h.narrow(0, r0, r1 - r0);
      const at::Tensor ds_rows = dscores.narrow(0, r0, r1 - r0);
      at::mm_out(out_rows, ds_rows.narrow(1, d.k, d.k * d.c), weight);
      out_rows.addmm_(ds_rows.narrow(1, 0, d.k), gate_weight);
    };
    // Columns [c0, c1) of dscores: their weight-grad rows (a GEMM reducing over the batch) and
    // their bias grads (column sums).
    const auto grad_params_cols = [&](int64_t c0, int64_t c1) {
      at::Tensor grad_rows = grad_stacked.narrow(0, c0, c1 - c0);
      at::mm_out(grad_rows, dscores.narrow(1, c0, c1 - c0).t(), h);
      column_sums<scalar_t>(dp + c0, d.b, c1 - c0, n, bp + c0);
    };
    const int64_t blocks = row_blocks(d.b);
    if (blocks > 1) {
      for_blocks(d.b, blocks, [&](int64_t r0, int64_t r1) {
        mix(r0, r1);
        grad_h_rows(r0, r1);
      });
      for_blocks(n, blocks, grad_params_cols);
    } else {
      parallel_chunks(d.b, row_grain(d), [&](int64_t, int64_t r0, int64_t r1) { mix(r0, r1); });
      grad_h_rows(0, d.b);
      grad_params_cols(0, n);
    }
  });
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
