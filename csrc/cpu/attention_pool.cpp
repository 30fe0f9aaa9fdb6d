// CPU kernels for attention_pool (attention text classifier, Lu, Mao, Nayak, ICLR 2021).
//
// forward:  s_j = q . keys[t_j],  a = softmax_j(s) over the valid positions,
//           pooled[b] = sum_j a_j embedding[t_j]                        (weights a kept in fp32)
// backward: da_j = g_b . embedding[t_j] + gw_bj,  ds_j = a_j (da_j - sum_k a_k da_k)
//           grad_embedding[v] = sum_{(b,j): t_bj = v} a_bj g_b
//           grad_keys[v]      = (sum_{(b,j): t_bj = v} ds_bj) q         (rank one in q)
//           grad_query        = sum_{b,j} ds_bj keys[t_bj]
// The dense gradient tables are written once, row by row, from a CSR list of the positions
// holding each token: every row has one writer, so there are no races and no atomics, and the
// result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "simd.h"
#include "symfast_module.h"

namespace {

struct Shapes {
  int64_t b, l, v, d, dk;
};

// Validates shapes and every token id / length, so no gather below can leave its table.
Shapes check_inputs(const at::Tensor& tokens, const at::Tensor& lengths,
                    const at::Tensor& embedding, const at::Tensor& keys, const at::Tensor& query) {
  TORCH_CHECK(tokens.device().is_cpu() && lengths.device().is_cpu() &&
                  embedding.device().is_cpu() && keys.device().is_cpu() && query.device().is_cpu(),
              "attention_pool cpu kernels need CPU tensors");
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
              "tokens must be int64 (B, L), got ", tokens.scalar_type(), " ", tokens.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == tokens.size(0) &&
                  lengths.scalar_type() == at::kLong,
              "lengths must be int64 (B,) with B = ", tokens.size(0), ", got ", lengths.sizes());
  TORCH_CHECK(embedding.dim() == 2 && keys.dim() == 2 && keys.size(0) == embedding.size(0),
              "embedding (V, d) and keys (V, d_k) must share V, got ", embedding.sizes(), " and ",
              keys.sizes());
  TORCH_CHECK(query.dim() == 1 && query.size(0) == keys.size(1), "query must be (", keys.size(1),
              ",), got ", query.sizes());
  TORCH_CHECK(embedding.scalar_type() == keys.scalar_type() &&
                  keys.scalar_type() == query.scalar_type(),
              "embedding, keys and query must share a dtype");
  Shapes s{tokens.size(0), tokens.size(1), embedding.size(0), embedding.size(1), keys.size(1)};
  // The Python op leaves these value checks to the kernel (one pass here instead of four torch
  // reductions there): the same exception types (IndexError, ValueError) and messages.
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t n = tokens.numel();
  if (n > 0) {
    int64_t lo = tp[0], hi = tp[0];
    for (int64_t i = 0; i < n; ++i) lo = std::min(lo, tp[i]), hi = std::max(hi, tp[i]);
    TORCH_CHECK_INDEX(lo >= 0 && hi < s.v, "tokens holds ids in [", lo, ", ", hi,
                      "], outside the vocabulary [0, ", s.v, ")");
  }
  const int64_t* lp = lengths.data_ptr<int64_t>();
  if (s.b > 0) {
    const auto [lo, hi] = std::minmax_element(lp, lp + s.b);
    TORCH_CHECK_VALUE(*lo >= 1 && *hi <= s.l, "lengths must lie in [1, L = ", s.l,
                      "], got values in [", *lo, ", ", *hi, "]");
  }
  return s;
}

