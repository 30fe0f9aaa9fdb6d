// The fused fp32/bf16 stride-1 kernels on AVX2+FMA: the stencil computed inside the GEMM's
// panel packing, the AVX2 micro-kernels, the canvas for narrow planes. Included by
// tied_conv2d.cpp only, after tied_conv2d_stencil.h.
#pragma once
#include <algorithm>
#include <cmath>

#include "tied_conv2d_stencil.h"

namespace {

// ---------------------------------------------------------------------------------------------
// fp32 (or bf16 inputs), stride 1, AVX2+FMA: the stencil fused into the GEMM's panel packing.
//
// A GEMM packs its right-hand side into small panels before the micro-kernel multiplies them;
// here the packing step computes the stencil, so S never exists as a tensor: for one strip of
// kNR output columns it forms the orbit sums of all C input channels (a K = C*R by kNR panel,
// in L1), and the micro-kernel multiplies it by theta, up to kMR output channels at a time, with
// the bias as the accumulators' start value. Measured on the 2-core machine (D4 3x3, 64 -> 64,
// 32x32, batch 32): the separate stencil (written to a (C*R, H*W) buffer that overflows L2)
// took a quarter of the forward time, and MKL's sgemm on this shape ran at 63 GF/s per core,
// 64% of the FMA peak measured by a register-only loop (99 GF/s).
//
// Planes narrower than a strip (or not a multiple of it) go through the same kernel on a
// "canvas": n samples side by side in the zero-padded row buffer, pw zero columns apart, so the
// 16-column strips run across sample boundaries; the few columns that straddle two samples are
// computed and dropped when the strip is stored. The path it replaced for output planes under 256
// pixels (S as one (C*R, B*Ho*Wo) tensor and a single MKL GEMM; MKL sgemm reaches only 40-65 GF/s
// on this AMD CPU), same-run A/B, D4 3x3, batch 64, 2 threads, forward in ms: 64->64 at 8x8
// 3.04 -> 1.44, 128->64 at 8x8 4.63 -> 2.43, 64->64 at 4x4 0.86 -> 0.39, 32->64 at 8x8
// 1.11 -> 0.67 (33-52 -> 70-83 GF/s).
//
// The input gradient is the same kernel again: gx[c](y, x) = sum over o, r of theta[o, c, r] times
// the sum over positions (i, j) of orbit r of gy[o](y + ph - i, x + pw - j), i.e. the forward op
// applied to grad_out with theta transposed to (C, O*R), every kernel position reflected through
// the centre and padding kh - 1 - ph. The weight gradient shares the canvas and the stencil
// strips, and multiplies them by grad_out with its own micro-kernel
// (tied_conv2d_grad_weight_fused below).
#if defined(__x86_64__) && defined(__GNUC__)
#define SYMFAST_FUSED_TIED_CONV 1
#define SYMFAST_AVX2_FMA __attribute__((target("avx2,fma")))

constexpr int kMR = 6;              // output channels per micro-kernel call (12 accumulators)
constexpr int64_t kNR = 16;         // output columns per strip: two 8-lane registers
constexpr int64_t kRowBlock = 8;    // output rows per work item

// theta (M, K) row-major in blocks of at most kMR rows, each stored k-major ([k][rows]) from
// m0*K. A remainder of 1, 2 or 3 rows after full blocks of 6 is merged with the last full block
// and split as 4+3, 4+4 or 5+4: a block of r rows keeps 2r accumulators in flight, and the FMA
// unit needs 8 (latency 4, two per cycle), so 32 output channels as 6,6,6,6,6,2 left the last
// block at half speed.
struct ThetaPack {
  int64_t m = 0, k = 0;
  std::vector<int64_t> start, rows;
  std::vector<float> data;
};

ThetaPack pack_theta(const float* w, int64_t m, int64_t k) {
  ThetaPack tp;
  tp.m = m;
  tp.k = k;
  std::vector<int64_t> sizes(m / kMR, kMR);
  const int64_t rem = m % kMR;
  if (rem > 0 && rem <= 3 && !sizes.empty()) {
    sizes.back() = rem == 3 ? 5 : 4;
    sizes.push_back(kMR + rem - sizes.back());
  } else if (rem > 0) {
    sizes.push_back(rem);
  }
  tp.data.resize(m * k);
  float* out = tp.data.data();
  int64_t m0 = 0;
  for (int64_t mr : sizes) {
    tp.start.push_back(m0);
    tp.rows.push_back(mr);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t i = 0; i < mr; ++i) *out++ = w[(m0 + i) * k + kk];
    m0 += mr;
  }
  return tp;
}

