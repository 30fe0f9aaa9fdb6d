// CPU kernels for the tied (group-invariant kernel) convolution.
//
// A kernel with one value per orbit of kernel positions turns the convolution into
//   stencil:  S[b, c, r] = sum over positions p=(i, j) of orbit r of shift_p(x[b, c])
//   GEMM:     y[b] = theta (O, C*R) @ S[b] (C*R, Ho*Wo)
// Forward, fp32 or bf16, stride 1, output width >= 16, on a CPU with AVX2+FMA: the stencil is
// computed inside the GEMM's panel packing and never stored (tied_conv2d_fused below). Otherwise the
// stencil is a separate pass (per sample into a scratch buffer, or per (b, c) plane) and the GEMM
// goes to at::mm (MKL/oneDNN).
// Backward: grad S = theta^T @ grad y, then the transposed stencil scatters it back to the input
// positions; grad theta = grad y @ S^T with S recomputed (cheaper than keeping 3x the input alive).
//
// Orbits arrive in CSR form: positions (P,) int32 in [0, kh*kw), offsets (R+1,) int32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
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
  at::parallel_for(0, x.size(0) * c, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(plane_scratch(g, o.count()));
    for (int64_t plane = begin; plane < end; ++plane)
      stencil_plane<scalar_t, acc_t>(xp + plane * g.h * g.w, out + (plane / c) * sb + (plane % c) * sc,
                                     sr, o, g, acc.data());
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
  at::parallel_for(0, gx.size(0) * c, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(plane_scratch(g, o.count()));
    for (int64_t plane = begin; plane < end; ++plane)
      stencil_transpose_plane<scalar_t, acc_t>(gs + (plane / c) * sb + (plane % c) * sc, sr,
                                               gxp + plane * g.h * g.w, o, g, acc.data());
  });
}

// Small output planes: S in the layout (C, R, B, Ho*Wo), so that the GEMM of every sample is
// one GEMM with N = B*Ho*Wo. Per-sample GEMMs with N = Ho*Wo of 16 or 64 spent their time in
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

// ---------------------------------------------------------------------------------------------
// fp32 (or bf16 inputs), stride 1, AVX2+FMA: the stencil fused into the GEMM's panel packing.
//
// A GEMM packs its right-hand side into small panels before the micro-kernel multiplies them;
// here the packing step computes the stencil, so S never exists as a tensor: for one strip of
// kNR output columns it forms the orbit sums of all C input channels (a K = C*R by kNR panel,
// in L1), and the micro-kernel multiplies it by theta, kMR output channels at a time, with the
// bias as the accumulators' start value. Measured on the 2-core machine (D4 3x3, 64 -> 64,
// 32x32, batch 32): the separate stencil (written to a (C*R, H*W) buffer that overflows L2)
// took a quarter of the forward time, and MKL's sgemm on this shape ran at 63 GF/s per core,
// 64% of the FMA peak measured by a register-only loop (99 GF/s).
#if defined(__x86_64__) && defined(__GNUC__)
#define SYMFAST_FUSED_TIED_CONV 1
#define SYMFAST_AVX2_FMA __attribute__((target("avx2,fma")))

constexpr int kMR = 6;              // output channels per micro-kernel call (12 accumulators)
constexpr int64_t kNR = 16;         // output columns per strip: two 8-lane registers
constexpr int64_t kRowBlock = 8;    // output rows per work item

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

// theta (M, K) row-major -> panels of kMR rows, each stored k-major ([k][kMR]); the panel of
// rows m0.. starts at m0*K, the last one holds the M % kMR leftover rows the same way.
void pack_theta(const float* w, int64_t m, int64_t k, float* out) {
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, m - m0);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t i = 0; i < mr; ++i) *out++ = w[(m0 + i) * k + kk];
  }
}

// c[i*ldc + 0..15] = bias[i] + sum_k a[k*MR + i] * b[k*16 + 0..15] for i < MR.
template <int MR>
SYMFAST_AVX2_FMA __attribute__((always_inline)) inline void micro_kernel(
    const float* __restrict a, const float* __restrict b, int64_t k, const float* bias,
    float* __restrict c, int64_t ldc) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = bias ? _mm256_set1_ps(bias[i]) : _mm256_setzero_ps();
  // Unrolled by 4: the loop counter and branch otherwise cost ~15% of the FMA throughput
  // (measured with A and B in L1: 80 -> 93-96 GF/s per core, peak 99).
