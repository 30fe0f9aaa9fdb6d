// CPU kernels for orbit / orbit_mean: signed gathers through a group's index table.
//
// table: (G, N) int32; entry t of row k encodes (g_k x)[i] = +x[t] if t >= 0, -x[~t] if t < 0.
// orbit:      x (M, N)    -> out (G, M, N),  out[k, m, i] = g_k(x[m])[i]
// orbit_mean: y (G, M, N) -> out (M, N),     out[m, i] = 1/G sum_k g_k^-1(y[k, m])[i]
//             (called with the inverse table, so row k gathers g_k^-1)
//
// The planning (vectorised runs, one transpose per plane) lives in orbit_plan.h, shared with
// the fused sampler step; orbit's copy loops are here.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "orbit_plan.h"
#include "symfast_module.h"

namespace {

using namespace symfast;

// ---- orbit ---------------------------------------------------------------------------------
//
// The orbit writes |G| times what it reads, so its speed is the speed of its stores. A plain store
// first reads the line it fills (read-for-ownership): an orbit of |G| = 8 with plain stores moves
// x + 2·8·x bytes through memory for the x + 8·x it must, where a copy moves 3 bytes per 2 counted:
// a ceiling of ~79% of copy bandwidth, and 62-69% measured (D4 at (64,3,64,64) and
// (16,4,128,128), 2 threads, Zen 3). Outputs beyond the caches are therefore written with
// non-temporal (streaming) stores, which skip that read. Into a reused buffer
// (benchmarks/bench_group_average.py, "symfast cpu (out=)"), D4 took 1.2-1.6 ms at (64,3,64,64)
// against 2.2 ms with plain stores, and 1.9-2.5 ms at (16,4,128,128) against 3.1 ms: 100-153% of
// the copy bandwidth, which torch's copy measures with plain stores. Each output line is written
// whole:
//  - kRuns rows (identity, flips, rot180, sign flips, cyclic shifts): each output row is one
//    ascending stream of 16-byte stores, a reversed source row reversed in register;
//  - kTransposed rows (rot90, rot270, the diagonal reflections): 8 x 16 tiles, two 8x8 register
//    transposes whose 8 output rows of 64 bytes are each stored at once (with 8 x 8 tiles a line
//    would wait half-written in a write-combining buffer for the next tile).
// The streaming path is fp32's (the dtype of the benchmarks and samplers); fp32 outputs that are
// small or not 16-byte aligned take the same loops with plain stores, other dtypes plain loops.

// 8 floats with two 16-byte non-temporal stores (SSE, in every x86-64 clone); p 16-byte aligned.
__attribute__((always_inline)) inline void stream8(float* p, v8f v) {
#if defined(__SSE2__)
  __m128 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  _mm_stream_ps(p, lo);
  _mm_stream_ps(p + 4, hi);
#else
  store8(p, v);
#endif
}

template <bool kStream>
__attribute__((always_inline)) inline void put8(float* p, v8f v) {
  if constexpr (kStream) stream8(p, v);
  else store8(p, v);
}

// d[j] = sign * s[step * j] for j < len, step = +1 or -1 (a reversed row read from its low end,
// its chunks reversed in register). Streaming stores start at the first 16-byte boundary of d.
template <bool kStream>
__attribute__((always_inline)) inline void copy_row_f32(const float* __restrict s, int64_t step,
                                                        float sign, float* __restrict d,
                                                        int64_t len) {
  int64_t j = 0;
  if constexpr (kStream)
    for (; j < len && (reinterpret_cast<uintptr_t>(d + j) & 15) != 0; ++j) d[j] = sign * s[step * j];
  if (step == 1) {
    for (; j + 8 <= len; j += 8) put8<kStream>(d + j, sign * load8(s + j));
  } else {
    for (; j + 8 <= len; j += 8) put8<kStream>(d + j, sign * reverse8(load8(s - j - 7)));
  }
  for (; j < len; ++j) d[j] = sign * s[step * j];
}

template <bool kStream>
__attribute__((always_inline)) inline void copy_blocks_f32(const float* __restrict src,
                                                           const std::vector<Block>& blocks,
                                                           float* __restrict dst) {
  for (const Block& b : blocks) {
    const float sign = b.neg ? -1.f : 1.f;
    if (b.step != 1 && b.step != -1) {  // single-element runs merged into a strided block
      for (int64_t r = 0; r < b.rows; ++r)
        for (int64_t j = 0; j < b.len; ++j)
          dst[b.dst + r * b.len + j] = sign * src[b.src + r * b.src_row_stride + b.step * j];
      continue;
    }
    for (int64_t r = 0; r < b.rows; ++r)
      copy_row_f32<kStream>(src + b.src + r * b.src_row_stride, b.step, sign,
                            dst + b.dst + r * b.len, b.len);
  }
}

// The 8x8 tile of block b (a row-preserving map on a p x p plane) whose transpose lands at output
// rows i0.., columns j0..: r[k] = output row i0 + k, columns j0..j0+7.
__attribute__((always_inline)) inline void transposed_tile8(const float* base, const Block& b,
                                                            int64_t i0, int64_t j0, v8f* r) {
  for (int k = 0; k < 8; ++k) {
    const float* row = base + (j0 + k) * b.src_row_stride;
    r[k] = b.step == 1 ? load8(row + i0) : reverse8(load8(row - i0 - 7));
  }
  transpose8(r);
}

// dst (p x p) = sign * the transpose of block b (p rows of p, a row-preserving map) read straight
// from src: dst[i*p + j] = sign * src[b.src + j*b.src_row_stride + b.step*i]. 8 x 16 register
// tiles, then 8 x 8, then the ragged edge element by element (the strided side defeats the
// vectoriser, and copying the block out to transpose the copy cost a second pass per element).
// With kStream, dst and p·4 bytes are multiples of 16, so every tile store is aligned.
template <bool kStream>
__attribute__((always_inline)) inline void copy_transposed_f32(const float* __restrict src,
                                                               const Block& b,
                                                               float* __restrict dst, int64_t p) {
  const float* base = src + b.src;
  const float sign = b.neg ? -1.f : 1.f;
  const int64_t p8 = p - p % 8;
  for (int64_t i0 = 0; i0 < p8; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 16 <= p8; j0 += 16) {
      v8f lo[8], hi[8];
      transposed_tile8(base, b, i0, j0, lo);
      transposed_tile8(base, b, i0, j0 + 8, hi);
      for (int k = 0; k < 8; ++k) {
        float* d = dst + (i0 + k) * p + j0;
        put8<kStream>(d, sign * lo[k]);
        put8<kStream>(d + 8, sign * hi[k]);
      }
    }
    for (; j0 < p8; j0 += 8) {
      v8f r[8];
      transposed_tile8(base, b, i0, j0, r);
      for (int k = 0; k < 8; ++k) put8<kStream>(dst + (i0 + k) * p + j0, sign * r[k]);
    }
  }
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = i < p8 ? p8 : 0; j < p; ++j)
      dst[i * p + j] = sign * base[j * b.src_row_stride + b.step * i];
}

