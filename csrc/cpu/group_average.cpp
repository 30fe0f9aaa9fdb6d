// CPU kernels for orbit / orbit_mean: signed gathers through a group's index table.
//
// table: (G, N) int32; entry t of row k encodes (g_k x)[i] = +x[t] if t >= 0, -x[~t] if t < 0.
// orbit:      x (M, N)    -> out (G, M, N),  out[k, m, i] = g_k(x[m])[i]
// orbit_mean: y (G, M, N) -> out (M, N),     out[m, i] = 1/G sum_k g_k^-1(y[k, m])[i]
//             (called with the inverse table, so row k gathers g_k^-1)
//
// Why not one plain gather loop: an element-wise gather through the table ran at ~1.7 G
// elements/s on the 2-core machine (orbit_mean, D4, (64,3,64,64): 3.6 ms against a 1.3 ms memory
// floor). The tables of the groups people use are made of long arithmetic runs, so each row is
// planned once per call:
//  - RUNS: dst is cut into runs whose sources step by +1 or -1 (identity, flips, rot180, cyclic
//    shifts, channel permutations): contiguous or reversed loops that vectorise.
//  - TRANSPOSED: on a square P x P plane, rows that swap the axes (rot90, rot270, the diagonal
//    reflections) are a transpose of a row-preserving map h: g x = T(h x). orbit_mean sums the h
//    parts of all such elements into a second buffer and transposes it once per plane, instead of
//    doing a strided walk per element.
//  - GATHER: anything else, element by element.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "symfast_module.h"

namespace {

inline int64_t decode(int32_t t) { return t < 0 ? ~static_cast<int64_t>(t) : t; }

struct Run {
  int64_t dst, src, len, step;  // dst[dst + j] <- sign * src[src + step * j], j < len
  bool neg;
};

// `rows` consecutive runs of equal length, step and sign whose sources start `src_row_stride`
// apart: one 2D loop instead of a call per run (a D4 row is then 1 block, not 64 runs).
struct Block {
  int64_t dst, src, rows, len, src_row_stride, step;
  bool neg;
};

std::vector<Block> merge_runs(const std::vector<Run>& runs) {
  std::vector<Block> blocks;
  for (const Run& r : runs) {
    if (!blocks.empty()) {
      Block& b = blocks.back();
      const bool same_shape = r.len == b.len && r.step == b.step && r.neg == b.neg;
      if (same_shape && (b.rows == 1 || r.src - b.src == b.rows * b.src_row_stride)) {
        if (b.rows == 1) b.src_row_stride = r.src - b.src;
        ++b.rows;
        continue;
      }
    }
    blocks.push_back({r.dst, r.src, 1, r.len, 0, r.step, r.neg});
  }
  return blocks;
}

enum class Kind { kRuns, kTransposed, kGather };

struct RowPlan {
  Kind kind;
  std::vector<Block> blocks;  // kRuns: the row itself; kTransposed: the row-preserving h
};

// Runs of constant step and sign; a long row of short runs is cheaper as a gather.
std::vector<Run> decompose(const int32_t* t, int64_t n) {
  std::vector<Run> runs;
  int64_t i = 0;
  while (i < n) {
    Run r{i, decode(t[i]), 1, 1, t[i] < 0};
    if (i + 1 < n && (t[i + 1] < 0) == r.neg) r.step = decode(t[i + 1]) - r.src;
    while (i + r.len < n && (t[i + r.len] < 0) == r.neg &&
           decode(t[i + r.len]) == r.src + r.step * r.len)
      ++r.len;
    runs.push_back(r);
    i += r.len;
  }
  return runs;
}

bool unit_step_runs(const std::vector<Run>& runs, int64_t n) {
  if (static_cast<int64_t>(runs.size()) * 8 > n) return false;
  for (const Run& r : runs)
    if (r.len > 1 && r.step != 1 && r.step != -1) return false;
  return true;
}

// Is row t = T(h) on a p x p plane with h row-preserving: t[i*p + j] = s * x[o + a*i + b*j],
// |a| = 1, |b| = p? Then h[j*p + i] = t[i*p + j] has runs (per j) of step a.
bool transposed_plan(const int32_t* t, int64_t p, std::vector<Run>& runs) {
  if (p < 2) return false;
  const bool neg = t[0] < 0;
  const int64_t o = decode(t[0]), a = decode(t[p]) - o, b = decode(t[1]) - o;
  if ((a != 1 && a != -1) || (b != p && b != -p)) return false;
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < p; ++j) {
      const int32_t v = t[i * p + j];
      if ((v < 0) != neg || decode(v) != o + a * i + b * j) return false;
    }
  runs.clear();
  for (int64_t j = 0; j < p; ++j) runs.push_back({j * p, o + b * j, p, a, neg});
  return true;
}