#pragma GCC unroll 4
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kNR), b1 = _mm256_loadu_ps(b + kk * kNR + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + kk * MR + i);
      lo[i] = _mm256_fmadd_ps(ai, b0, lo[i]);
      hi[i] = _mm256_fmadd_ps(ai, b1, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, lo[i]);
    _mm256_storeu_ps(c + i * ldc + 8, hi[i]);
  }
}

// c[i*ldc + 0..15] (+= bias[i]) for all m rows: a in pack_theta layout (m rows, k deep), b one
// k-by-16 panel.
SYMFAST_AVX2_FMA void multiply_panel(const float* a, const float* b, int64_t m, int64_t k,
                                     const float* bias, float* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    const float* am = a + m0 * k;
    const float* bs = bias ? bias + m0 : nullptr;
    float* cm = c + m0 * ldc;
    switch (std::min<int64_t>(kMR, m - m0)) {
      case 6: micro_kernel<6>(am, b, k, bs, cm, ldc); break;
      case 5: micro_kernel<5>(am, b, k, bs, cm, ldc); break;
      case 4: micro_kernel<4>(am, b, k, bs, cm, ldc); break;
      case 3: micro_kernel<3>(am, b, k, bs, cm, ldc); break;
      case 2: micro_kernel<2>(am, b, k, bs, cm, ldc); break;
      default: micro_kernel<1>(am, b, k, bs, cm, ldc); break;
    }
  }
}

// The stencil for one strip: panel[(ch*R + r)*16 + 0..15] = sum over positions t of orbit r of
// pad[ch*plane + flat[t] + 0..15], pad pointing at the strip's first output in padded coordinates.
SYMFAST_AVX2_FMA void pack_stencil_strip(const float* __restrict pad, int64_t plane, int64_t c,
                                         const int64_t* __restrict flat,
                                         const int32_t* __restrict off, int64_t r,
                                         float* __restrict panel) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* p = pad + ch * plane;
    for (int64_t rr = 0; rr < r; ++rr) {
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      for (int32_t t = off[rr]; t < off[rr + 1]; ++t) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(p + flat[t]));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(p + flat[t] + 8));
      }
      _mm256_storeu_ps(panel, lo);
      _mm256_storeu_ps(panel + 8, hi);
      panel += kNR;
    }
  }
}