// 16 independent partial sums: a single running sum cannot be vectorised (fp addition is not
// reassociated without -ffast-math), and its 4-cycle add latency per element made the score
// loops compute-bound. Measured (CPU time, 1 thread, B=256 L=64 V=50k d=128 d_k=64, medians):
// forward 4.24 -> 2.81 ms; backward score gradients + grad_query alone 4.48 -> 3.55 ms.
template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION acc_t dot_row(const scalar_t* __restrict x, const acc_t* __restrict y,
                                   int64_t n) {
  constexpr int64_t W = 16;
  acc_t part[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int64_t k = 0; k < W; ++k) part[k] += static_cast<acc_t>(x[i + k]) * y[i + k];
  for (int64_t k = 0; i < n; ++i, ++k) part[k] += static_cast<acc_t>(x[i]) * y[i];
  for (int64_t w = W / 2; w > 0; w /= 2)
    for (int64_t k = 0; k < w; ++k) part[k] += part[k + w];
  return part[0];
}

// Brings a table row towards L1 ahead of its use: the gathers are random rows of tables far
// larger than the caches, so without it each row's miss latency is paid in turn. Measured as
// above: forward 2.81 -> 2.00 ms; score gradients + grad_query 3.55 -> 2.08 ms.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION void axpy_row(acc_t a, const scalar_t* __restrict x, acc_t* __restrict y,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
}

// Table rows are written with non-temporal (streaming) stores when the tables exceed the caches:
// a plain store first reads the line it fills (read-for-ownership), so writing the 38 MB of
// dense gradient tables moved 76 MB. Rows that are not 16-byte aligned fall back to plain stores.
// Measured as above: the whole backward 6.48 -> 4.83 ms.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SYMFAST_BASELINE_ISA)
// 32-byte streaming stores: on Zen 3 a core issues about one streaming store per 3 cycles
// whatever its width, so 16-byte ones cap a core at ~18 GB/s (measured: 38 MB zeroed in 2.1 ms
// with 16-byte stores, 1.05 ms with 32-byte ones, one thread).
__attribute__((target("avx2"))) void stream_row_avx2(float* __restrict dst,
                                                     const float* __restrict src, int64_t n) {
  int64_t i = 0;
  if (src) {
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
  } else {
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_setzero_ps());
    for (; i < n; ++i) dst[i] = 0.f;
  }
}
#endif

// dst[:n] = src[:n] (zeros for a null src), streamed when `stream`.
inline void stream_row(float* __restrict dst, const float* __restrict src, int64_t n, bool stream) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SYMFAST_BASELINE_ISA)
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && cpu_has_avx2_fma()) {
    stream_row_avx2(dst, src, n);
    return;
  }
#endif
#if defined(__SSE2__)
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, src ? _mm_loadu_ps(src + i) : _mm_setzero_ps());
    for (; i < n; ++i) dst[i] = src ? src[i] : 0.f;
    return;
  }
#endif
  if (src) std::copy(src, src + n, dst);
  else std::fill(dst, dst + n, 0.f);
}

inline void put_row(float* __restrict dst, const float* __restrict src, int64_t n, bool stream) {
  stream_row(dst, src, n, stream);
}

inline void zero_row(float* dst, int64_t n, bool stream) { stream_row(dst, nullptr, n, stream); }

template <typename scalar_t, typename acc_t>
inline void put_row(scalar_t* dst, const acc_t* src, int64_t n, bool /*stream*/) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <typename scalar_t>
inline void zero_row(scalar_t* dst, int64_t n, bool /*stream*/) {
  std::fill(dst, dst + n, scalar_t(0));
}

// Output tables larger than this are written with streaming stores (the L2 is 1 MB per core).
constexpr int64_t kStreamBytes = 4 << 20;

// How many positions ahead the gathers prefetch their rows.
constexpr int64_t kAhead = 4;

// Sentences per chunk handed to a thread (parallel_chunks).
constexpr int64_t kSentencesPerChunk = 8;