// c[i*ldc + 0..15] = bias[i] + sum_k a[k*MR + i] * b[k*16 + 0..15] for i < MR. Fewer than 4 rows
// split k over 2 or 4 sets of accumulators (summed at the end), so that 8 FMAs are in flight:
// 1 output channel (the UNet's last layer) ran its strips at a quarter of the FMA rate.
template <int MR>
SYMFAST_AVX2_FMA __attribute__((always_inline)) inline void micro_kernel(
    const float* __restrict a, const float* __restrict b, int64_t k, const float* bias,
    float* __restrict c, int64_t ldc) {
  constexpr int S = MR == 1 ? 4 : (MR <= 3 ? 2 : 1);
  __m256 lo[S][MR], hi[S][MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) lo[0][i] = hi[0][i] = bias ? _mm256_set1_ps(bias[i]) : _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int s = 1; s < S; ++s)
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) lo[s][i] = hi[s][i] = _mm256_setzero_ps();
  int64_t kk = 0;
  // Unrolled by 4: the loop counter and branch otherwise cost ~15% of the FMA throughput
  // (measured with A and B in L1: 80 -> 93-96 GF/s per core, peak 99).
#pragma GCC unroll 4
  for (; kk + S <= k; kk += S) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const __m256 b0 = _mm256_loadu_ps(b + (kk + s) * kNR), b1 = _mm256_loadu_ps(b + (kk + s) * kNR + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 ai = _mm256_broadcast_ss(a + (kk + s) * MR + i);
        lo[s][i] = _mm256_fmadd_ps(ai, b0, lo[s][i]);
        hi[s][i] = _mm256_fmadd_ps(ai, b1, hi[s][i]);
      }
    }
  }
  for (; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(b + kk * kNR), b1 = _mm256_loadu_ps(b + kk * kNR + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + kk * MR + i);
      lo[0][i] = _mm256_fmadd_ps(ai, b0, lo[0][i]);
      hi[0][i] = _mm256_fmadd_ps(ai, b1, hi[0][i]);
    }
  }
#pragma GCC unroll 4
  for (int s = 1; s < S; ++s)
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      lo[0][i] = _mm256_add_ps(lo[0][i], lo[s][i]);
      hi[0][i] = _mm256_add_ps(hi[0][i], hi[s][i]);
    }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, lo[0][i]);
    _mm256_storeu_ps(c + i * ldc + 8, hi[0][i]);
  }
}

// c[i*ldc + 0..15] (+= bias[i]) for all M rows; b one K-by-16 panel. (Slicing K so that theta's
// slice and the panel's share 24 KB of L1 was 3-4% slower at 128 -> 64, 16x16 and 96 -> 32,
// 32x32, one thread: the accumulators' extra loads and stores cost more than L2 reads of theta.)
SYMFAST_AVX2_FMA void multiply_panel(const ThetaPack& tp, const float* b, const float* bias,
                                     float* c, int64_t ldc) {
  for (size_t blk = 0; blk < tp.start.size(); ++blk) {
    const int64_t m0 = tp.start[blk];
    const float* am = tp.data.data() + m0 * tp.k;
    const float* bs = bias ? bias + m0 : nullptr;
    float* cm = c + m0 * ldc;
    switch (tp.rows[blk]) {
      case 6: micro_kernel<6>(am, b, tp.k, bs, cm, ldc); break;
      case 5: micro_kernel<5>(am, b, tp.k, bs, cm, ldc); break;
      case 4: micro_kernel<4>(am, b, tp.k, bs, cm, ldc); break;
      case 3: micro_kernel<3>(am, b, tp.k, bs, cm, ldc); break;
      case 2: micro_kernel<2>(am, b, tp.k, bs, cm, ldc); break;
      default: micro_kernel<1>(am, b, tp.k, bs, cm, ldc); break;
    }
  }
}

