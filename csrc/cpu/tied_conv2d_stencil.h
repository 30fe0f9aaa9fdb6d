// The tied convolution's geometry, orbit tables and stencils (S[b, c, r] = sum over the
// positions p of orbit r of shift_p(x[b, c])) and their adjoints, for every dtype and stride.
// Included by tied_conv2d.cpp only.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "simd.h"
#include "symfast_module.h"

namespace {

struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t h, w, ho, wo;
};

struct Orbits {
  std::vector<int32_t> positions;
  std::vector<int32_t> offsets;
  std::vector<int32_t> row, col;  // kernel row and column of each position
  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
};

// Validates the CSR tables once so the loops below never index out of bounds.
Orbits read_orbits(const at::Tensor& positions, const at::Tensor& offsets, int64_t kh, int64_t kw) {
  TORCH_CHECK(positions.device().is_cpu() && offsets.device().is_cpu(),
              "orbit tables must be CPU tensors");
  TORCH_CHECK(positions.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt,
              "orbit tables must be int32");
  TORCH_CHECK(positions.dim() == 1 && offsets.dim() == 1 && offsets.size(0) >= 2,
              "positions must be (P,) and offsets (R+1,) with R >= 1");
  const at::Tensor pos = positions.contiguous(), off = offsets.contiguous();
  Orbits o;
  o.positions.assign(pos.data_ptr<int32_t>(), pos.data_ptr<int32_t>() + pos.numel());
  o.offsets.assign(off.data_ptr<int32_t>(), off.data_ptr<int32_t>() + off.numel());
  TORCH_CHECK(o.offsets.front() == 0 && o.offsets.back() == static_cast<int32_t>(o.positions.size()),
              "offsets must start at 0 and end at len(positions)");
  for (size_t r = 1; r < o.offsets.size(); ++r)
    TORCH_CHECK(o.offsets[r] >= o.offsets[r - 1], "offsets must be non-decreasing");
  for (int32_t p : o.positions)
    TORCH_CHECK(p >= 0 && p < kh * kw, "orbit position ", p, " outside the ", kh, "x", kw, " kernel");
  for (int32_t p : o.positions) {
    o.row.push_back(static_cast<int32_t>(p / kw));
    o.col.push_back(static_cast<int32_t>(p % kw));
  }
  return o;
}

Geometry make_geometry(int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                       int64_t ph, int64_t pw) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0,
              "need kernel >= 1, stride >= 1, padding >= 0");
  Geometry g{kh, kw, sh, sw, ph, pw, h, w, 0, 0};
  g.ho = (h + 2 * ph - kh) / sh + 1;
  g.wo = (w + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(h + 2 * ph >= kh && w + 2 * pw >= kw, "input (", h, ", ", w,
              ") plus padding is smaller than the kernel (", kh, ", ", kw, ")");
  return g;
}

// Output columns wo whose input column wo*sw + j - pw lies in [0, W).
inline void column_range(const Geometry& g, int64_t j, int64_t& lo, int64_t& hi) {
  const int64_t first = g.pw - j;  // wo*sw >= first
  lo = first <= 0 ? 0 : (first + g.sw - 1) / g.sw;
  const int64_t last = g.w - 1 + g.pw - j;  // wo*sw <= last
  hi = last < 0 ? 0 : std::min(g.wo, last / g.sw + 1);
}

template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION void add_row(acc_t* __restrict acc, const scalar_t* __restrict src,
                                  int64_t n, int64_t step) {
  if (step == 1) {
    for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<acc_t>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<acc_t>(src[k * step]);
  }
}

template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION void scatter_row(acc_t* __restrict acc, const scalar_t* __restrict src,
                                      int64_t n, int64_t step) {
  if (step == 1) {
    for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<acc_t>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) acc[k * step] += static_cast<acc_t>(src[k]);
  }
}

// Stride 1 works on the zero-padded plane (Hp, Wp) as a flat array: output (y, x) and kernel
// offset (i, j) meet at padded index (y + i)·Wp + x + j, so each kernel position is ONE long
// contiguous add over L = (Ho − 1)·Wp + Wo "wide" outputs (columns x >= Wo are junk and dropped).
// Measured on the 2-core machine (stencil of 32×64 planes of 32×32, 1 thread): 19 ms with the
// per-row loops of the strided path (32-wide rows are mostly loop overhead), 9.4 ms with this.
template <typename acc_t>
SYMFAST_MULTIVERSION void add_flat(acc_t* __restrict acc, const acc_t* __restrict src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) acc[k] += src[k];
}

