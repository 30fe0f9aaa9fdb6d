// Planning signed-permutation gathers (a group's index tables) into vectorisable loops.
//
// table: (G, N) int32; entry t of row k encodes (g_k x)[i] = +x[t] if t >= 0, -x[~t] if t < 0.
//
// Why not one plain gather loop: an element-wise gather through the table ran at ~1.7 G
// elements/s on the 2-core machine (orbit_mean, D4, (64,3,64,64): 3.6 ms against a 1.3 ms memory
// floor). The tables of the groups people use are made of long arithmetic runs, so each row is
// planned once per call:
//  - kRuns: dst is cut into runs whose sources step by +1 or -1 (identity, flips, rot180, cyclic
//    shifts, channel permutations): contiguous or reversed loops that vectorise.
//  - kTransposed: on a square P x P plane, rows that swap the axes (rot90, rot270, the diagonal
//    reflections) are a transpose of a row-preserving map h: g x = T(h x). Sums of such parts are
//    collected in a second buffer and transposed once per plane, not walked with stride P per
//    element.
//  - kGather: anything else, element by element.
// orbit_mean of fp32 and bf16 on square planes of side 8, 16, 32, 64, 96 or 128 skips the
// per-element accumulation: sum_plane adds all G sources of a row in registers.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "symfast_module.h"

namespace symfast {

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

inline std::vector<Block> merge_runs(const std::vector<Run>& runs) {
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
inline std::vector<Run> decompose(const int32_t* t, int64_t n) {
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

inline bool unit_step_runs(const std::vector<Run>& runs, int64_t n) {
  if (static_cast<int64_t>(runs.size()) * 8 > n) return false;
  for (const Run& r : runs)
    if (r.len > 1 && r.step != 1 && r.step != -1) return false;
  return true;
}

// Is row t = T(h) on a p x p plane with h row-preserving: t[i*p + j] = s * x[o + a*i + b*j],
// |a| = 1, |b| = p? Then h[j*p + i] = t[i*p + j] has runs (per j) of step a.
inline bool transposed_plan(const int32_t* t, int64_t p, std::vector<Run>& runs) {
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
  // Every element is one block of p rows of p on a p x p plane (the flips and rotations of a
  // square): orbit_sum_row then walks output rows in the outer loop and elements in the inner
  // one, so the G source streams advance together.
  bool row_interleaved = false;
};

// One block of `rows` x `len` covering the plane, a single run of n split into p rows of p.
inline bool as_square_rows(std::vector<Block>& blocks, int64_t p) {
  if (blocks.size() != 1) return false;
  Block& b = blocks[0];
  if (b.rows == 1 && b.len == p * p && (b.step == 1 || b.step == -1)) {
    b.rows = p;
    b.len = p;
    b.src_row_stride = b.step * p;
  }
  return b.rows == p && b.len == p && (b.step == 1 || b.step == -1);
}

// Validates the table (every index in [0, N): the loops below never read out of bounds) and
// plans each row. The table is small (G x N) and read once per call.
inline Plan make_plan(const at::Tensor& table, int64_t n) {
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
  if (p >= 2 && p * p == n) {
    bool all = true;
    for (RowPlan& rp : plan.rows)
      all = all && rp.kind != Kind::kGather && as_square_rows(rp.blocks, p);
    plan.row_interleaved = all;
  }
  return plan;
}

// Plans are reused across calls whose table has the same contents (compared in full, so a reused
// buffer holding another table can never pick up a wrong plan). Planning a D4 64x64 table took
// ~0.1 ms, ~7% of an orbit_mean call at (64, 3, 64, 64); the comparison takes ~10 us.
inline std::shared_ptr<const Plan> cached_plan(const at::Tensor& table, int64_t n) {
  struct Entry {
    std::vector<int32_t> table;
    int64_t n;
    std::shared_ptr<const Plan> plan;
  };
  static std::mutex mutex;
  static std::deque<Entry> cache;  // most recent first
  constexpr size_t kCapacity = 16;
  TORCH_CHECK(table.scalar_type() == at::kInt, "table must be int32, got ", table.scalar_type());
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t count = table.numel();
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache)
      if (e.n == n && static_cast<int64_t>(e.table.size()) == count && table.dim() == 2 &&
          std::equal(e.table.begin(), e.table.end(), tp))
        return e.plan;
  }
  auto plan = std::make_shared<const Plan>(make_plan(table, n));
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_front({std::vector<int32_t>(tp, tp + count), n, plan});
  if (cache.size() > kCapacity) cache.pop_back();
  return plan;
}

// Source addresses are walked in ascending order, whatever the direction of the map: rows of a
// block in the order their sources lie in memory, reversed runs from their low end (the
// accumulator they land in is a cache-resident buffer, so its order is free). With the rows of a
// flip read against the direction of their elements, orbit_mean (8 x identical flip_v or flip_h
// rows, (64,3,64,64), 2 threads) took 2.5-2.8 ms against 1.4 ms for the identity: the hardware
// prefetcher loses mixed-direction streams.
//
// Row r of block b into acc, reading the source row upward in memory (a reversed row from its
// low end); a strided row (only single-element runs here) is read as it comes.
template <typename scalar_t, typename acc_t>
inline void accumulate_block_row(const scalar_t* __restrict src, const Block& b, int64_t r,
                                 acc_t* __restrict acc) {
  const acc_t sign = b.neg ? acc_t(-1) : acc_t(1);
  const int64_t len = b.len;
  acc_t* __restrict d = acc + b.dst + r * len;
  const scalar_t* __restrict s = src + b.src + r * b.src_row_stride;
  if (b.step == 1) {
    for (int64_t j = 0; j < len; ++j) d[j] += sign * static_cast<acc_t>(s[j]);
  } else if (b.step == -1) {
    const scalar_t* __restrict s_low = s - (len - 1);
    acc_t* __restrict d_high = d + (len - 1);
    for (int64_t j = 0; j < len; ++j) d_high[-j] += sign * static_cast<acc_t>(s_low[j]);
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] += sign * static_cast<acc_t>(s[b.step * j]);
  }
}