// The stencil for one strip: panel[(ch*R + r)*ld + 0..15] = sum over positions t of orbit r of
// pad[ch*plane + flat[t] + 0..15], pad pointing at the strip's first output in padded coordinates.
// Four channels at a time: one channel's orbit sum is a chain of dependent adds (latency 3), and
// with one chain pair in flight this packing took 37% of the GEMM's time at 96 input and 32
// output channels (perf, one thread); 8 chains keep both add ports busy.
SYMFAST_AVX2_FMA void pack_stencil_strip(const float* __restrict pad, int64_t plane, int64_t c,
                                         const int64_t* __restrict flat,
                                         const int32_t* __restrict off, int64_t r,
                                         float* __restrict panel, int64_t ld) {
  int64_t ch = 0;
  for (; ch + 4 <= c; ch += 4) {
    const float* p = pad + ch * plane;
    for (int64_t rr = 0; rr < r; ++rr) {
      __m256 lo[4], hi[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
      for (int32_t t = off[rr]; t < off[rr + 1]; ++t) {
        const float* q = p + flat[t];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          lo[j] = _mm256_add_ps(lo[j], _mm256_loadu_ps(q + j * plane));
          hi[j] = _mm256_add_ps(hi[j], _mm256_loadu_ps(q + j * plane + 8));
        }
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        float* dst = panel + ((ch + j) * r + rr) * ld;
        _mm256_storeu_ps(dst, lo[j]);
        _mm256_storeu_ps(dst + 8, hi[j]);
      }
    }
  }
  for (; ch < c; ++ch) {
    const float* p = pad + ch * plane;
    for (int64_t rr = 0; rr < r; ++rr) {
      __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
      for (int32_t t = off[rr]; t < off[rr + 1]; ++t) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(p + flat[t]));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(p + flat[t] + 8));
      }
      float* dst = panel + (ch * r + rr) * ld;
      _mm256_storeu_ps(dst, lo);
      _mm256_storeu_ps(dst + 8, hi);
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