struct Stride1Scratch {
  int64_t hp, wp, wide;
};

inline Stride1Scratch stride1_layout(const Geometry& g) {
  return {g.h + 2 * g.ph, g.w + 2 * g.pw, (g.ho - 1) * (g.w + 2 * g.pw) + g.wo};
}

// scratch: hp*wp (padded input) + wide (accumulator), in acc_t.
template <typename scalar_t, typename acc_t>
void stencil_plane_stride1(const scalar_t* src, scalar_t* dst, int64_t sr, const Orbits& o,
                           const Geometry& g, acc_t* scratch) {
  const Stride1Scratch l = stride1_layout(g);
  acc_t* pad = scratch;
  acc_t* acc = scratch + l.hp * l.wp;
  std::fill(pad, pad + l.hp * l.wp, acc_t(0));
  for (int64_t y = 0; y < g.h; ++y) {
    acc_t* row = pad + (y + g.ph) * l.wp + g.pw;
    for (int64_t x = 0; x < g.w; ++x) row[x] = static_cast<acc_t>(src[y * g.w + x]);
  }
  for (int64_t r = 0; r < o.count(); ++r) {
    std::fill(acc, acc + l.wide, acc_t(0));
    for (int32_t t = o.offsets[r]; t < o.offsets[r + 1]; ++t) {
      const int64_t i = o.positions[t] / g.kw, j = o.positions[t] % g.kw;
      add_flat<acc_t>(acc, pad + i * l.wp + j, l.wide);
    }
    scalar_t* out = dst + r * sr;
    for (int64_t y = 0; y < g.ho; ++y)
      for (int64_t x = 0; x < g.wo; ++x) out[y * g.wo + x] = static_cast<scalar_t>(acc[y * l.wp + x]);
  }
}

constexpr size_t kMaxKernelPositions = 256;

// out[x] = sum over t in [t0, t1) of base[x + flat[t]] for x < n: 8 columns per register, the
// last chunk moved left to end at n (it overlaps its neighbour when 8 does not divide n and
// stores the same sums there); scalar when n < 8. Positions are added in ascending t.
__attribute__((always_inline)) inline void sum_shifted_row(const float* __restrict base,
                                                           const int64_t* __restrict flat,
                                                           int64_t t0, int64_t t1, int64_t n,
                                                           float* __restrict out) {
  for (int64_t x0 = 0; x0 < n && n >= 8; x0 += 8) {
    const int64_t x = std::min(x0, n - 8);
    symfast::v8f sum = {};
    for (int64_t t = t0; t < t1; ++t) sum += symfast::load8(base + x + flat[t]);
    symfast::store8(out + x, sum);
  }
  if (n < 8)
    for (int64_t x = 0; x < n; ++x) {
      float sum = 0.f;
      for (int64_t t = t0; t < t1; ++t) sum += base[x + flat[t]];
      out[x] = sum;
    }
}

// i*Wp + j per kernel position (row i, column j): where output (y, x) meets the position in a
// plane zero-padded to width Wp, relative to padded index y*Wp + x.
void forward_flat(const Orbits& o, int64_t wp, int64_t* flat) {
  for (size_t t = 0; t < o.positions.size(); ++t) flat[t] = o.row[t] * wp + o.col[t];
}

// fp32, stride 1: each orbit's sum for 8 output columns is formed in a register from the
// zero-padded plane, one unaligned load per kernel position, and stored once. Output (y, x) and
// kernel offset (i, j) meet at padded index (y + i)*Wp + x + j, so `flat` holds i*Wp + j per
// position. The template's flat algorithm (a load-add-store pass over a wide accumulator per
// kernel position, then a copy out per orbit) took ~1.9 us per 32x32 plane (D4 3x3, one thread,
// planes in cache), about a quarter of the forward time at 64 -> 64 channels.
SYMFAST_MULTIVERSION void stencil_plane_stride1_f32(
    const float* __restrict src, float* __restrict dst, int64_t sr, const int64_t* __restrict flat,
    const int32_t* __restrict off, int64_t nr, int64_t h, int64_t w, int64_t ho, int64_t wo,
    int64_t ph, int64_t pw, float* __restrict pad) {
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  for (int64_t k = 0; k < hp * wp; ++k) pad[k] = 0.f;
  for (int64_t y = 0; y < h; ++y) {
    float* row = pad + (y + ph) * wp + pw;
    const float* s = src + y * w;
    for (int64_t x = 0; x < w; ++x) row[x] = s[x];
  }
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t y = 0; y < ho; ++y)
      sum_shifted_row(pad + y * wp, flat, off[r], off[r + 1], wo, dst + r * sr + y * wo);
}