// Rows of each block in the order their sources lie in memory, so together with
// accumulate_block_row every source stream ascends.
template <typename scalar_t, typename acc_t>
inline void accumulate_blocks(const scalar_t* __restrict src, const std::vector<Block>& blocks,
                              acc_t* __restrict acc) {
  for (const Block& b : blocks)
    for (int64_t i = 0; i < b.rows; ++i)
      accumulate_block_row<scalar_t, acc_t>(src, b, b.src_row_stride < 0 ? b.rows - 1 - i : i,
                                            acc);
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

// In-register 8x8 transpose (unpack, shuffle, lane swap): r[k][l] becomes r[l][k]. The scalar
// loop ran at ~4 cycles per element: the strided side defeats the vectoriser.
__attribute__((always_inline)) inline void transpose8(v8f* r) {
  v8f t[8], u[8];
  const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi);
  }
  const v8i even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], even);
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], odd);
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], even);
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], odd);
  }
  const v8i low_lanes = {0, 1, 2, 3, 8, 9, 10, 11}, high_lanes = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], low_lanes);
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], high_lanes);
  }
}

// The acc tile += the transpose of the part tile, both with row stride p.
__attribute__((always_inline)) inline void transpose_add_tile8(float* __restrict acc,
                                                           const float* __restrict part,
                                                           int64_t p) {
  v8f r[8];
  for (int k = 0; k < 8; ++k) r[k] = load8(part + k * p);
  transpose8(r);
  for (int k = 0; k < 8; ++k) store8(acc + k * p, r[k] + load8(acc + k * p));
}

__attribute__((always_inline)) inline v8f reverse8(v8f v) {
  const v8i backwards = {7, 6, 5, 4, 3, 2, 1, 0};
  return __builtin_shuffle(v, backwards);
}

// dst[i*p + j] += src[j*p + i]: 8x8 register tiles for fp32, a plain loop for the rest and
// for the ragged edge (rows i >= p8 entirely, columns j >= p8 of the rows below p8).
template <typename T>
__attribute__((always_inline)) inline void transpose_add(T* __restrict dst, const T* __restrict src,
                                                         int64_t p) {
  int64_t p8 = 0;
  if constexpr (std::is_same_v<T, float>) {
    p8 = p - p % 8;
    for (int64_t i = 0; i < p8; i += 8)
      for (int64_t j = 0; j < p8; j += 8) transpose_add_tile8(dst + i * p + j, src + j * p + i, p);
  }
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = i < p8 ? p8 : 0; j < p; ++j) dst[i * p + j] += src[j * p + i];
}