// The loops of the other dtypes (plain stores): a run of a kRuns row, and the transpose of a
// kTransposed row's block element by element, dst[i*p + j] = sign * src[b.src +
// j*b.src_row_stride + b.step*i].
template <typename scalar_t>
inline void copy_blocks(const scalar_t* __restrict src, const std::vector<Block>& blocks,
                        scalar_t* __restrict dst) {
  for (const Block& b : blocks) {
    const int64_t len = b.len, step = b.step;
    for (int64_t r = 0; r < b.rows; ++r) {
      scalar_t* __restrict d = dst + b.dst + r * len;
      const scalar_t* __restrict s = src + b.src + r * b.src_row_stride;
      if (step == 1) {
        if (b.neg) for (int64_t j = 0; j < len; ++j) d[j] = -s[j];
        else for (int64_t j = 0; j < len; ++j) d[j] = s[j];
      } else if (step == -1) {
        if (b.neg) for (int64_t j = 0; j < len; ++j) d[j] = -s[-j];
        else for (int64_t j = 0; j < len; ++j) d[j] = s[-j];
      } else {
        for (int64_t j = 0; j < len; ++j) d[j] = b.neg ? -s[step * j] : s[step * j];
      }
    }
  }
}

template <typename T>
inline void copy_transposed(const T* __restrict src, const Block& b, T* __restrict dst, int64_t p) {
  const T* base = src + b.src;
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < p; ++j) {
      const T v = base[j * b.src_row_stride + b.step * i];
      dst[i * p + j] = b.neg ? -v : v;
    }
}