// Raw pointers into the (contiguous) inputs, and the query in the accumulation type.
template <typename scalar_t, typename acc_t>
struct Views {
  const int64_t* tp;
  const int64_t* lp;
  const scalar_t* ep;
  const scalar_t* kp;
  std::vector<acc_t> q;
  Views(const at::Tensor& tokens, const at::Tensor& lengths, const at::Tensor& embedding,
        const at::Tensor& keys, const at::Tensor& query)
      : tp(tokens.data_ptr<int64_t>()),
        lp(lengths.data_ptr<int64_t>()),
        ep(embedding.data_ptr<scalar_t>()),
        kp(keys.data_ptr<scalar_t>()),
        q(query.data_ptr<scalar_t>(), query.data_ptr<scalar_t>() + query.numel()) {}
};

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& tokens_in,
                                                          const at::Tensor& lengths_in,
                                                          const at::Tensor& embedding_in,
                                                          const at::Tensor& keys_in,
                                                          const at::Tensor& query_in,
                                                          bool mask_padding) {
  const at::Tensor tokens = tokens_in.contiguous(), lengths = lengths_in.contiguous();
  const at::Tensor embedding = embedding_in.contiguous(), keys = keys_in.contiguous();
  const at::Tensor query = query_in.contiguous();
  const Shapes s = check_inputs(tokens, lengths, embedding, keys, query);
  const auto acc_type = embedding.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor pooled = at::empty({s.b, s.d}, embedding.options());
  at::Tensor weights = at::empty({s.b, s.l}, embedding.options().dtype(acc_type));
  if (s.b == 0) return {pooled, weights};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(),
                                  "attention_pool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t, acc_t> in(tokens, lengths, embedding, keys, query);
    const int64_t *tp = in.tp, *lp = in.lp;
    const scalar_t *ep = in.ep, *kp = in.kp;
    const std::vector<acc_t>& q = in.q;
    scalar_t* pp = pooled.data_ptr<scalar_t>();
    acc_t* wp = weights.data_ptr<acc_t>();
    // One sentence gathers L*(d + d_k) values; chunks of 8 sentences amortise the hand-out.
    parallel_chunks(s.b, kSentencesPerChunk, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<acc_t> acc(s.d);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = mask_padding ? lp[b] : s.l;
        const int64_t* tok = tp + b * s.l;
        acc_t* a = wp + b * s.l;
        acc_t top = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < std::min<int64_t>(n, kAhead); ++j) prefetch_row(kp + tok[j] * s.dk, s.dk);
        for (int64_t j = 0; j < n; ++j) {
          if (j + kAhead < n) prefetch_row(kp + tok[j + kAhead] * s.dk, s.dk);
          prefetch_row(ep + tok[j] * s.d, s.d);  // needed by the pooling loop below
          a[j] = dot_row<scalar_t, acc_t>(kp + tok[j] * s.dk, q.data(), s.dk);
          top = std::max(top, a[j]);
        }
        acc_t total = 0;
        for (int64_t j = 0; j < n; ++j) total += (a[j] = std::exp(a[j] - top));
        const acc_t inv = acc_t(1) / total;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < n; ++j) {
          a[j] *= inv;
          axpy_row<scalar_t, acc_t>(a[j], ep + tok[j] * s.d, acc.data(), s.d);
        }
        for (int64_t j = n; j < s.l; ++j) a[j] = 0;
        scalar_t* out = pp + b * s.d;
        for (int64_t i = 0; i < s.d; ++i) out[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return {pooled, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd_cpu(
    const at::Tensor& grad_pooled_in, const c10::optional<at::Tensor>& grad_weights_in,
    const at::Tensor& tokens_in, const at::Tensor& lengths_in, const at::Tensor& embedding_in,
    const at::Tensor& keys_in, const at::Tensor& query_in, const at::Tensor& weights_in,
    bool mask_padding, bool need_embedding, bool need_keys, bool need_query) {
  const at::Tensor tokens = tokens_in.contiguous(), lengths = lengths_in.contiguous();
  const at::Tensor embedding = embedding_in.contiguous(), keys = keys_in.contiguous();
  const at::Tensor query = query_in.contiguous();
  const Shapes s = check_inputs(tokens, lengths, embedding, keys, query);
  const auto acc_type = embedding.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_pooled_in.sizes() == at::IntArrayRef({s.b, s.d}), "grad_pooled must be (", s.b,
              ", ", s.d, "), got ", grad_pooled_in.sizes());
  TORCH_CHECK(weights_in.sizes() == at::IntArrayRef({s.b, s.l}) &&
                  weights_in.scalar_type() == acc_type,
              "weights must be (", s.b, ", ", s.l, ") ", acc_type);
  const at::Tensor grad_pooled = grad_pooled_in.to(acc_type).contiguous();
  const at::Tensor weights = weights_in.contiguous();
  at::Tensor grad_weights;
  if (grad_weights_in.has_value() && grad_weights_in->defined()) {
    TORCH_CHECK(grad_weights_in->sizes() == weights.sizes(), "grad_weights must be (", s.b, ", ",
                s.l, "), got ", grad_weights_in->sizes());
    grad_weights = grad_weights_in->to(acc_type).contiguous();
  }
  const auto opts = embedding.options();
  at::Tensor grad_embedding = at::empty({need_embedding ? s.v : 0, s.d}, opts);
  at::Tensor grad_keys = at::empty({need_keys ? s.v : 0, s.dk}, opts);
  at::Tensor grad_query = at::empty({need_query ? s.dk : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embedding.scalar_type(),
                                  "attention_pool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Views<scalar_t, acc_t> in(tokens, lengths, embedding, keys, query);
    const int64_t *tp = in.tp, *lp = in.lp;
    const scalar_t *ep = in.ep, *kp = in.kp;
    const std::vector<acc_t>& q = in.q;
    const acc_t* gp = grad_pooled.data_ptr<acc_t>();
    const acc_t* gwp = grad_weights.defined() ? grad_weights.data_ptr<acc_t>() : nullptr;
    const acc_t* wp = weights.data_ptr<acc_t>();
    const int64_t positions = s.b * s.l;

    // 1. One team region: the CSR of the valid positions by token id (a counting sort, O(V +
    //    B*L), one task) beside the score gradients of sentence chunks, with grad_query from
    //    per-chunk partials summed in chunk order (the same bits whichever thread took a chunk).
    //    The serial CSR hides behind the other thread's score chunks (measured, 2 threads: the
    //    region 0.86 ms, against 0.89 ms of scores then 0.22 ms of CSR one after the other).
    const bool scores = need_keys || need_query;
    const bool tables = need_embedding || need_keys;
    std::vector<acc_t> ds(scores ? positions : 0, acc_t(0));
    const int64_t chunks = scores ? (s.b + kSentencesPerChunk - 1) / kSentencesPerChunk : 0;
    std::vector<acc_t> query_partials(need_query ? chunks * s.dk : 0, acc_t(0));
    // after the fill, the positions of token v are order[ends[v - 1] .. ends[v]) (from 0 for v 0)
    std::vector<int64_t> ends(tables ? s.v : 0, 0);
    std::vector<int64_t> order;
    auto build_csr = [&] {
      for (int64_t b = 0; b < s.b; ++b) {
        const int64_t n = mask_padding ? lp[b] : s.l;
        for (int64_t j = 0; j < n; ++j) ++ends[tp[b * s.l + j]];
      }
      int64_t start = 0;  // ends[v] becomes the start of v's positions, then its end in the fill
      for (int64_t v = 0; v < s.v; ++v) std::swap(start, ends[v]), start += ends[v];
      order.resize(start);
      for (int64_t b = 0; b < s.b; ++b) {
        const int64_t n = mask_padding ? lp[b] : s.l;
        for (int64_t j = 0; j < n; ++j) order[ends[tp[b * s.l + j]]++] = b * s.l + j;
      }
    };
    auto score_chunk = [&](int64_t chunk) {
      const int64_t begin = chunk * kSentencesPerChunk;
      const int64_t end = std::min(s.b, begin + kSentencesPerChunk);
      acc_t* gq = need_query ? query_partials.data() + chunk * s.dk : nullptr;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = mask_padding ? lp[b] : s.l;
        const int64_t* tok = tp + b * s.l;
        const acc_t* a = wp + b * s.l;
        acc_t* dsb = ds.data() + b * s.l;
        acc_t mean = 0;
        for (int64_t j = 0; j < std::min<int64_t>(n, kAhead); ++j) {
          prefetch_row(ep + tok[j] * s.d, s.d);
          if (gq) prefetch_row(kp + tok[j] * s.dk, s.dk);
        }
        for (int64_t j = 0; j < n; ++j) {
          if (j + kAhead < n) {
            prefetch_row(ep + tok[j + kAhead] * s.d, s.d);
            if (gq) prefetch_row(kp + tok[j + kAhead] * s.dk, s.dk);
          }
          dsb[j] = dot_row<scalar_t, acc_t>(ep + tok[j] * s.d, gp + b * s.d, s.d) +
                   (gwp ? gwp[b * s.l + j] : acc_t(0));
          mean += a[j] * dsb[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          dsb[j] = a[j] * (dsb[j] - mean);
          if (gq) axpy_row<scalar_t, acc_t>(dsb[j], kp + tok[j] * s.dk, gq, s.dk);
        }
      }
    };
    const int64_t first = tables ? -1 : 0;  // task -1: the CSR
    Chunks tasks(chunks - first, 1);
    parallel_team(tasks.count(), [&] {
      for (int64_t task; tasks.take(task);) {
        if (task + first < 0) build_csr();
        else score_chunk(task + first);
      }
    });
    if (need_query) {
      scalar_t* out = grad_query.data_ptr<scalar_t>();
      for (int64_t i = 0; i < s.dk; ++i) {
        acc_t sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += query_partials[c * s.dk + i];
        out[i] = static_cast<scalar_t>(sum);
      }
    }
    if (!tables) return;

    // 2. Every table row written exactly once (zeros for tokens absent from the batch).
    scalar_t* gep = need_embedding ? grad_embedding.data_ptr<scalar_t>() : nullptr;
    scalar_t* gkp = need_keys ? grad_keys.data_ptr<scalar_t>() : nullptr;
    const bool stream = s.v * (s.d + s.dk) * static_cast<int64_t>(sizeof(scalar_t)) > kStreamBytes;
    parallel_chunks(s.v, 512, [&](int64_t, int64_t begin, int64_t end) {
      std::vector<acc_t> acc(std::max(s.d, s.dk));
      for (int64_t v = begin; v < end; ++v) {
        const int64_t lo = v ? ends[v - 1] : 0, hi = ends[v];
        if (gep) {
          scalar_t* row = gep + v * s.d;
          if (lo == hi) {
            zero_row(row, s.d, stream);
          } else {
            std::fill(acc.begin(), acc.begin() + s.d, acc_t(0));
            for (int64_t p = lo; p < hi; ++p)
              axpy_row<acc_t, acc_t>(wp[order[p]], gp + (order[p] / s.l) * s.d, acc.data(), s.d);
            put_row(row, acc.data(), s.d, stream);
          }
        }
        if (gkp) {
          scalar_t* row = gkp + v * s.dk;
          if (lo == hi) {
            zero_row(row, s.dk, stream);
          } else {
            acc_t total = 0;
            for (int64_t p = lo; p < hi; ++p) total += ds[order[p]];
            for (int64_t i = 0; i < s.dk; ++i) acc[i] = total * q[i];
            put_row(row, acc.data(), s.dk, stream);
          }
        }
      }
      symfast::stream_fence();
    });
  });
  return {grad_embedding, grad_keys, grad_query};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def(
      "attention_pool_fwd_cpu(Tensor tokens, Tensor lengths, Tensor embedding, Tensor keys, "
      "Tensor query, bool mask_padding) -> (Tensor, Tensor)");
  m.def(
      "attention_pool_bwd_cpu(Tensor grad_pooled, Tensor? grad_weights, Tensor tokens, "
      "Tensor lengths, Tensor embedding, Tensor keys, Tensor query, Tensor weights, "
      "bool mask_padding, bool need_embedding, bool need_keys, bool need_query) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("attention_pool_fwd_cpu", &attention_pool_fwd_cpu);
  m.impl("attention_pool_bwd_cpu", &attention_pool_bwd_cpu);
}

SYMFAST_PY_MODULE()