// The adjoint of stencil_plane_stride1_f32, also as a gather into registers: input (y, x)
// received orbit r(t)'s output (y + ph - i, x + pw - j) for each kernel position t = (i, j), so
// gx(y, x) = sum over t of G_r(t)(y + ph - i + kh - 1, x + pw - j + kw - 1), where G_r is orbit
// r's gradient plane zero-padded by kh - 1 rows and kw - 1 columns on each side (all R padded
// planes side by side in gpad, `flat` holding each position's plane offset plus row/column
// offset). Summed in the same position order as the template's scatter (a load-add-store pass
// over the padded plane per position), so the results are bitwise equal; the input gradient at
// 64 -> 64 channels, 32x32, batch 32 went 10.4 -> 9.0 ms (2 threads), 17.0 -> 15.5 ms (1 thread).
SYMFAST_MULTIVERSION void gather_transposed_f32(const float* __restrict gpad, int64_t wq,
                                               const int64_t* __restrict flat, int64_t npos,
                                               int64_t h, int64_t w, float* __restrict dst) {
  for (int64_t y = 0; y < h; ++y) sum_shifted_row(gpad + y * wq, flat, 0, npos, w, dst + y * w);
}

// Offsets of the gather above: plane offset plus row/column offset of each kernel position.
void transposed_flat(const Orbits& o, const Geometry& g, int64_t* flat) {
  const int64_t hq = g.ho + 2 * (g.kh - 1), wq = g.wo + 2 * (g.kw - 1);
  for (int64_t r = 0; r < o.count(); ++r)
    for (int32_t t = o.offsets[r]; t < o.offsets[r + 1]; ++t)
      flat[t] = r * hq * wq + (g.ph - o.row[t] + g.kh - 1) * wq + (g.pw - o.col[t] + g.kw - 1);
}

SYMFAST_MULTIVERSION void stencil_transpose_plane_stride1_f32(
    const float* __restrict gs, int64_t sr, float* __restrict dst, const int64_t* __restrict flat,
    int64_t npos, int64_t nr, int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t kh,
    int64_t kw, float* __restrict gpad) {
  const int64_t hq = ho + 2 * (kh - 1), wq = wo + 2 * (kw - 1);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t yy = 0; yy < hq; ++yy) {
      float* row = gpad + (r * hq + yy) * wq;
      const int64_t y = yy - (kh - 1);
      if (y < 0 || y >= ho) {
        for (int64_t k = 0; k < wq; ++k) row[k] = 0.f;
        continue;
      }
      const float* s = gs + r * sr + y * wo;
      for (int64_t k = 0; k < kw - 1; ++k) row[k] = row[wq - 1 - k] = 0.f;
      for (int64_t x = 0; x < wo; ++x) row[kw - 1 + x] = s[x];
    }
  gather_transposed_f32(gpad, wq, flat, npos, h, w, dst);
}

// The adjoint: scatter each orbit's (zero-extended, wide) gradient into the padded plane.
template <typename scalar_t, typename acc_t>
void stencil_transpose_plane_stride1(const scalar_t* gs, int64_t sr, scalar_t* dst, const Orbits& o,
                                     const Geometry& g, acc_t* scratch) {
  const Stride1Scratch l = stride1_layout(g);
  acc_t* pad = scratch;
  acc_t* wide = scratch + l.hp * l.wp;
  std::fill(pad, pad + l.hp * l.wp, acc_t(0));
  for (int64_t r = 0; r < o.count(); ++r) {
    const scalar_t* src = gs + r * sr;
    std::fill(wide, wide + l.wide, acc_t(0));
    for (int64_t y = 0; y < g.ho; ++y)
      for (int64_t x = 0; x < g.wo; ++x) wide[y * l.wp + x] = static_cast<acc_t>(src[y * g.wo + x]);
    for (int32_t t = o.offsets[r]; t < o.offsets[r + 1]; ++t) {
      const int64_t i = o.positions[t] / g.kw, j = o.positions[t] % g.kw;
      add_flat<acc_t>(pad + i * l.wp + j, wide, l.wide);
    }
  }
  for (int64_t y = 0; y < g.h; ++y)
    for (int64_t x = 0; x < g.w; ++x)
      dst[y * g.w + x] = static_cast<scalar_t>(pad[(y + g.ph) * l.wp + x + g.pw]);
}