struct Plan {
  std::vector<RowPlan> rows;
  int64_t square_side = 0;  // p if any row is kTransposed
};

// Validates the table (every index in [0, N): the loops below never read out of bounds) and
// plans each row. The table is small (G x N) and read once per call.
Plan make_plan(const at::Tensor& table, int64_t n) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == n,
              "table must have shape (G, ", n, "), got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kInt, "table must be int32, got ", table.scalar_type());
  TORCH_CHECK(table.size(0) >= 1, "table must have at least one row");
  const int32_t* tp = table.data_ptr<int32_t>();
  for (int64_t i = 0; i < table.numel(); ++i)
    TORCH_CHECK(decode(tp[i]) < n, "table holds an index outside [0, ", n, ")");
  const int64_t p = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  Plan plan;
  for (int64_t k = 0; k < table.size(0); ++k) {
    const int32_t* row = tp + k * n;
    std::vector<Run> runs = decompose(row, n);
    RowPlan rp{Kind::kGather, {}};
    if (unit_step_runs(runs, n)) {
      rp.kind = Kind::kRuns;
    } else if (p * p == n && transposed_plan(row, p, runs)) {
      rp.kind = Kind::kTransposed;
      plan.square_side = p;
    }
    if (rp.kind != Kind::kGather) rp.blocks = merge_runs(runs);
    plan.rows.push_back(std::move(rp));
  }
  return plan;
}

// The step = +1 / -1 cases are separate loops so the compiler vectorises both (the reversed
// one with a lane permute); other steps are strided loads.
template <typename scalar_t, typename acc_t>
inline void accumulate_blocks(const scalar_t* __restrict src,
                                            const std::vector<Block>& blocks,
                                            acc_t* __restrict acc) {
  for (const Block& b : blocks) {
    const acc_t sign = b.neg ? acc_t(-1) : acc_t(1);
    const int64_t len = b.len, step = b.step;
    for (int64_t r = 0; r < b.rows; ++r) {
      acc_t* __restrict d = acc + b.dst + r * len;
      const scalar_t* __restrict s = src + b.src + r * b.src_row_stride;
      if (step == 1) {
        for (int64_t j = 0; j < len; ++j) d[j] += sign * static_cast<acc_t>(s[j]);
      } else if (step == -1) {
        for (int64_t j = 0; j < len; ++j) d[j] += sign * static_cast<acc_t>(s[-j]);
      } else {
        for (int64_t j = 0; j < len; ++j) d[j] += sign * static_cast<acc_t>(s[step * j]);
      }
    }
  }
}

template <typename scalar_t>
inline void copy_blocks(const scalar_t* __restrict src,
                                      const std::vector<Block>& blocks, scalar_t* __restrict dst) {
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

template <typename scalar_t, typename acc_t>
inline void accumulate_gather(const scalar_t* __restrict src,
                                            const int32_t* __restrict idx,
                                            acc_t* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = idx[i];
    const acc_t v = static_cast<acc_t>(src[decode(t)]);
    acc[i] += t < 0 ? -v : v;
  }
}

constexpr int64_t kTile = 16;  // 16x16 fp32 tiles: both sides of the transpose stay in L1

// dst[i*p + j] = scale * (a[i*p + j] + b[j*p + i]), tiled so the strided side stays in cache.
template <typename scalar_t, typename acc_t>
inline void transpose_add_store(const acc_t* __restrict a, const acc_t* __restrict b,
                                              acc_t scale, int64_t p, scalar_t* __restrict dst) {
  for (int64_t ib = 0; ib < p; ib += kTile)
    for (int64_t jb = 0; jb < p; jb += kTile) {
      const int64_t ie = std::min(ib + kTile, p), je = std::min(jb + kTile, p);
      for (int64_t i = ib; i < ie; ++i)
        for (int64_t j = jb; j < je; ++j)
          dst[i * p + j] = static_cast<scalar_t>(scale * (a[i * p + j] + b[j * p + i]));
    }
}

template <typename scalar_t>
inline void transpose_store(const scalar_t* __restrict b, int64_t p,
                                          scalar_t* __restrict dst) {
  for (int64_t ib = 0; ib < p; ib += kTile)
    for (int64_t jb = 0; jb < p; jb += kTile) {
      const int64_t ie = std::min(ib + kTile, p), je = std::min(jb + kTile, p);
      for (int64_t i = ib; i < ie; ++i)
        for (int64_t j = jb; j < je; ++j) dst[i * p + j] = b[j * p + i];
    }
}