// An inline copy into fp32 (bf16 widened): the rows are short (32 floats in the benchmark), too
// short to amortise a library memcpy call each.
template <typename scalar_t>
__attribute__((always_inline)) inline void copy_row(float* __restrict dst,
                                                    const scalar_t* __restrict src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) symfast::store8(dst + i, symfast::load8_as_float(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

struct FusedPlan {
  int64_t c, m, r, k, wp, plane;
  std::vector<int64_t> flat;  // forward_flat
  std::vector<float> theta;   // pack_theta layout
};

// Output rows [y0, y1) of one sample: copy the input rows they read into the zero-padded
// per-thread buffer pad (C planes of `plane` floats; its side columns are zero from allocation
// and never written, since every row lives at the same place in every item), then strips.
template <typename scalar_t>
SYMFAST_AVX2_FMA void fused_rows(const scalar_t* __restrict x, float* __restrict y, int64_t y0,
                                 int64_t y1, const Geometry& g, const FusedPlan& fp,
                                 const int32_t* off, const float* bias, float* __restrict pad,
                                 float* __restrict panel) {
  const int64_t rows = y1 - y0 + g.kh - 1, hw = g.ho * g.wo;
  for (int64_t ch = 0; ch < fp.c; ++ch)
    for (int64_t lr = 0; lr < rows; ++lr) {
      const int64_t iy = y0 + lr - g.ph;
      float* dst = pad + ch * fp.plane + lr * fp.wp;
      if (iy >= 0 && iy < g.h)
        copy_row(dst + g.pw, x + (ch * g.h + iy) * g.w, g.w);
      else
        std::fill(dst, dst + fp.wp, 0.f);
    }
  for (int64_t yy = y0; yy < y1; ++yy)
    // Strips of kNR columns; the last one is moved left to end at Wo (it overlaps its neighbour
    // when kNR does not divide Wo and stores the same sums there).
    for (int64_t x0 = 0; x0 < g.wo; x0 += kNR) {
      const int64_t xs = std::min(x0, g.wo - kNR);
      pack_stencil_strip(pad + (yy - y0) * fp.wp + xs, fp.plane, fp.c, fp.flat.data(), off, fp.r,
                         panel);
      multiply_panel(fp.theta.data(), panel, fp.m, fp.k, bias, y + yy * g.wo + xs, hw);
    }
}

bool fused_applies(const Orbits& o, const Geometry& g) {
  return g.sh == 1 && g.sw == 1 && g.wo >= kNR && o.positions.size() <= kMaxKernelPositions &&
         cpu_has_avx2_fma();
}

// Work items are (sample, block of kRowBlock output rows), handed out dynamically. x is fp32 or
// bf16 (widened as it is copied into the padded rows); w2, bias and y are fp32.
template <typename scalar_t>
void tied_conv2d_fused(const at::Tensor& x, const at::Tensor& w2, const float* bias,
                       const Orbits& o, const Geometry& g, at::Tensor& y) {
  FusedPlan fp;
  fp.c = x.size(1);
  fp.m = w2.size(0);
  fp.r = o.count();
  fp.k = w2.size(1);
  fp.wp = g.w + 2 * g.pw;
  fp.plane = (kRowBlock + g.kh - 1) * fp.wp;
  fp.flat.resize(o.positions.size());
  forward_flat(o, fp.wp, fp.flat.data());
  fp.theta.resize(fp.m * fp.k);
  pack_theta(w2.data_ptr<float>(), fp.m, fp.k, fp.theta.data());
  const int64_t blocks = (g.ho + kRowBlock - 1) / kRowBlock, items = x.size(0) * blocks;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  float* yp = y.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> pad(fp.c * fp.plane, 0.f), panel(fp.k * kNR);
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t b = it / blocks, y0 = (it % blocks) * kRowBlock;
      fused_rows<scalar_t>(xp + b * fp.c * g.h * g.w, yp + b * fp.m * g.ho * g.wo, y0,
                 std::min(g.ho, y0 + kRowBlock), g, fp, o.offsets.data(), bias, pad.data(),
                 panel.data());
    }
  });
}
// One sample's gradient of S into the interior of the padded orbit planes gpad (K planes of
// hq x wq), strip by strip; panel is m x kNR scratch.
SYMFAST_AVX2_FMA void grad_stencil_into_padded(const float* __restrict gyb, const float* apack,
                                               int64_t m, int64_t k, const Geometry& g,
                                               float* __restrict gpad, float* __restrict panel) {
  const int64_t wq = g.wo + 2 * (g.kw - 1), plane = (g.ho + 2 * (g.kh - 1)) * wq;
  const int64_t hw = g.ho * g.wo;
  for (int64_t y = 0; y < g.ho; ++y)
    for (int64_t x0 = 0; x0 < g.wo; x0 += kNR) {
      const int64_t xs = std::min(x0, g.wo - kNR);  // as in the forward
      for (int64_t oc = 0; oc < m; ++oc) copy_row(panel + oc * kNR, gyb + oc * hw + y * g.wo + xs, kNR);
      multiply_panel(apack, panel, k, m, nullptr, gpad + (y + g.kh - 1) * wq + xs + g.kw - 1, plane);
    }
}