constexpr int kMaxStreams = 32;

// One source plane's rows as seen by a p x p block: row i starts at row0 + i * row_stride and
// is read forward (s[j]) or backward (s[-j]).
template <typename T>
struct RowStream {
  const T* row0;
  int64_t row_stride;
  float sign;
};

// The streams that sum into one target plane and read their rows in the same direction.
template <typename T>
struct StreamGroup {
  RowStream<T> fwd[kMaxStreams], rev[kMaxStreams];  // rows read forward s[j] / backward s[-j]
  int n_fwd = 0, n_rev = 0;
  bool empty() const { return n_fwd + n_rev == 0; }
};

// d (+)= scale * sum over the group's streams of their row for target row t (8*NC floats),
// summed in NC registers. Every stream's row is loaded in ascending memory order, a backward row's chunks
// reversed in register into the mirrored target chunk.
template <int NC, typename T>
__attribute__((always_inline)) inline void sum_group_row(const StreamGroup<T>& grp, int64_t t,
                                                         float scale, float* __restrict d,
                                                         bool add) {
  v8f acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = v8f{};
  for (int e = 0; e < grp.n_fwd; ++e) {
    const T* s = grp.fwd[e].row0 + t * grp.fwd[e].row_stride;
    const float sign = grp.fwd[e].sign;
    for (int c = 0; c < NC; ++c) acc[c] += sign * load8_as_float(s + 8 * c);
  }
  for (int e = 0; e < grp.n_rev; ++e) {
    const T* s_low = grp.rev[e].row0 + t * grp.rev[e].row_stride - (8 * NC - 1);
    const float sign = grp.rev[e].sign;
    for (int c = 0; c < NC; ++c)
      acc[NC - 1 - c] += sign * reverse8(load8_as_float(s_low + 8 * c));
  }
  for (int c = 0; c < NC; ++c) {
    v8f v = scale * acc[c];
    if (add) v += load8(d + 8 * c);
    store8(d + 8 * c, v);
  }
}

// target = scale * the sum of the streams of `down` (rows ascending in memory) and `up`
// (descending) on a p x p plane, p = 8*NC. Step i reads source row i of every stream, so all G streams ascend
// together, as the hardware prefetcher needs (row-major visits of the target turned flips into
// descending or sawtooth streams: 2-3x slower). A `down` stream's row i lands in target row i,
// an `up` stream's in row p-1-i; whichever of the two visits to a row comes first stores it.
// Summing in registers replaces a load-add-store of a cache-resident buffer per element and
// source, which had made orbit_mean compute-bound (D4 (64,3,64,64): 3.0 ms on one thread
// against 1.9 ms for torch.sum over the same bytes).
template <int NC, typename T>
__attribute__((always_inline)) inline void sum_plane(const StreamGroup<T>& down, const StreamGroup<T>& up,
                                                     float scale, float* __restrict target) {
  constexpr int64_t p = 8 * NC;
  if (down.empty() && up.empty()) {
    std::fill(target, target + p * p, 0.f);
    return;
  }
  const bool both = !down.empty() && !up.empty();
  for (int64_t i = 0; i < p; ++i) {
    const bool second_visit = both && 2 * i > p - 1;
    if (!down.empty()) sum_group_row<NC, T>(down, i, scale, target + i * p, second_visit);
    if (!up.empty())
      sum_group_row<NC, T>(up, p - 1 - i, scale, target + (p - 1 - i) * p, second_visit);
  }
}

template <int NC, typename T>
__attribute__((always_inline)) inline void sum_square_plane(const StreamGroup<T>* groups, float scale,
                                                            float* acc, float* transposed) {
  sum_plane<NC, T>(groups[0], groups[1], scale, acc);
  if (!groups[2].empty() || !groups[3].empty()) {
    sum_plane<NC, T>(groups[2], groups[3], scale, transposed);
    transpose_add<float>(acc, transposed, 8 * NC);
  }
}