// One (b, c) plane: dst[r * sr + y * Wo + x] = orbit-r sum; acc is a scratch row of Wo.
template <typename scalar_t, typename acc_t>
void stencil_plane_strided(const scalar_t* src, scalar_t* dst, int64_t sr, const Orbits& o,
                           const Geometry& g, acc_t* acc) {
  for (int64_t r = 0; r < o.count(); ++r) {
    for (int64_t y = 0; y < g.ho; ++y) {
      std::fill(acc, acc + g.wo, acc_t(0));
      for (int32_t t = o.offsets[r]; t < o.offsets[r + 1]; ++t) {
        const int64_t i = o.positions[t] / g.kw, j = o.positions[t] % g.kw;
        const int64_t iy = y * g.sh + i - g.ph;
        if (iy < 0 || iy >= g.h) continue;
        int64_t lo, hi;
        column_range(g, j, lo, hi);
        if (hi > lo)
          add_row<scalar_t, acc_t>(acc + lo, src + iy * g.w + lo * g.sw + j - g.pw, hi - lo, g.sw);
      }
      scalar_t* row = dst + r * sr + y * g.wo;
      for (int64_t k = 0; k < g.wo; ++k) row[k] = static_cast<scalar_t>(acc[k]);
    }
  }
}

// The adjoint on one plane: dst (H, W) = sum_r sum_{p in orbit r} shift_p^T(gs[r * sr ...]);
// acc is a scratch plane of H*W. One plane per task, so the scatter has no write conflicts.
template <typename scalar_t, typename acc_t>
void stencil_transpose_plane_strided(const scalar_t* gs, int64_t sr, scalar_t* dst,
                                     const Orbits& o, const Geometry& g, acc_t* acc) {
  std::fill(acc, acc + g.h * g.w, acc_t(0));
  for (int64_t r = 0; r < o.count(); ++r) {
    const scalar_t* src = gs + r * sr;
    for (int32_t t = o.offsets[r]; t < o.offsets[r + 1]; ++t) {
      const int64_t i = o.positions[t] / g.kw, j = o.positions[t] % g.kw;
      int64_t lo, hi;
      column_range(g, j, lo, hi);
      if (hi <= lo) continue;
      for (int64_t y = 0; y < g.ho; ++y) {
        const int64_t iy = y * g.sh + i - g.ph;
        if (iy < 0 || iy >= g.h) continue;
        scatter_row<scalar_t, acc_t>(acc + iy * g.w + lo * g.sw + j - g.pw, src + y * g.wo + lo,
                                     hi - lo, g.sw);
      }
    }
  }
  for (int64_t k = 0; k < g.h * g.w; ++k) dst[k] = static_cast<scalar_t>(acc[k]);
}

// Scratch (in acc_t) each plane function needs; callers allocate it once per thread.
int64_t plane_scratch(const Geometry& g, int64_t r) {
  if (g.sh == 1 && g.sw == 1) {
    const Stride1Scratch l = stride1_layout(g);
    const int64_t padded_orbits = r * (g.ho + 2 * (g.kh - 1)) * (g.wo + 2 * (g.kw - 1));
    return std::max(l.hp * l.wp + l.wide, padded_orbits);
  }
  return std::max(g.wo, g.h * g.w);
}

// (b, c) planes per chunk handed to a thread: ~16K stencil outputs, so that small planes (4x4
// and 8x8 in a UNet's lower levels) do not pay an atomic hand-out each.
int64_t planes_per_chunk(const Geometry& g, int64_t r) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, r * g.ho * g.wo));
}

template <typename scalar_t, typename acc_t>
void stencil_plane(const scalar_t* src, scalar_t* dst, int64_t sr, const Orbits& o,
                   const Geometry& g, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (g.sh == 1 && g.sw == 1 && o.positions.size() <= kMaxKernelPositions) {
      int64_t flat[kMaxKernelPositions];
      forward_flat(o, g.w + 2 * g.pw, flat);
      stencil_plane_stride1_f32(src, dst, sr, flat, o.offsets.data(), o.count(), g.h, g.w, g.ho,
                                g.wo, g.ph, g.pw, scratch);
      return;
    }
  }
  if (g.sh == 1 && g.sw == 1)
    stencil_plane_stride1<scalar_t, acc_t>(src, dst, sr, o, g, scratch);
  else
    stencil_plane_strided<scalar_t, acc_t>(src, dst, sr, o, g, scratch);
}