// A zeroed, 64-byte aligned float buffer: std::vector's storage is only 16-byte aligned, so a
// strip of 16 floats would straddle two cache lines.
class AlignedFloats {
 public:
  void assign(int64_t n) {
    raw_.assign(n + 16, 0.f);
    const auto addr = reinterpret_cast<uintptr_t>(raw_.data());
    ptr_ = raw_.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
  float* data() { return ptr_; }

 private:
  std::vector<float> raw_;
  float* ptr_ = nullptr;
};

// The valid outputs of one strip: `len` canvas columns from strip column `col` are columns
// x.. of sample `sample` of the work item's group.
struct Segment {
  int64_t col, sample, x, len;
};

// n samples side by side: sample s's input columns start at canvas column s*pitch + pw (pitch =
// W + pw, so pw zero columns separate neighbours and serve as both samples' padding; Wo if that
// is larger), and canvas output column s*pitch + x is the sample's output column x for x < Wo
// (the other pitch - Wo columns read across a boundary and are dropped). Strips of kNR columns start at
// multiples of kNR; the buffer is wide enough for the last strip to read zeros past the data.
// The weight gradient's partial sums: at most this many fixed runs of work items, added in order.
constexpr int64_t kGradWeightRuns = 8;

struct Canvas {
  int64_t bsz, c, h, w, ph, pw, kh, ho, wo;
  int64_t n, pitch, out_w, strips, wp, rows, plane, groups, blocks;
  std::vector<int64_t> flat;                 // i*wp + j per kernel position
  std::vector<Segment> segs;                 // every strip's valid runs, strip by strip
  std::vector<int64_t> seg_begin;            // strips + 1 offsets into segs
  std::vector<int64_t> direct_sample, direct_x;  // a strip of kNR valid columns of one sample, or -1
};

int64_t canvas_strips(int64_t n, int64_t pitch, int64_t wo) {
  return ((n - 1) * pitch + wo + kNR - 1) / kNR;
}

// n is the smallest count within 3% of the best share of computed columns that are kept, among
// counts that leave at least 4 work items per thread (of ``threads``) and a row buffer under 384 KB
// (it is read from L2). Shares for D4 3x3, padding 1: 32x32 and 16x16 planes 1.0 at n = 1; 8x8 0.875 at n = 7
// (0.5 at n = 1); 4x4 0.75 at n = 3 (0.25 at n = 1).
Canvas make_canvas(const Orbits& o, const Geometry& g, int64_t bsz, int64_t c, int64_t threads) {
  Canvas cv;
  cv.bsz = bsz;
  cv.c = c;
  cv.h = g.h;
  cv.w = g.w;
  cv.ph = g.ph;
  cv.pw = g.pw;
  cv.kh = g.kh;
  cv.ho = g.ho;
  cv.wo = g.wo;
  // Wo exceeds W + pw when the padding exceeds kw - 1 (outputs that see only zeros).
  cv.pitch = std::max(g.w + g.pw, g.wo);
  cv.rows = std::min(kRowBlock, g.ho);
  cv.blocks = (g.ho + kRowBlock - 1) / kRowBlock;
  const int64_t min_groups = (4 * threads + cv.blocks - 1) / cv.blocks;
  const int64_t n_max = std::max<int64_t>(1, std::min<int64_t>(bsz, bsz / std::max<int64_t>(1, min_groups)));
  const auto share = [&](int64_t n) {
    return static_cast<double>(n * g.wo) / static_cast<double>(canvas_strips(n, cv.pitch, g.wo) * kNR);
  };
  const auto bytes = [&](int64_t n) {
    return 4 * c * (cv.rows + g.kh - 1) * (canvas_strips(n, cv.pitch, g.wo) * kNR + g.kw - 1);
  };
  double best = share(1);
  for (int64_t n = 2; n <= n_max && bytes(n) <= (384 << 10); ++n) best = std::max(best, share(n));
  cv.n = 1;
  while (share(cv.n) < 0.97 * best) ++cv.n;
  cv.out_w = (cv.n - 1) * cv.pitch + g.wo;
  cv.strips = canvas_strips(cv.n, cv.pitch, g.wo);
  cv.wp = cv.strips * kNR + g.kw - 1;
  cv.plane = (cv.rows + g.kh - 1) * cv.wp;
  cv.groups = (bsz + cv.n - 1) / cv.n;
  cv.flat.resize(o.positions.size());
  forward_flat(o, cv.wp, cv.flat.data());
  for (int64_t k = 0; k < cv.strips; ++k) {
    cv.seg_begin.push_back(static_cast<int64_t>(cv.segs.size()));
    const int64_t end = std::min(cv.out_w, (k + 1) * kNR);
    for (int64_t col = k * kNR; col < end;) {
      const int64_t s = col / cv.pitch, x = col % cv.pitch;
      if (x >= g.wo) {
        col += cv.pitch - x;
        continue;
      }
      const int64_t len = std::min(g.wo - x, end - col);
      cv.segs.push_back({col - k * kNR, s, x, len});
      col += len;
    }
    const bool direct = cv.segs.size() - cv.seg_begin.back() == 1 && cv.segs.back().len == kNR;
    cv.direct_sample.push_back(direct ? cv.segs.back().sample : -1);
    cv.direct_x.push_back(direct ? cv.segs.back().x : 0);
  }
  cv.seg_begin.push_back(static_cast<int64_t>(cv.segs.size()));
  return cv;
}

// Input rows y0 - ph .. of the ns samples from x (the group's first sample) into the canvas
// rows of pad (C planes). Columns outside the samples' data are never written, so they stay
// zero from allocation (every item puts a row at the same place); a slot past ns keeps an
// earlier item's sample, which only reaches dropped columns.
template <typename scalar_t>
SYMFAST_AVX2_FMA void fill_canvas(const scalar_t* __restrict x, int64_t ns, int64_t y0, int64_t nrows,
                 const Canvas& cv, float* __restrict pad) {
  for (int64_t ch = 0; ch < cv.c; ++ch)
    for (int64_t lr = 0; lr < nrows + cv.kh - 1; ++lr) {
      const int64_t iy = y0 + lr - cv.ph;
      float* dst = pad + ch * cv.plane + lr * cv.wp;
      if (iy >= 0 && iy < cv.h) {
        for (int64_t s = 0; s < ns; ++s)
          copy_row(dst + s * cv.pitch + cv.pw, x + ((s * cv.c + ch) * cv.h + iy) * cv.w, cv.w);
      } else {
        std::fill(dst, dst + cv.wp, 0.f);
      }
    }
}

// Output rows [y0, y1) of samples b0 .. b0 + ns - 1. y is (B, M, Ho, Wo) fp32; tile is M x kNR.
template <typename scalar_t>
SYMFAST_AVX2_FMA void forward_item(const scalar_t* x, float* y, int64_t b0, int64_t ns, int64_t y0,
                                   int64_t y1, const Canvas& cv, const ThetaPack& tp,
                                   const int32_t* off, int64_t r, const float* bias, float* pad,
                                   float* panel, float* tile) {
  fill_canvas(x + b0 * cv.c * cv.h * cv.w, ns, y0, y1 - y0, cv, pad);
  const int64_t hw = cv.ho * cv.wo, m = tp.m;
  for (int64_t yy = y0; yy < y1; ++yy)
    for (int64_t k = 0; k < cv.strips; ++k) {
      pack_stencil_strip(pad + (yy - y0) * cv.wp + k * kNR, cv.plane, cv.c, cv.flat.data(), off, r,
                         panel, kNR);
      const int64_t ds = cv.direct_sample[k];
      if (ds >= 0 && ds < ns) {
        multiply_panel(tp, panel, bias, y + (b0 + ds) * m * hw + yy * cv.wo + cv.direct_x[k], hw);
        continue;
      }
      multiply_panel(tp, panel, bias, tile, kNR);
      for (int64_t sg = cv.seg_begin[k]; sg < cv.seg_begin[k + 1]; ++sg) {
        const Segment& seg = cv.segs[sg];
        if (seg.sample >= ns) continue;
        float* dst = y + (b0 + seg.sample) * m * hw + yy * cv.wo + seg.x;
        for (int64_t mm = 0; mm < m; ++mm)
          for (int64_t j = 0; j < seg.len; ++j) dst[mm * hw + j] = tile[mm * kNR + seg.col + j];
      }
    }
}

bool fused_applies(const Orbits& o, const Geometry& g) {
  return g.sh == 1 && g.sw == 1 && o.positions.size() <= kMaxKernelPositions && cpu_has_avx2_fma();
}

// y (B, M, Ho, Wo) fp32 = theta (M, C*R) fp32 applied to x (B, C, H, W) fp32 or bf16 (widened as
// it is copied into the canvas). Work items are (group of samples, block of kRowBlock output
// rows), handed out dynamically, so a thread slowed by another process on a shared core does not
// hold the others at the barrier.
template <typename scalar_t>
void tied_conv2d_fused(const scalar_t* xp, int64_t bsz, int64_t c, const float* theta, int64_t m,
                       const float* bias, const Orbits& o, const Geometry& g, float* yp) {
  const Canvas cv = make_canvas(o, g, bsz, c, at::get_num_threads());  // each output sums alike
  const ThetaPack tp = pack_theta(theta, m, c * o.count());
  const int64_t items = cv.groups * cv.blocks;
  Chunks chunks(items, 1);
  parallel_team(items, [&] {
    AlignedFloats pad, panel, tile;
    pad.assign(cv.c * cv.plane);
    panel.assign(tp.k * kNR);
    tile.assign(m * kNR);
    for (int64_t it; chunks.take(it);) {
      const int64_t b0 = (it / cv.blocks) * cv.n, y0 = (it % cv.blocks) * kRowBlock;
      forward_item<scalar_t>(xp, yp, b0, std::min(cv.n, bsz - b0), y0, std::min(g.ho, y0 + kRowBlock),
                             cv, tp, o.offsets.data(), o.count(), bias, pad.data(), panel.data(),
                             tile.data());
    }
  });
}

// gx (B, C, H, W) fp32 from gy (B, O, Ho, Wo) fp32 or bf16 through the forward kernel (see the
// section comment): theta^T, reflected positions, padding kh - 1 - ph. Same-run A/B against the
// previous paths (D4 3x3, batch 64, 2 threads; per sample theta^T @ grad_out strips into
// zero-padded orbit planes of the whole sample and a register gather for planes >= 256 pixels,
// an MKL GEMM over the batch and a scatter below that), in ms: 32->32 at 32x32 7.15 -> 6.47,
// 96->32 at 32x32 17.4 -> 13.8, 128->64 at 16x16 8.28 -> 6.76, 64->64 at 8x8 2.93 -> 1.58,
// 64->64 at 4x4 1.34 -> 0.42, 32->1 at 32x32 2.72 -> 1.16. Slower where O > C: 32->64 at 16x16
// 2.54 -> 3.02 (the stencil now runs over grad_out's O channels instead of the C*R planes).
bool grad_input_fused_applies(const Orbits& o, const Geometry& g) {
  return fused_applies(o, g) && g.ph < g.kh && g.pw < g.kw;
}

template <typename scalar_t>
void tied_conv2d_grad_input_fused(const scalar_t* gyp, const at::Tensor& weight, const Orbits& o,
                                  const Geometry& g, int64_t bsz, float* gxp) {
  Orbits reflected = o;
  for (size_t t = 0; t < o.positions.size(); ++t) {
    reflected.row[t] = static_cast<int32_t>(g.kh - 1 - o.row[t]);
    reflected.col[t] = static_cast<int32_t>(g.kw - 1 - o.col[t]);
    reflected.positions[t] = static_cast<int32_t>(reflected.row[t] * g.kw + reflected.col[t]);
  }
  const Geometry gt = make_geometry(g.ho, g.wo, g.kh, g.kw, 1, 1, g.kh - 1 - g.ph, g.kw - 1 - g.pw);
  TORCH_CHECK(gt.ho == g.h && gt.wo == g.w, "internal: transposed geometry mismatch");
  const int64_t oc = weight.size(0), c = weight.size(1), r = weight.size(2);
  const at::Tensor theta_t = weight.to(at::kFloat).permute({1, 0, 2}).reshape({c, oc * r}).contiguous();
  tied_conv2d_fused<scalar_t>(gyp, bsz, oc, theta_t.data_ptr<float>(), c, nullptr, reflected, gt, gxp);
}

// The 8x8 transpose of r[0..7] in place (row i becomes column i).
SYMFAST_AVX2_FMA __attribute__((always_inline)) inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Canvas pixels per chunk of the weight gradient, and the row stride of its stencil buffer: a
// compile-time stride makes every broadcast below a fixed displacement from one moving pointer
// (with a run-time stride GCC spent an address computation per row and iteration). 256 pixels
// keep S (K x 256) in L2 at K <= 384 while a grad_out panel (256 x 16) is reused from L1.
constexpr int64_t kChunk = 256;
// Row stride of the stencil and grad_out chunks: 1 KB rows put the 288 rows one strip writes into
// 4 of L1's 64 sets; 16 floats more spread them over all of them.
constexpr int64_t kRowStride = kChunk + 16;

// c[i*ldc + 0..8*NV) += sum_q a[i*kRowStride + q] * b[q*8*NV + 0..8*NV) for i < MR, q < npix: a block
// of stencil rows (orbit sums along pixels) times a panel of grad_out transposed to pixel-major.
template <int MR, int NV>
SYMFAST_AVX2_FMA __attribute__((always_inline)) inline void grad_weight_kernel(
    const float* __restrict a, const float* __restrict b, int64_t npix, float* __restrict c,
    int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t q = 0; q < npix; ++q) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) bv[j] = _mm256_loadu_ps(b + q * 8 * NV + 8 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i * kRowStride + q);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_fmadd_ps(ai, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j)
      _mm256_storeu_ps(c + i * ldc + 8 * j, _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8 * j), acc[i][j]));
}