// Plane sides with a register path: the common image sizes. Each side is a separate unrolled
// instantiation in two ISA clones and several dtypes; all 16 multiples of 8 up to 128 made this
// header take ~3 minutes to compile per module. Other sides take the per-element path.
template <typename T>
__attribute__((always_inline)) inline bool sum_plane_dispatch(int64_t p, const StreamGroup<T>* groups,
                                                              float scale, float* acc,
                                                              float* transposed) {
  switch (p) {
    case 8: sum_square_plane<1, T>(groups, scale, acc, transposed); return true;
    case 16: sum_square_plane<2, T>(groups, scale, acc, transposed); return true;
    case 32: sum_square_plane<4, T>(groups, scale, acc, transposed); return true;
    case 64: sum_square_plane<8, T>(groups, scale, acc, transposed); return true;
    case 96: sum_square_plane<12, T>(groups, scale, acc, transposed); return true;
    case 128: sum_square_plane<16, T>(groups, scale, acc, transposed); return true;
    default: return false;
  }
}

// acc[i] = scale * sum_k g_k^-1(y[k, row])[i] for one row of y (G, M, N), planned with the inverse
// table. `transposed` is scratch of size N when plan.square_side != 0. This is the
// multi-versioned unit: the helpers above inline into it, so its AVX2 clone vectorises every
// inner loop. (Cloning each small helper instead was measured 2-4x slower per plane: loops of
// 64 elements paid a dispatched call each.)
template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION void orbit_sum_row(const scalar_t* yp, const int32_t* tp, const Plan& plan,
                                       int64_t g, int64_t m, int64_t n, int64_t row, acc_t scale,
                                       acc_t* acc, acc_t* transposed) {
  if constexpr ((std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) &&
                std::is_same_v<acc_t, float>) {
    if (plan.row_interleaved && g <= kMaxStreams) {
      const int64_t p = plan.rows[0].blocks[0].rows;
      // groups: [0] into acc, rows down; [1] into acc, rows up; [2], [3] into `transposed`
      StreamGroup<scalar_t> groups[4];
      for (int64_t k = 0; k < g; ++k) {
        const RowPlan& rp = plan.rows[k];
        const Block& b = rp.blocks[0];
        StreamGroup<scalar_t>& grp =
            groups[(rp.kind == Kind::kRuns ? 0 : 2) + (b.src_row_stride < 0)];
        const RowStream<scalar_t> stream{yp + (k * m + row) * n + b.src, b.src_row_stride,
                               b.neg ? -1.f : 1.f};
        if (b.step == 1) grp.fwd[grp.n_fwd++] = stream;
        else grp.rev[grp.n_rev++] = stream;
      }
      if (sum_plane_dispatch<scalar_t>(p, groups, scale, acc, transposed)) return;
    }
  }
  std::fill(acc, acc + n, acc_t(0));
  if (plan.square_side) std::fill(transposed, transposed + n, acc_t(0));
  if (plan.row_interleaved) {
    const int64_t p = plan.rows[0].blocks[0].rows;
    for (int64_t r = 0; r < p; ++r)
      for (int64_t k = 0; k < g; ++k) {
        const RowPlan& rp = plan.rows[k];
        // Rows whose sources descend are visited from the bottom: output row p-1-r.
        const Block& b = rp.blocks[0];
        const int64_t row_index = b.src_row_stride >= 0 ? r : p - 1 - r;
        accumulate_block_row<scalar_t, acc_t>(yp + (k * m + row) * n, b, row_index,
                                              rp.kind == Kind::kRuns ? acc : transposed);
      }
  } else {
    for (int64_t k = 0; k < g; ++k) {
      const scalar_t* src = yp + (k * m + row) * n;
      const RowPlan& rp = plan.rows[k];
      if (rp.kind == Kind::kGather) {
        accumulate_gather<scalar_t, acc_t>(src, tp + k * n, acc, n);
      } else {
        accumulate_blocks<scalar_t, acc_t>(src, rp.blocks,
                                           rp.kind == Kind::kRuns ? acc : transposed);
      }
    }
  }
  if (plan.square_side) transpose_add<acc_t>(acc, transposed, plan.square_side);
  for (int64_t i = 0; i < n; ++i) acc[i] *= scale;
}

}  // namespace symfast