template <typename scalar_t, typename acc_t>
void stencil_transpose_plane(const scalar_t* gs, int64_t sr, scalar_t* dst, const Orbits& o,
                             const Geometry& g, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (g.sh == 1 && g.sw == 1 && o.positions.size() <= kMaxKernelPositions) {
      int64_t flat[kMaxKernelPositions];
      transposed_flat(o, g, flat);
      stencil_transpose_plane_stride1_f32(gs, sr, dst, flat, o.positions.size(), o.count(), g.h,
                                          g.w, g.ho, g.wo, g.kh, g.kw, scratch);
      return;
    }
  }
  if (g.sh == 1 && g.sw == 1)
    stencil_transpose_plane_stride1<scalar_t, acc_t>(gs, sr, dst, o, g, scratch);
  else
    stencil_transpose_plane_strided<scalar_t, acc_t>(gs, sr, dst, o, g, scratch);
}

// One sample: xb (C, H, W) -> sb (C*R, Ho*Wo), on the calling thread.
template <typename scalar_t, typename acc_t>
void stencil_sample(const scalar_t* xb, int64_t c, scalar_t* sb, const Orbits& o,
                    const Geometry& g, acc_t* scratch) {
  const int64_t hw = g.ho * g.wo;
  for (int64_t ch = 0; ch < c; ++ch)
    stencil_plane<scalar_t, acc_t>(xb + ch * g.h * g.w, sb + ch * o.count() * hw, hw, o, g, scratch);
}

// S plane (b, c, r) starts at b*sb + c*sc + r*sr; OpenMP over the (b, c) planes.
template <typename scalar_t>
void stencil_into(const at::Tensor& x, scalar_t* out, int64_t sb, int64_t sc, int64_t sr,
                  const Orbits& o, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  Chunks chunks(x.size(0) * c, planes_per_chunk(g, o.count()));
  parallel_team(chunks.count(), [&] {
    std::vector<acc_t> acc(plane_scratch(g, o.count()));
    for (int64_t chunk, begin, end; chunks.take(chunk, begin, end);) {
      for (int64_t plane = begin; plane < end; ++plane)
        stencil_plane<scalar_t, acc_t>(xp + plane * g.h * g.w,
                                       out + (plane / c) * sb + (plane % c) * sc, sr, o, g, acc.data());
    }
  });
}

// gS -> gx (B, C, H, W), gS plane (b, c, r) starting at b*sb + c*sc + r*sr (the layout of
// stencil_into); OpenMP over the (b, c) planes.
template <typename scalar_t>
void stencil_transpose_into(const scalar_t* gs, int64_t sb, int64_t sc, int64_t sr, at::Tensor& gx,
                            const Orbits& o, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = gx.size(1);
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  Chunks chunks(gx.size(0) * c, planes_per_chunk(g, o.count()));
  parallel_team(chunks.count(), [&] {
    std::vector<acc_t> acc(plane_scratch(g, o.count()));
    for (int64_t chunk, begin, end; chunks.take(chunk, begin, end);) {
      for (int64_t plane = begin; plane < end; ++plane)
        stencil_transpose_plane<scalar_t, acc_t>(gs + (plane / c) * sb + (plane % c) * sc, sr,
                                                 gxp + plane * g.h * g.w, o, g, acc.data());
    }
  });
}

// Small output planes (outside the fused kernels' conditions): S in the layout (C, R, B, Ho*Wo),
// so that the GEMM of every sample is one GEMM with N = B*Ho*Wo. Per-sample GEMMs with N = Ho*Wo of 16 or 64 spent their time in
// dispatch and packing: a UNet training step at 16x16 (levels at 8x8 and 4x4, batch 64) made
// ~1,900 at::mm/addmm calls of 12-45 us each.
constexpr int64_t kSmallPlane = 256;
bool small_plane(const Geometry& g) { return g.ho * g.wo < kSmallPlane; }

// x (B, C, H, W) -> S (C*R, B*Ho*Wo).
template <typename scalar_t>
at::Tensor stencil_batched(const at::Tensor& x, const Orbits& o, const Geometry& g) {
  const int64_t bsz = x.size(0), c = x.size(1), r = o.count(), hw = g.ho * g.wo;
  at::Tensor s = at::empty({c * r, bsz * hw}, x.options());
  stencil_into<scalar_t>(x, s.data_ptr<scalar_t>(), hw, r * bsz * hw, bsz * hw, o, g);
  return s;
}
}  // namespace