template <int NV>
SYMFAST_AVX2_FMA void grad_weight_panel(const float* a, int64_t k, int64_t npix, const float* b,
                                        float* c, int64_t ldc) {
  // 6 rows x 2 vectors or 8 rows x 1 vector: 12 or 8 accumulators.
  constexpr int64_t kRows = NV == 2 ? 6 : 8;
  for (int64_t k0 = 0; k0 < k; k0 += kRows) {
    const float* ak = a + k0 * kRowStride;
    float* ck = c + k0 * ldc;
    switch (std::min(kRows, k - k0)) {
      case 8: grad_weight_kernel<8, NV>(ak, b, npix, ck, ldc); break;
      case 7: grad_weight_kernel<7, NV>(ak, b, npix, ck, ldc); break;
      case 6: grad_weight_kernel<6, NV>(ak, b, npix, ck, ldc); break;
      case 5: grad_weight_kernel<5, NV>(ak, b, npix, ck, ldc); break;
      case 4: grad_weight_kernel<4, NV>(ak, b, npix, ck, ldc); break;
      case 3: grad_weight_kernel<3, NV>(ak, b, npix, ck, ldc); break;
      case 2: grad_weight_kernel<2, NV>(ak, b, npix, ck, ldc); break;
      default: grad_weight_kernel<1, NV>(ak, b, npix, ck, ldc); break;
    }
  }
}