// Input gradient under the forward's conditions, whole samples per work item: the gradient of
// S (theta^T @ grad_out, one strip of kNR columns at a time, by the same micro-kernel) is
// written straight into the zero-padded orbit planes the transposed gather reads, instead of an
// MKL GEMM into a (C*R, Ho*Wo) buffer that is then copied into them. Same-run A/B (D4 3x3,
// 64 -> 64, 32x32, batch 32): 9.6 -> 7.7 ms at 2 threads, 17.6 -> 14.4 ms at 1 thread.
// theta_t is theta^T, (C*R, O) contiguous.
void tied_conv2d_grad_input_fused_f32(const at::Tensor& gy, const at::Tensor& theta_t,
                                      const Orbits& o, const Geometry& g, at::Tensor& gx) {
  const int64_t bsz = gx.size(0), c = gx.size(1), m = theta_t.size(1), r = o.count(), k = c * r;
  const int64_t hq = g.ho + 2 * (g.kh - 1), wq = g.wo + 2 * (g.kw - 1), plane = hq * wq;
  const int64_t hw = g.ho * g.wo, npos = static_cast<int64_t>(o.positions.size());
  std::vector<float> apack(k * m);
  pack_theta(theta_t.data_ptr<float>(), k, m, apack.data());
  std::vector<int64_t> flat(npos);
  transposed_flat(o, g, flat.data());
  const float* gyp = gy.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  std::atomic<int64_t> next_sample{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // The padded planes' borders are zero from here on: every sample writes only the interior.
    std::vector<float> gpad(k * plane, 0.f), panel(m * kNR);
    for (int64_t b = next_sample++; b < bsz; b = next_sample++) {
      grad_stencil_into_padded(gyp + b * m * hw, apack.data(), m, k, g, gpad.data(), panel.data());
      for (int64_t ch = 0; ch < c; ++ch)
        gather_transposed_f32(gpad.data() + ch * r * plane, wq, flat.data(), npos, g.h, g.w,
                              gxp + (b * c + ch) * g.h * g.w);
    }
  });
}
#endif

// With at least one sample per thread, each thread runs stencil -> GEMM (single-threaded inside
// the parallel region) for whole samples, so S stays in cache instead of a (B, C, R, Ho, Wo)
// round trip through memory. Fewer samples than threads: a plane-parallel stencil, then one
// multi-threaded GEMM per sample. Samples are handed out dynamically (an atomic counter), so a
// thread slowed by another process on a shared core does not hold the others at the barrier.
bool fuse_per_sample(int64_t batch) { return batch >= at::get_num_threads(); }

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, name, " must be (B, C, H, W), got ", x.sizes());
}

// x (B, C, H, W) -> S (B, C, R, Ho, Wo).
at::Tensor tied_stencil_cpu(const at::Tensor& x_in, const at::Tensor& positions,
                            const at::Tensor& offsets, int64_t kh, int64_t kw, int64_t sh,
                            int64_t sw, int64_t ph, int64_t pw) {
  check_input(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const Orbits o = read_orbits(positions, offsets, kh, kw);
  const Geometry g = make_geometry(x.size(2), x.size(3), kh, kw, sh, sw, ph, pw);
  const int64_t r = o.count(), hw = g.ho * g.wo;
  at::Tensor s = at::empty({x.size(0), x.size(1), r, g.ho, g.wo}, x.options());
  if (s.numel() == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_stencil_cpu", [&] {
    stencil_into<scalar_t>(x, s.data_ptr<scalar_t>(), x.size(1) * r * hw, r * hw, hw, o, g);
  });
  return s;
}

// gS (B, C, R, Ho, Wo) -> gx (B, C, H, W).
at::Tensor tied_stencil_transpose_cpu(const at::Tensor& gs_in, const at::Tensor& positions,
                                      const at::Tensor& offsets, int64_t kh, int64_t kw, int64_t sh,
                                      int64_t sw, int64_t ph, int64_t pw, int64_t h, int64_t w) {
  TORCH_CHECK(gs_in.device().is_cpu(), "grad_stencil must be a CPU tensor");
  TORCH_CHECK(gs_in.dim() == 5, "grad_stencil must be (B, C, R, Ho, Wo), got ", gs_in.sizes());
  const at::Tensor gs = gs_in.contiguous();
  const Orbits o = read_orbits(positions, offsets, kh, kw);
  const Geometry g = make_geometry(h, w, kh, kw, sh, sw, ph, pw);
  TORCH_CHECK(gs.size(2) == o.count() && gs.size(3) == g.ho && gs.size(4) == g.wo,
              "grad_stencil has shape ", gs.sizes(), "; expected (B, C, ", o.count(), ", ", g.ho,
              ", ", g.wo, ")");
  at::Tensor gx = at::empty({gs.size(0), gs.size(1), h, w}, gs.options());
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gs.scalar_type(), "tied_stencil_t_cpu", [&] {
    const int64_t r = o.count(), hw = g.ho * g.wo;
    stencil_transpose_into<scalar_t>(gs.data_ptr<scalar_t>(), gs.size(1) * r * hw, r * hw, hw, gx, o, g);
  });
  return gx;
}