// Task index r = (source row, element): each source row is read from cache for all G elements
// instead of once per element from wherever it was evicted to. Multi-versioned as a whole so the
// helpers inline into its AVX2 clone.
template <typename scalar_t, bool kStream>
SYMFAST_MULTIVERSION void orbit_rows(const scalar_t* xp, const int32_t* tp, scalar_t* op,
                                     const Plan& plan, int64_t m, int64_t n, int64_t begin,
                                     int64_t end) {
  const int64_t g = static_cast<int64_t>(plan.rows.size());
  for (int64_t r = begin; r < end; ++r) {
    const int64_t k = r % g, row = r / g;
    const scalar_t* src = xp + row * n;
    scalar_t* dst = op + (k * m + row) * n;
    const RowPlan& rp = plan.rows[k];
    if (rp.kind == Kind::kRuns) {
      if constexpr (std::is_same_v<scalar_t, float>) copy_blocks_f32<kStream>(src, rp.blocks, dst);
      else copy_blocks<scalar_t>(src, rp.blocks, dst);
    } else if (rp.kind == Kind::kTransposed) {
      const int64_t p = plan.square_side;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (p % 4 == 0) copy_transposed_f32<kStream>(src, rp.blocks[0], dst, p);
        else copy_transposed_f32<false>(src, rp.blocks[0], dst, p);  // rows not 16-byte aligned
      } else {
        copy_transposed<scalar_t>(src, rp.blocks[0], dst, p);
      }
    } else {
      const int32_t* idx = tp + k * n;
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t v = src[decode(idx[i])];
        dst[i] = idx[i] < 0 ? -v : v;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void orbit_mean_rows(const scalar_t* yp, const int32_t* tp, scalar_t* op, const Plan& plan,
                     int64_t g, int64_t m, int64_t n, int64_t begin, int64_t end) {
  const acc_t scale = acc_t(1) / static_cast<acc_t>(g);
  // fp32 sums straight into the output row; other dtypes through an accumulator row.
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  std::vector<acc_t> acc(kDirect ? 0 : n), transposed(plan.square_side ? n : 0);
  for (int64_t row = begin; row < end; ++row) {
    scalar_t* dst = op + row * n;
    if constexpr (kDirect) {
      orbit_sum_row<scalar_t, acc_t>(yp, tp, plan, g, m, n, row, scale, dst, transposed.data());
    } else {
      orbit_sum_row<scalar_t, acc_t>(yp, tp, plan, g, m, n, row, scale, acc.data(),
                                     transposed.data());
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// Outputs from this size on are written with streaming stores: far beyond the L2 (512 KB-1 MB a
// core), what the op writes reaches memory before its reader comes. Measured at C4 (64,3,64,64),
// a 12.6 MB output that fits the 32 MB L3: 1.2 ms streamed against 1.6 ms with plain stores when
// the caches were flushed between calls; repeated back to back, where plain stores find their
// lines still in the L3, 0.54 against 0.43 ms (both above the copy bandwidth).
constexpr int64_t kStreamBytes = 4 << 20;

void orbit_into(const at::Tensor& x_in, const at::Tensor& table_in, const at::Tensor& out) {
  TORCH_CHECK(x_in.device().is_cpu() && table_in.device().is_cpu() && out.device().is_cpu(),
              "orbit_cpu needs CPU tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, N), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const std::shared_ptr<const Plan> plan_owner = cached_plan(table, n);
  const Plan& plan = *plan_owner;
  const int64_t g = table.size(0);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out has dtype ", out.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(out.is_contiguous() && out.numel() == g * m * n, "out must be contiguous with G·M·N = ",
              g * m * n, " elements, got shape ", out.sizes(), " strides ", out.strides());
  if (m == 0 || n == 0) return;
  at::assert_no_overlap(out, x);
  const bool stream = x.scalar_type() == at::kFloat &&
                      out.nbytes() >= static_cast<size_t>(kStreamBytes) &&
                      reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                      (n * static_cast<int64_t>(out.element_size())) % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "orbit_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // (k, m) output rows are independent; chunks of ~16K elements amortise the hand-out.
    const int64_t grain = std::max<int64_t>(1, 16384 / n);
    parallel_chunks(g * m, grain, [&](int64_t, int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (stream) {
          orbit_rows<scalar_t, true>(xp, tp, op, plan, m, n, begin, end);
          stream_fence();  // this chunk's streaming stores land before the region's barrier
          return;
        }
      }
      orbit_rows<scalar_t, false>(xp, tp, op, plan, m, n, begin, end);
    });
  });
}

at::Tensor orbit_cpu(const at::Tensor& x, const at::Tensor& table) {
  TORCH_CHECK(x.dim() == 2, "x must be (M, N), got ", x.sizes());
  at::Tensor out = at::empty({table.size(0), x.size(0), x.size(1)}, x.options());
  orbit_into(x, table, out);
  return out;
}

void orbit_out_cpu(const at::Tensor& x, const at::Tensor& table, const at::Tensor& out) {
  orbit_into(x, table, out);
}

at::Tensor orbit_mean_cpu(const at::Tensor& y_in, const at::Tensor& inverse_table_in) {
  TORCH_CHECK(y_in.device().is_cpu() && inverse_table_in.device().is_cpu(),
              "orbit_mean_cpu needs CPU tensors");
  TORCH_CHECK(y_in.dim() == 3, "y must be (G, M, N), got ", y_in.sizes());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor table = inverse_table_in.contiguous();
  const int64_t g = y.size(0), m = y.size(1), n = y.size(2);
  const std::shared_ptr<const Plan> plan_owner = cached_plan(table, n);
  const Plan& plan = *plan_owner;
  TORCH_CHECK(table.size(0) == g, "table has ", table.size(0), " rows but y has G = ", g);
  at::Tensor out = at::empty({m, n}, y.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "orbit_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (n * g));
    parallel_chunks(m, grain, [&](int64_t, int64_t begin, int64_t end) {
      orbit_mean_rows<scalar_t, acc_t>(yp, tp, op, plan, g, m, n, begin, end);
    });
  });
  return out;
}

// parallel_team's busy-machine record is one per process (symfast_module.h), shared by every
// module; this one, which sampling loads first, reads and sets it.
std::vector<int64_t> cpu_team_record() {
  const team_detail::Record& r = team_detail::record();
  const int64_t left = r.solo_until_ns.load() - team_detail::clock_ns(CLOCK_MONOTONIC);
  return {r.team_regions.load(), r.busy_regions.load(), r.solo_regions.load(), r.backoff_ns.load(),
          std::max<int64_t>(0, left)};
}

// Regions run on the calling thread alone for the next `ms` milliseconds, as if the machine had
// been found busy (0: teams again from now on); the back-off starts again from zero.
void cpu_team_solo_for(int64_t ms) {
  TORCH_CHECK(ms >= 0, "ms must be >= 0, got ", ms);
  team_detail::Record& r = team_detail::record();
  r.backoff_ns.store(0);
  r.busy_in_a_row.store(0);
  r.solo_until_ns.store(ms > 0 ? team_detail::clock_ns(CLOCK_MONOTONIC) + ms * 1'000'000 : 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def("cpu_team_record() -> int[]", &cpu_team_record);
  m.def("cpu_team_solo_for(int ms) -> ()", &cpu_team_solo_for);
  m.def("orbit_cpu(Tensor x, Tensor table) -> Tensor");
  m.def("orbit_out_cpu(Tensor x, Tensor table, Tensor(a!) out) -> ()");
  m.def("orbit_mean_cpu(Tensor y, Tensor inverse_table) -> Tensor");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("orbit_cpu", &orbit_cpu);
  m.impl("orbit_out_cpu", &orbit_out_cpu);
  m.impl("orbit_mean_cpu", &orbit_mean_cpu);
}

SYMFAST_PY_MODULE()