// Per-thread buffers of the weight gradient.
struct GradWeightScratch {
  AlignedFloats pad, s, g, panels;
};

// grad_out of one strip (M rows of kNR canvas pixels) transposed into the pixel-major panels:
// panels of 16 output channels (the last one 8 when M % 16 <= 8) for pixels q0 .. q0 + 15 of a
// chunk of kChunk pixels; src row o at src + o*lds. Rows past M are zero.
template <typename scalar_t>
SYMFAST_AVX2_FMA __attribute__((always_inline)) inline void transpose_strip(
    const scalar_t* src, int64_t lds, int64_t m, int64_t q0, float* panels) {
  for (int64_t o0 = 0; o0 < m; o0 += 16) {
    const int64_t width = m - o0 <= 8 ? 8 : 16;
    float* panel = panels + o0 * kChunk + q0 * width;
    for (int64_t half = 0; half < width; half += 8)
      for (int64_t c0 = 0; c0 < kNR; c0 += 8) {
        __m256 v[8];
        for (int64_t i = 0; i < 8; ++i) {
          const int64_t o = o0 + half + i;
          v[i] = o < m ? (__m256)symfast::load8_as_float(src + o * lds + c0) : _mm256_setzero_ps();
        }
        transpose8(v);
        for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (c0 + j) * width + half, v[j]);
      }
  }
}
// grad theta^T (K x ldp, partial) += S @ gy^T over output rows [y0, y1) of samples
// b0 .. b0 + ns - 1: the item's (row, strip) pairs in chunks of kChunk pixels; per strip the
// forward's stencil packing (one row of S per orbit and channel) and grad_out transposed into
// pixel-major panels (straight from grad_out when the strip is 16 columns of one sample, else
// through a canvas strip with zeros where the forward drops a column, so those pixels add
// nothing); then the chunk's GEMM.
//
// zero_dropped: the stencil's dropped columns are zeroed too. Their grad_out is 0, but the stencil
// there reads a neighbour's or the sample's own input, and 0 · NaN (or inf) would put a NaN into
// orbits that never touch that input (found by tests/test_fuzz_modules.py: a NaN in a 1x1 input
// made the edge orbits' gradient NaN where it is exactly 0).
template <typename scalar_t>
SYMFAST_AVX2_FMA void grad_weight_item(const scalar_t* x, const scalar_t* gy, int64_t m, int64_t b0,
                                       int64_t ns, int64_t y0, int64_t y1, const Canvas& cv,
                                       const int32_t* off, int64_t r, float* partial, int64_t ldp,
                                       GradWeightScratch& sc, bool zero_dropped) {
  fill_canvas(x + b0 * cv.c * cv.h * cv.w, ns, y0, y1 - y0, cv, sc.pad.data());
  const int64_t hw = cv.ho * cv.wo, k = cv.c * r, units = (y1 - y0) * cv.strips;
  float* s = sc.s.data();
  float* g = sc.g.data();
  float* panels = sc.panels.data();
  for (int64_t u0 = 0; u0 < units; u0 += kChunk / kNR) {
    const int64_t u1 = std::min(units, u0 + kChunk / kNR), npix = (u1 - u0) * kNR;
    // Each strip's row and position, and where grad_out holds its pixels (-1: not one sample's
    // 16 consecutive columns); computed once per chunk, not per channel (an integer division per
    // channel and strip cost a fifth of the GEMM's time).
    int64_t unit_row[kChunk / kNR], unit_strip[kChunk / kNR], unit_src[kChunk / kNR];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t yy = y0 + u / cv.strips, st = u % cv.strips, ds = cv.direct_sample[st];
      unit_row[u - u0] = yy;
      unit_strip[u - u0] = st;
      unit_src[u - u0] = ds >= 0 && ds < ns ? (b0 + ds) * m * hw + yy * cv.wo + cv.direct_x[st] : -1;
      pack_stencil_strip(sc.pad.data() + (yy - y0) * cv.wp + st * kNR, cv.plane, cv.c, cv.flat.data(),
                         off, r, s + (u - u0) * kNR, kRowStride);
      if (zero_dropped && unit_src[u - u0] < 0) {
        bool kept[kNR] = {};
        for (int64_t sg = cv.seg_begin[st]; sg < cv.seg_begin[st + 1]; ++sg)
          if (cv.segs[sg].sample < ns)
            std::fill(kept + cv.segs[sg].col, kept + cv.segs[sg].col + cv.segs[sg].len, true);
        for (int64_t kk = 0; kk < k; ++kk)
          for (int64_t col = 0; col < kNR; ++col)
            if (!kept[col]) s[kk * kRowStride + (u - u0) * kNR + col] = 0.f;
      }
    }
    // grad_out of the chunk's pixels, channel by channel: each channel's rows are read in order.
    for (int64_t o = 0; o < m; ++o)
      for (int64_t j = 0; j < u1 - u0; ++j) {
        float* dst = g + o * kRowStride + j * kNR;
        if (unit_src[j] >= 0) {
          copy_row(dst, gy + unit_src[j] + o * hw, kNR);
          continue;
        }
        std::fill(dst, dst + kNR, 0.f);
        const int64_t st = unit_strip[j];
        for (int64_t sg = cv.seg_begin[st]; sg < cv.seg_begin[st + 1]; ++sg) {
          const Segment& seg = cv.segs[sg];
          if (seg.sample < ns)
            copy_row(dst + seg.col, gy + ((b0 + seg.sample) * m + o) * hw + unit_row[j] * cv.wo + seg.x,
                     seg.len);
        }
      }
    for (int64_t q0 = 0; q0 < npix; q0 += kNR) transpose_strip(g + q0, kRowStride, m, q0, panels);
    for (int64_t o0 = 0; o0 < m; o0 += 16) {
      if (m - o0 <= 8)
        grad_weight_panel<1>(s, k, npix, panels + o0 * kChunk, partial + o0, ldp);
      else
        grad_weight_panel<2>(s, k, npix, panels + o0 * kChunk, partial + o0, ldp);
    }
  }
}