void check_weight(const at::Tensor& x, const at::Tensor& weight, int64_t r) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 3, "weight must be a CPU (O, C, R) tensor");
  TORCH_CHECK(weight.size(1) == x.size(1) && weight.size(2) == r, "weight has shape ",
              weight.sizes(), "; expected (O, ", x.size(1), ", ", r, ")");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
}

at::Tensor tied_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& positions,
                           const at::Tensor& offsets, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw) {
  check_input(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const Orbits o = read_orbits(positions, offsets, kh, kw);
  check_weight(x, weight, o.count());
  const Geometry g = make_geometry(x.size(2), x.size(3), kh, kw, sh, sw, ph, pw);
  const int64_t bsz = x.size(0), c = x.size(1), oc = weight.size(0), r = o.count();
  const int64_t hw = g.ho * g.wo;
  const at::Tensor w2 = weight.reshape({oc, c * r}).contiguous();
  at::Tensor y = at::empty({bsz, oc, g.ho, g.wo}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == oc, "bias must be (", oc, ",), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type(), "bias must be a CPU ",
                x.scalar_type(), " tensor");
  }
  if (y.numel() == 0) return y;
#ifdef SYMFAST_FUSED_TIED_CONV
  if ((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && fused_applies(o, g)) {
    // bf16: fp32 throughout (weights and bias widened here, inputs as they are copied), one
    // rounding of the result. D4 3x3, 64 -> 64, 32x32, batch 32: 349 ms with the bf16 stencil
    // and bf16 at::mm below (no bf16 FMA units on this CPU), 8.5 ms this way (fp32: 7.7 ms).
    const at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor y32 = x.scalar_type() == at::kFloat ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
    const at::Tensor w32 = w2.to(at::kFloat).contiguous();
    const float* bp = has_bias ? b.data_ptr<float>() : nullptr;
    if (x.scalar_type() == at::kFloat)
      tied_conv2d_fused<float>(x, w32, bp, o, g, y32);
    else
      tied_conv2d_fused<c10::BFloat16>(x, w32, bp, o, g, y32);
    if (!y32.is_same(y)) y.copy_(y32);
    return y;
  }
#endif
  // The bias goes into each sample's GEMM (addmm: y[b] = bias + theta @ S[b]) while y[b] is still in
  // cache, not a separate y.add_(bias) pass afterwards. Measured on the shared 2-core machine (D4 3x3,
  // 64->64, 32x32, batch 32, fp32): the separate add_ over the 8 MB output took 0.23 ms at 1 thread
  // but 2.7 ms (min) / 8 ms (median) at 2 threads, a second OpenMP fork-join after the main region;
  // fusing it alone moved the paired forward ratio vs nn.Conv2d (median of back-to-back pairs, one
  // run, loaded machine) from 1.98x to 2.21x at 2 threads and from 1.79x to 2.05x at 1 thread.
  const auto gemm = [&](at::Tensor& yb, const at::Tensor& sb) {
    if (has_bias)
      at::addmm_out(yb, bias->view({oc, 1}), w2, sb);
    else
      at::mm_out(yb, w2, sb);
  };
  if (small_plane(g)) {
    at::Tensor s;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_small", [&] {
      s = stencil_batched<scalar_t>(x, o, g);
    });
    const at::Tensor y2 = has_bias ? at::addmm(bias->view({oc, 1}), w2, s) : at::mm(w2, s);
    y.copy_(y2.view({oc, bsz, g.ho, g.wo}).transpose(0, 1));
  } else if (fuse_per_sample(bsz)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      std::atomic<int64_t> next_sample{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        // OpenMP workers do not inherit the caller's below-autograd dispatch state.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor sb = at::empty({c * r, hw}, x.options());
        std::vector<acc_t> acc(plane_scratch(g, o.count()));
        for (int64_t b = next_sample++; b < bsz; b = next_sample++) {
          stencil_sample<scalar_t, acc_t>(xp + b * c * g.h * g.w, c, sb.data_ptr<scalar_t>(), o, g,
                                          acc.data());
          at::Tensor yb = y[b].view({oc, hw});
          gemm(yb, sb);
        }
      });
    });
  } else {
    const at::Tensor s = tied_stencil_cpu(x, positions, offsets, kh, kw, sh, sw, ph, pw);
    for (int64_t b = 0; b < bsz; ++b) {
      at::Tensor yb = y[b].view({oc, hw});
      gemm(yb, s[b].view({c * r, hw}));
    }
  }
  return y;
}