// The row-range workers are the multi-versioned units: every helper above inlines into them, so
// the AVX2 clone vectorises all inner loops. (Cloning each small helper instead was measured
// 2-4x slower per plane: the loops of 64 elements paid a dispatched call each.)
template <typename scalar_t>
SYMFAST_MULTIVERSION void orbit_rows(const scalar_t* xp, const int32_t* tp, scalar_t* op,
                                     const Plan& plan, int64_t m, int64_t n, int64_t begin,
                                     int64_t end) {
  std::vector<scalar_t> tmp(plan.square_side ? n : 0);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t k = r / m;
    const scalar_t* src = xp + (r % m) * n;
    scalar_t* dst = op + r * n;
    const RowPlan& rp = plan.rows[k];
    if (rp.kind == Kind::kRuns) {
      copy_blocks<scalar_t>(src, rp.blocks, dst);
    } else if (rp.kind == Kind::kTransposed) {
      copy_blocks<scalar_t>(src, rp.blocks, tmp.data());
      transpose_store<scalar_t>(tmp.data(), plan.square_side, dst);
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
SYMFAST_MULTIVERSION void orbit_mean_rows(const scalar_t* yp, const int32_t* tp, scalar_t* op,
                                          const Plan& plan, int64_t g, int64_t m, int64_t n,
                                          int64_t begin, int64_t end) {
  const acc_t scale = acc_t(1) / static_cast<acc_t>(g);
  std::vector<acc_t> acc(n), acc_transposed(plan.square_side ? n : 0);
  for (int64_t row = begin; row < end; ++row) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    std::fill(acc_transposed.begin(), acc_transposed.end(), acc_t(0));
    for (int64_t k = 0; k < g; ++k) {
      const scalar_t* src = yp + (k * m + row) * n;
      const RowPlan& rp = plan.rows[k];
      if (rp.kind == Kind::kGather) {
        accumulate_gather<scalar_t, acc_t>(src, tp + k * n, acc.data(), n);
      } else {
        acc_t* target = rp.kind == Kind::kRuns ? acc.data() : acc_transposed.data();
        accumulate_blocks<scalar_t, acc_t>(src, rp.blocks, target);
      }
    }
    scalar_t* dst = op + row * n;
    if (plan.square_side) {
      transpose_add_store<scalar_t, acc_t>(acc.data(), acc_transposed.data(), scale,
                                           plan.square_side, dst);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i] * scale);
    }
  }
}

at::Tensor orbit_cpu(const at::Tensor& x_in, const at::Tensor& table_in) {
  TORCH_CHECK(x_in.device().is_cpu() && table_in.device().is_cpu(), "orbit_cpu needs CPU tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, N), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const Plan plan = make_plan(table, n);
  const int64_t g = table.size(0);
  at::Tensor out = at::empty({g, m, n}, x.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "orbit_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // (k, m) output rows are independent; ~16K elements per task amortise the OpenMP fork.
    const int64_t grain = std::max<int64_t>(1, 16384 / n);
    at::parallel_for(0, g * m, grain, [&](int64_t begin, int64_t end) {
      orbit_rows<scalar_t>(xp, tp, op, plan, m, n, begin, end);
    });
  });
  return out;
}

at::Tensor orbit_mean_cpu(const at::Tensor& y_in, const at::Tensor& inverse_table_in) {
  TORCH_CHECK(y_in.device().is_cpu() && inverse_table_in.device().is_cpu(),
              "orbit_mean_cpu needs CPU tensors");
  TORCH_CHECK(y_in.dim() == 3, "y must be (G, M, N), got ", y_in.sizes());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor table = inverse_table_in.contiguous();
  const int64_t g = y.size(0), m = y.size(1), n = y.size(2);
  const Plan plan = make_plan(table, n);
  TORCH_CHECK(table.size(0) == g, "table has ", table.size(0), " rows but y has G = ", g);
  at::Tensor out = at::empty({m, n}, y.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "orbit_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (n * g));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      orbit_mean_rows<scalar_t, acc_t>(yp, tp, op, plan, g, m, n, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def("orbit_cpu(Tensor x, Tensor table) -> Tensor");
  m.def("orbit_mean_cpu(Tensor y, Tensor inverse_table) -> Tensor");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("orbit_cpu", &orbit_cpu);
  m.impl("orbit_mean_cpu", &orbit_mean_cpu);
}

SYMFAST_PY_MODULE()