// grad theta (O, C*R) fp32 from x (B, C, H, W) and gy (B, O, Ho, Wo), both fp32 or both bf16.
// Items as in the forward, split into a fixed number of contiguous runs, each summed into its
// own partial (runs claimed dynamically, partials added in order at the end): the result does
// not depend on which thread ran what. Same-run A/B against the previous path (per sample the
// stencil into a (C*R, Ho*Wo) scratch and at::addmm_ into a per-thread partial; one MKL GEMM over
// (C, R, B*Ho*Wo) for planes under 256 pixels), D4 3x3, batch 64, 2 threads, in ms: 32->32 at
// 32x32 7.04 -> 6.08, 96->32 at 32x32 19.6 -> 15.5, 64->64 at 8x8 2.44 -> 1.78, 64->64 at 4x4
// 0.86 -> 0.48, 128->64 at 8x8 4.01 -> 2.97. MKL stays ~10% ahead on 16x16 planes with K = C*R of
// 192-384 (128->64: 8.58 -> 9.60), and 1 output channel uses 1/8 of each 8-wide panel (32->1 at
// 32x32: 2.99 -> 3.95); one kernel for every shape is worth that (the step got faster overall).
//
// A NaN in the result is the one sign that a dropped column may have met a non-finite input: only
// then is the gradient computed again with those columns zeroed (zero_dropped in
// grad_weight_item), which keeps that pass off the path of finite inputs.
template <typename scalar_t>
void tied_conv2d_grad_weight_fused(const scalar_t* xp, const scalar_t* gyp, int64_t bsz, int64_t c,
                                   int64_t m, const Orbits& o, const Geometry& g, float* gw) {
  // Samples per canvas decide which columns one GEMM sums over: planned for a fixed team size, so
  // the gradient's bits do not depend on the thread count. 4 items per "thread" of a team of
  // kGradWeightRuns / 4 leaves an item for each run; more items (fewer samples per canvas) cost
  // 8x8 planes their column share (n = 2 instead of 7 when planned for 8 threads: +15% at 1 thread).
  const Canvas cv = make_canvas(o, g, bsz, c, kGradWeightRuns / 4);
  const int64_t r = o.count(), k = c * r, ldp = (m + 7) / 8 * 8;
  const int64_t items = cv.groups * cv.blocks, runs = std::min<int64_t>(items, kGradWeightRuns);
  std::vector<float> partial(runs * k * ldp);
  const auto compute = [&](bool zero_dropped) {
    std::fill(partial.begin(), partial.end(), 0.f);
    Chunks run_chunks(runs, 1);
    parallel_team(runs, [&] {
      GradWeightScratch sc;
      sc.pad.assign(cv.c * cv.plane);
      sc.s.assign(k * kRowStride);
      sc.g.assign(m * kRowStride);
      sc.panels.assign(ldp * kChunk);
      for (int64_t run; run_chunks.take(run);)
        for (int64_t it = run * items / runs; it < (run + 1) * items / runs; ++it) {
          const int64_t b0 = (it / cv.blocks) * cv.n, y0 = (it % cv.blocks) * kRowBlock;
          grad_weight_item<scalar_t>(xp, gyp, m, b0, std::min(cv.n, bsz - b0), y0,
                                     std::min(g.ho, y0 + kRowBlock), cv, o.offsets.data(), r,
                                     partial.data() + run * k * ldp, ldp, sc, zero_dropped);
        }
    });
    for (int64_t run = 1; run < runs; ++run)
      for (int64_t i = 0; i < k * ldp; ++i) partial[i] += partial[run * k * ldp + i];
    bool nan = false;
    for (int64_t oc = 0; oc < m; ++oc)
      for (int64_t kk = 0; kk < k; ++kk) {
        gw[oc * k + kk] = partial[kk * ldp + oc];
        nan |= std::isnan(gw[oc * k + kk]);
      }
    return nan;
  };
  if (compute(false)) compute(true);
}
#endif

}  // namespace