// Returns (grad_x, grad_weight, grad_bias); entries not asked for by mask are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tied_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& positions, const at::Tensor& offsets, int64_t kh, int64_t kw, int64_t sh,
    int64_t sw, int64_t ph, int64_t pw, std::array<bool, 3> mask) {
  check_input(x, "x");
  check_input(grad_out, "grad_out");
  const Orbits o = read_orbits(positions, offsets, kh, kw);
  check_weight(x, weight, o.count());
  const Geometry g = make_geometry(x.size(2), x.size(3), kh, kw, sh, sw, ph, pw);
  const int64_t bsz = x.size(0), c = x.size(1), oc = weight.size(0), r = o.count();
  const int64_t hw = g.ho * g.wo;
  TORCH_CHECK(grad_out.size(0) == bsz && grad_out.size(1) == oc && grad_out.size(2) == g.ho &&
                  grad_out.size(3) == g.wo,
              "grad_out has shape ", grad_out.sizes(), "; expected (", bsz, ", ", oc, ", ", g.ho,
              ", ", g.wo, ")");
  const at::Tensor gy = grad_out.contiguous().view({bsz, oc, hw});
  at::Tensor gx, gw, gb;
  if (small_plane(g) && (mask[0] || mask[1])) {
    // Both gradients as single GEMMs over the (C, R, B, Ho*Wo) layout (see stencil_batched).
    const at::Tensor gy2 = gy.transpose(0, 1).reshape({oc, bsz * hw});
    const at::Tensor xc = x.contiguous();
    if (mask[0]) {
      gx = at::empty(x.sizes(), x.options());
      const at::Tensor gs = at::mm(weight.reshape({oc, c * r}).t(), gy2);
      if (gx.numel() > 0) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_small_bwd_x", [&] {
          stencil_transpose_into<scalar_t>(gs.data_ptr<scalar_t>(), hw, r * bsz * hw, bsz * hw, gx, o, g);
        });
      }
    }
    if (mask[1]) {
      at::Tensor s;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_small_bwd_w", [&] {
        s = stencil_batched<scalar_t>(xc, o, g);
      });
      gw = at::mm(gy2, s.t()).view({oc, c, r});
    }
    if (mask[2]) gb = gy.sum({0, 2});
    return {gx, gw, gb};
  }
  if (mask[0]) {
    const at::Tensor w2t = weight.reshape({oc, c * r}).t().contiguous();
    gx = at::empty(x.sizes(), x.options());
#ifdef SYMFAST_FUSED_TIED_CONV
    const bool fused = gx.numel() > 0 && x.scalar_type() == at::kFloat && fused_applies(o, g) &&
                       fuse_per_sample(bsz);
    if (fused) tied_conv2d_grad_input_fused_f32(gy, w2t, o, g, gx);
#else
    const bool fused = false;
#endif
    if (gx.numel() > 0 && !fused) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_bwd_x", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (fuse_per_sample(bsz)) {
          std::atomic<int64_t> next_sample{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
            at::AutoDispatchBelowADInplaceOrView below_autograd;
            at::Tensor gsb = at::empty({c * r, hw}, x.options());
            std::vector<acc_t> acc(plane_scratch(g, o.count()));
            for (int64_t b = next_sample++; b < bsz; b = next_sample++) {
              at::mm_out(gsb, w2t, gy[b]);
              for (int64_t ch = 0; ch < c; ++ch)
                stencil_transpose_plane<scalar_t, acc_t>(
                    gsb.data_ptr<scalar_t>() + ch * r * hw, hw,
                    gx.data_ptr<scalar_t>() + (b * c + ch) * g.h * g.w, o, g, acc.data());
            }
          });
        } else {
          at::Tensor gs = at::empty({bsz, c * r, hw}, x.options());
          for (int64_t b = 0; b < bsz; ++b) {
            at::Tensor gsb = gs[b];
            at::mm_out(gsb, w2t, gy[b]);
          }
          stencil_transpose_into<scalar_t>(gs.data_ptr<scalar_t>(), c * r * hw, r * hw, hw, gx, o, g);
        }
      });
    }
  }
  const bool full_precision = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  if (mask[1] && fuse_per_sample(bsz) && full_precision && hw > 0) {
    // Each thread sums grad theta over whole samples into its own partial, with S[b] formed in
    // a per-thread scratch that stays in cache: the (C, R, B, Ho*Wo) tensor of the path below
    // (25 MB at 64 channels, 32x32, batch 32) and the transposed copy of grad_out are never
    // written. Measured (D4 3x3, 64 -> 64, 32x32, batch 32, same-run A/B): 11.8-19.8 -> 8.9-12.6
    // ms at 2 threads, 16.2-18.0 -> 13.1-15.7 ms at 1 thread.
    const int64_t threads = at::get_num_threads();
    at::Tensor partial = at::zeros({threads, oc, c * r}, x.options());
    const at::Tensor xc = x.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tied_conv2d_bwd_w", [&] {
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      std::atomic<int64_t> next_sample{0};
      at::parallel_for(0, threads, 1, [&](int64_t t, int64_t) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor sb = at::empty({c * r, hw}, x.options());
        std::vector<scalar_t> scratch(plane_scratch(g, o.count()));
        at::Tensor acc = partial[t];
        for (int64_t b = next_sample++; b < bsz; b = next_sample++) {
          stencil_sample<scalar_t, scalar_t>(xp + b * c * g.h * g.w, c, sb.data_ptr<scalar_t>(), o,
                                             g, scratch.data());
          acc.addmm_(gy[b], sb.t());
        }
      });
    });
    gw = partial.sum(0).view({oc, c, r});
  } else if (mask[1]) {
    // S laid out (C, R, B, Ho*Wo) so grad theta is one GEMM with K = B*Ho*Wo (a single rounding
    // in low precision, and a long inner dimension for MKL).
    const at::Tensor xc = x.contiguous();
    if (xc.numel() > 0 && hw > 0) {
      at::Tensor s;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_bwd_w", [&] {
        s = stencil_batched<scalar_t>(xc, o, g);
      });
      const at::Tensor gy2 = gy.transpose(0, 1).reshape({oc, bsz * hw});
      gw = at::mm(gy2, s.t()).view({oc, c, r});
    } else {
      gw = at::zeros(weight.sizes(), weight.options());
    }
  }
  if (mask[2]) gb = gy.sum({0, 2});
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def("tied_stencil_cpu(Tensor x, Tensor positions, Tensor offsets, int kh, int kw, int sh, "
        "int sw, int ph, int pw) -> Tensor");
  m.def("tied_stencil_transpose_cpu(Tensor grad_stencil, Tensor positions, Tensor offsets, int kh, "
        "int kw, int sh, int sw, int ph, int pw, int h, int w) -> Tensor");
  m.def("tied_conv2d_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor positions, Tensor offsets, "
        "int kh, int kw, int sh, int sw, int ph, int pw) -> Tensor");
  m.def("tied_conv2d_backward_cpu(Tensor grad_out, Tensor x, Tensor weight, Tensor positions, "
        "Tensor offsets, int kh, int kw, int sh, int sw, int ph, int pw, bool[3] mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("tied_stencil_cpu", &tied_stencil_cpu);
  m.impl("tied_stencil_transpose_cpu", &tied_stencil_transpose_cpu);
  m.impl("tied_conv2d_cpu", &tied_conv2d_cpu);
  m.impl("tied_conv2d_backward_cpu", &tied_conv2d_backward_cpu);
}

SYMFAST_PY_MODULE()
