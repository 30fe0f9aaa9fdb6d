// CPU kernels for z = silu(group_norm(x + shift[:, :, None, ...], groups, weight, bias, eps)).
//
// x: (B, C, S) contiguous (S = the product of the spatial dims), shift: (B, C) or none,
// weight/bias: (C,) or none. The work is split into (b, g) tiles, each x[b, g*Cg:(g+1)*Cg, :]
// (Cg = C / groups channels, contiguous in memory), and one thread does a whole tile:
//  forward:  the sum of the tile (mean), the sum of squared deviations from it (variance), then
//            z; mean and rstd per (b, g) are returned for the backward;
//  backward: per channel row, sum ga and sum ga * xhat (ga = dL/d(pre-activation), recomputed
//            from x, mean and rstd through silu's derivative), then one pass writing
//            gx = rstd * (w * ga - mean(w * ga) - xhat * mean(w * ga * xhat)) and summing it per
//            channel (the shift's gradient); the per-(b, c) sums give grad weight/bias after a
//            sum over b in a fixed order.
// A UNet tile is 4-12 channels of 16x16 or 32x32 fp32 (16-48 KB per tensor): it stays in L2
// between the passes, so memory sees one read of x and one write of z forward, and one read of
// x and grad_z and one write of gx backward. Every tile's sums have a fixed order, whatever the
// thread count: results are deterministic. fp32/bf16/fp16 compute in fp32 lanes (8 wide: one AVX
// register in the AVX2 clone), with fp32 partial sums over chunks of kChunk elements added up in
// double; fp64 computes in double.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "symfast_module.h"

#define SYMFAST_INLINE __attribute__((always_inline)) inline
#define SYMFAST_LAMBDA_INLINE __attribute__((always_inline))

namespace {

using namespace symfast;

// Elements per fp32 partial sum before it is added in double: each of the 8 lanes adds 32
// values, so the fp32 rounding error of a sum does not grow with the plane size.
constexpr int64_t kChunk = 256;

// acc_t = float: 8 lanes; acc_t = double: scalar code (fp64 is for checks, not speed).
template <typename acc_t>
struct Lanes {
  using V = v8f;
  static constexpr int64_t W = 8;
};
template <>
struct Lanes<double> {
  using V = double;
  static constexpr int64_t W = 1;
};

SYMFAST_INLINE double load_lanes(const double* p, int64_t) { return *p; }

// cnt < 8 (a row's tail) reads only cnt elements; the other lanes are 0.
template <typename scalar_t>
SYMFAST_INLINE v8f load_lanes(const scalar_t* p, int64_t cnt) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cnt == 8) return load8_as_float(p);
  }
  float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < cnt; ++i) buf[i] = static_cast<float>(p[i]);
  return load8(buf);
}

SYMFAST_INLINE void store_lanes(double* p, double v, int64_t) { *p = v; }

// bf16 with round-to-nearest-even, NaN kept NaN (as c10::BFloat16 converts).
SYMFAST_INLINE void store8_bf16(c10::BFloat16* p, v8f v) {
  v8u32 bits;
  std::memcpy(&bits, &v, sizeof bits);
  v8u32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const v8i is_nan = v != v;
  rounded = is_nan ? v8u32{} + 0x7FC0u : rounded;
  const v8u16 half = __builtin_convertvector(rounded, v8u16);
  std::memcpy(p, &half, sizeof half);
}

template <typename scalar_t>
SYMFAST_INLINE void store_lanes(scalar_t* p, v8f v, int64_t cnt) {
  if (cnt == 8) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      store8(p, v);
      return;
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      store8_bf16(p, v);
      return;
    }
  }
  float buf[8];
  store8(buf, v);
  for (int64_t i = 0; i < cnt; ++i) p[i] = static_cast<scalar_t>(buf[i]);
}

SYMFAST_INLINE double hsum(double v) { return v; }
SYMFAST_INLINE double hsum(v8f v) {
  // Pairwise, in a fixed order.
  return (double(v[0]) + double(v[1]) + (double(v[2]) + double(v[3]))) +
         (double(v[4]) + double(v[5]) + (double(v[6]) + double(v[7])));
}

SYMFAST_INLINE double mask_tail(double v, int64_t) { return v; }
SYMFAST_INLINE v8f mask_tail(v8f v, int64_t cnt) {
  if (cnt == 8) return v;
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < v8i{} + static_cast<int>(cnt) ? v : v8f{};
}

// e^t for t in [-87, 0] (Cephes expf: t = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial;
// ~1 ulp). GCC does not vectorise std::exp without -ffast-math; this does, in either clone.
SYMFAST_INLINE v8f exp8_nonpositive(v8f t) {
  const v8f n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const v8f r = (t - n * 0.693359375f) - n * -2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n >= -126: 2^n is a normal float. A NaN t leaves p NaN, whatever n's bits are.
  const v8u32 bits = (v8u32)(__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// sigmoid(a) = 1 / (1 + e^-a) from e = e^-|a| <= 1 (no overflow for either sign); e is floored
// at e^-87 (below that e^-|a| leaves float's normal range), which leaves 1 above a = 87 and, below
// a = -87, e^-87 instead of e^a: silu<true> and silu_grad<true> take those lanes apart. A vrcpps
// estimate plus a Newton step instead of the division measured 5-10% slower (forward and
// backward, (64, 96, 32, 32) and (64, 64, 16, 16) fp32, 1 and 2 threads, interleaved): the loops
// wait on memory, not on vdivps.
constexpr float kSigmoidFloor = -87.0f;  // e^a stays a normal float above it

SYMFAST_INLINE v8f sigmoid(v8f a) {
  v8u32 bits;
  std::memcpy(&bits, &a, sizeof bits);
  bits |= 0x80000000u;  // -|a|
  v8f t;
  std::memcpy(&t, &bits, sizeof t);
  const v8f lowest = v8f{} + kSigmoidFloor;
  t = t < lowest ? lowest : t;
  const v8f e = exp8_nonpositive(t);
  return (a >= v8f{} ? v8f{} + 1.0f : e) / (1.0f + e);
}

SYMFAST_INLINE double sigmoid(double a) {
  const double e = std::exp(-std::abs(a));
  return (a >= 0 ? 1.0 : e) / (1.0 + e);
}

// Below a = -87, f(a) * e^a (silu: f = a; its derivative times the incoming gradient g: f =
// g (1 + a)) taken with 2^64 of headroom, (f e^(a + 64 ln 2)) 2^-64, so that the product is
// rounded once into the subnormal range as the float64 result rounded to float is; 0 below
// a = -110, where it rounds to 0. With sigmoid's e^-87 floor instead, silu was ~1e-36 where it
// is a e^a (1e-211 at a = -491: found by the fuzz suite at 10,000 examples). The loops run the
// plain formulas, track the row's smallest a (one vector min) and run the row again with these
// only when it went below -87: the exact forms cost ~7% of the forward when always taken.
SYMFAST_INLINE v8f times_deep_exp(v8f f, v8f a) {
  const v8f zero_below = v8f{} - 110.0f;
  const v8f e = exp8_nonpositive((a < zero_below ? zero_below : a) + 44.3614195558364998f);
  return a < zero_below ? f * 0.0f : (f * e) * 0x1p-64f;
}

SYMFAST_INLINE bool below_sigmoid_floor(v8f amin) {
  const v8i below = amin < v8f{} + kSigmoidFloor;
  uint64_t w[4];
  std::memcpy(w, &below, sizeof w);
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}
SYMFAST_INLINE bool below_sigmoid_floor(double) { return false; }  // std::exp has no floor

// silu(a) = a sigmoid(a) and g silu'(a), silu'(a) = sig(a) (1 + a (1 - sig(a))); `exact`: also
// right below a = -87 (see times_deep_exp).
template <bool exact, typename V>
SYMFAST_INLINE V silu(V a) {
  const V z = a * sigmoid(a);
  if constexpr (exact && std::is_same_v<V, v8f>) return a < v8f{} + kSigmoidFloor ? times_deep_exp(a, a) : z;
  return z;
}

template <bool exact, typename V>
SYMFAST_INLINE V silu_grad(V g, V a) {
  const V sig = sigmoid(a);
  const V ga = g * (sig * (1.0f + a * (1.0f - sig)));
  if constexpr (exact && std::is_same_v<V, v8f>)
    return a < v8f{} + kSigmoidFloor ? times_deep_exp(g * (1.0f + a), a) : ga;
  return ga;
}

// Calls f(i, cnt) for the lane blocks [i, i + cnt) of [0, n): cnt == W except at the tail.
template <int64_t W, typename F>
SYMFAST_INLINE void for_lanes(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + W <= end; i += W) f(i, W);
  if (i < end) f(i, end - i);
}

// K sums over a row of n elements: f(i, cnt, acc) adds block [i, i + cnt) to the lane
// accumulators acc[0..K); each kChunk-element chunk's lanes are then added in double.
template <int K, typename acc_t, typename F>
SYMFAST_INLINE std::array<double, K> row_sums(int64_t n, F&& f) {
  using V = typename Lanes<acc_t>::V;
  std::array<double, K> total{};
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    std::array<V, K> acc{};
    for_lanes<Lanes<acc_t>::W>(c0, std::min(n, c0 + kChunk),
                               [&](int64_t i, int64_t cnt) SYMFAST_LAMBDA_INLINE { f(i, cnt, acc); });
    for (int k = 0; k < K; ++k) total[k] += hsum(acc[k]);
  }
  return total;
}

struct Shape {
  int64_t batch, channels, groups, spatial;
  int64_t per_group() const { return channels / groups; }
  int64_t tile() const { return per_group() * spatial; }  // elements of one (b, g) tile
};

// What one (b, g) tile reads besides x: its channels' shift, weight and bias (0, 1, 0 when
// absent).
template <typename scalar_t>
struct TileParams {
  const scalar_t *shift, *weight, *bias;
  double shift_of(int64_t b, int64_t c, int64_t channels) const {
    return shift ? static_cast<double>(shift[b * channels + c]) : 0.0;
  }
  double weight_of(int64_t c) const { return weight ? static_cast<double>(weight[c]) : 1.0; }
  double bias_of(int64_t c) const { return bias ? static_cast<double>(bias[c]) : 0.0; }
};

// What x is centred on in channel c of a tile: x - centre = (x + shift) - mean, with
// centre = mean - shift rounded once (no cancellation when |mean| >> std). A tile of one element
// is centred on that element itself: its x - mean is 0 by definition, where fl(mean - shift)
// could miss x by an ulp of |x + shift| and leave ~ulp/sqrt(eps) instead of silu(bias).
template <typename acc_t, typename scalar_t>
SYMFAST_INLINE acc_t centre_of(const TileParams<scalar_t>& prm, acc_t mean, const scalar_t* tile_x,
                               const Shape& sh, int64_t b, int64_t c) {
  if (sh.tile() == 1) return static_cast<acc_t>(tile_x[0]);
  return static_cast<acc_t>(mean - prm.shift_of(b, c, sh.channels));
}

// The forward's last pass over a tile pulls the next tile this thread will do into L2 (one hint
// per lane block, running ahead at the same pace), so its first pass does not wait on memory
// with the core idle: forward 5.3 -> 4.5 ms at (64, 96, 32, 32), 1.0 -> 0.9 ms at
// (64, 64, 16, 16) (fp32, 2 threads, interleaved on the 2-core machine). The backward, which
// would pull x and grad_z, measured 5-10% slower with it and goes without.
template <typename scalar_t>
SYMFAST_INLINE void prefetch_next(const scalar_t* next, int64_t offset) {
  if (next) __builtin_prefetch(next + offset, 0, 2);
}

struct ForwardArgs {
  Shape sh;
  double eps;
};

template <typename scalar_t, typename acc_t>
SYMFAST_INLINE void forward_tile(const scalar_t* __restrict x, const TileParams<scalar_t>& prm,
                                 scalar_t* __restrict z, acc_t* __restrict mean_out,
                                 acc_t* __restrict rstd_out, const ForwardArgs& args, int64_t t,
                                 int64_t next_t) {
  using V = typename Lanes<acc_t>::V;
  const Shape& sh = args.sh;
  const int64_t cg = sh.per_group(), s = sh.spatial;
  const double count = static_cast<double>(sh.tile());
  const int64_t b = t / sh.groups, c0 = (t % sh.groups) * cg;
  const scalar_t* xt = x + t * sh.tile();
  scalar_t* zt = z + t * sh.tile();
  const scalar_t* xn = next_t >= 0 ? x + next_t * sh.tile() : nullptr;
  double total = 0;
  for (int64_t j = 0; j < cg; ++j) {
    const scalar_t* row = xt + j * s;
    total += row_sums<1, acc_t>(s, [&](int64_t i, int64_t cnt, std::array<V, 1>& acc)
                                       SYMFAST_LAMBDA_INLINE { acc[0] += load_lanes(row + i, cnt); })[0] +
             static_cast<double>(s) * prm.shift_of(b, c0 + j, sh.channels);
  }
  // The mean as the backward will see it (rounded to acc_t), so both recompute the same xhat.
  const acc_t mean = static_cast<acc_t>(total / count);
  // Squared deviations from the mean, minus the (tiny) square of the deviations' sum, which
  // makes up for the rounding of the mean (the "corrected two-pass" variance); the tile is in
  // L2 by now, so the second pass costs no memory traffic.
  double dev = 0, dev2 = 0;
  for (int64_t j = 0; j < cg; ++j) {
    const scalar_t* row = xt + j * s;
    const acc_t d = centre_of(prm, mean, xt, sh, b, c0 + j);
    const auto sums = row_sums<2, acc_t>(s, [&](int64_t i, int64_t cnt, std::array<V, 2>& acc)
                                                SYMFAST_LAMBDA_INLINE {
      const V v = mask_tail(load_lanes(row + i, cnt) - d, cnt);
      acc[0] += v;
      acc[1] += v * v;
    });
    dev += sums[0];
    dev2 += sums[1];
  }
  // Clamped at 0 by a comparison, not std::max(0.0, .), which turned a NaN variance (a -inf
  // in the group) into 0 and the group's outputs into +-inf instead of NaN.
  const double raw_var = (dev2 - dev * dev / count) / count;
  const double var = raw_var < 0.0 ? 0.0 : raw_var;
  const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var + args.eps));
  for (int64_t j = 0; j < cg; ++j) {
    const int64_t c = c0 + j;
    const scalar_t* row = xt + j * s;
    scalar_t* out = zt + j * s;
    const acc_t d = centre_of(prm, mean, xt, sh, b, c);
    const acc_t scale = rstd * static_cast<acc_t>(prm.weight_of(c));
    const acc_t offset = static_cast<acc_t>(prm.bias_of(c));
    V amin = V{} + std::numeric_limits<acc_t>::infinity();
    const auto silu_row = [&](auto exact) SYMFAST_LAMBDA_INLINE {
      for_lanes<Lanes<acc_t>::W>(0, s, [&](int64_t i, int64_t cnt) SYMFAST_LAMBDA_INLINE {
        prefetch_next(xn, j * s + i);
        // (x - d) * scale, not x * scale - d * scale: no cancellation when |mean| >> std.
        const V a = (load_lanes(row + i, cnt) - d) * scale + offset;
        if constexpr (!decltype(exact)::value) amin = a < amin ? a : amin;
        store_lanes(out + i, silu<decltype(exact)::value>(a), cnt);
      });
    };
    silu_row(std::false_type{});
    if (below_sigmoid_floor(amin)) silu_row(std::true_type{});
  }
  mean_out[t] = mean;
  rstd_out[t] = rstd;
}

// Rows of the per-thread ga scratch are padded to whole lane blocks (full loads and stores).
template <typename acc_t>
int64_t padded_row(int64_t s) {
  constexpr int64_t W = Lanes<acc_t>::W;
  return (s + W - 1) / W * W;
}

// Per-(b, c) sums the backward needs, in double: sum ga and sum ga * xhat over the plane.
struct ChannelSums {
  double* ga;
  double* ga_xhat;
};

template <typename scalar_t, typename acc_t>
SYMFAST_INLINE void backward_tile(const scalar_t* __restrict gz, const scalar_t* __restrict x,
                                  const TileParams<scalar_t>& prm, const acc_t* __restrict mean_in,
                                  const acc_t* __restrict rstd_in, scalar_t* __restrict gx,
                                  scalar_t* __restrict gshift, const ChannelSums& sums,
                                  const Shape& sh, acc_t* __restrict ga_tile, int64_t t) {
  using V = typename Lanes<acc_t>::V;
  constexpr int64_t W = Lanes<acc_t>::W;
  const int64_t cg = sh.per_group(), s = sh.spatial;
  const double count = static_cast<double>(sh.tile());
  const int64_t b = t / sh.groups, c0 = (t % sh.groups) * cg;
  const int64_t base = t * sh.tile();
  const acc_t mean = mean_in[t], rstd = rstd_in[t];
  const int64_t ps = padded_row<acc_t>(s);
  // Pass 1: ga = gz * silu'(a), a = xhat * w + bias, silu'(a) = sig(a) (1 + a (1 - sig(a))),
  // kept in ga_tile (L1/L2) for pass 2 instead of recomputing the sigmoid.
  double group_ga_xhat = 0;  // sum over the tile of w * ga * xhat
  double group_kga_ga = 0;   // sum over the tile of k_ga * ga, k_ga = rstd * w as pass 2 rounds it
  double group_xhat = 0;     // sum over the tile of xhat as pass 2 computes it (0 but for rounding)
  for (int64_t j = 0; j < cg; ++j) {
    const int64_t c = c0 + j;
    const scalar_t *xr = x + base + j * s, *gr = gz + base + j * s;
    acc_t* gar = ga_tile + j * ps;
    const acc_t d = centre_of(prm, mean, x + base, sh, b, c);
    const acc_t w = static_cast<acc_t>(prm.weight_of(c)), bias = static_cast<acc_t>(prm.bias_of(c));
    V amin = V{} + std::numeric_limits<acc_t>::infinity();
    const auto pass1 = [&](auto exact) SYMFAST_LAMBDA_INLINE {
      return row_sums<3, acc_t>(s, [&](int64_t i, int64_t cnt, std::array<V, 3>& acc)
                                       SYMFAST_LAMBDA_INLINE {
        const V xhat = (load_lanes(xr + i, cnt) - d) * rstd;
        const V a = xhat * w + bias;
        if constexpr (!decltype(exact)::value) amin = a < amin ? a : amin;
        const V ga = mask_tail(silu_grad<decltype(exact)::value>(load_lanes(gr + i, cnt), a), cnt);
        store_lanes(gar + i, ga, W);  // ga_tile rows are padded to whole lane blocks
        acc[0] += ga;
        acc[1] += ga * xhat;
        acc[2] += mask_tail(xhat, cnt);
      });
    };
    auto r = pass1(std::false_type{});
    if (below_sigmoid_floor(amin)) r = pass1(std::true_type{});
    sums.ga[b * sh.channels + c] = r[0];
    sums.ga_xhat[b * sh.channels + c] = r[1];
    group_ga_xhat += static_cast<double>(w) * r[1];
    group_kga_ga += static_cast<double>(rstd * w) * r[0];
    group_xhat += r[2];
  }
  // Pass 2: gx = rstd * (w ga - m1 - xhat m2) = ga k_ga - xhat k_xhat - k_mean, with m1, m2 the
  // tile means of w ga and w ga xhat; its per-channel sum is the shift's gradient. Its sum over
  // the tile is 0 in exact arithmetic, and every gradient upstream of a shift added per group
  // (the UNet's time embedding) is made of that sum: k_mean is taken so that the sum of the
  // terms pass 2 actually forms is 0 (its k_ga and k_xhat rounded, its xhat, whose mean the
  // rounded mean of the forward leaves off 0, which the exact gradient corrects for), and
  // subtracted as two floats (hi + lo), so that its own rounding does not shift every element
  // of the tile the same way. With k_mean rounded once, the sum's error grew with the tile,
  // ~8x torch's at the tail of fuzzed draws.
  const acc_t k_xhat = static_cast<acc_t>(rstd * (group_ga_xhat / count));
  const double k_mean = (group_kga_ga - static_cast<double>(k_xhat) * group_xhat) / count;
  const acc_t k_mean_hi = static_cast<acc_t>(k_mean);
  const acc_t k_mean_lo = static_cast<acc_t>(k_mean - static_cast<double>(k_mean_hi));
  for (int64_t j = 0; j < cg; ++j) {
    const int64_t c = c0 + j;
    const scalar_t* xr = x + base + j * s;
    const acc_t* gar = ga_tile + j * ps;
    scalar_t* out = gx + base + j * s;
    const acc_t d = centre_of(prm, mean, x + base, sh, b, c);
    const acc_t k_ga = rstd * static_cast<acc_t>(prm.weight_of(c));
    const auto r = row_sums<1, acc_t>(s, [&](int64_t i, int64_t cnt, std::array<V, 1>& acc)
                                             SYMFAST_LAMBDA_INLINE {
      const V xhat = (load_lanes(xr + i, cnt) - d) * rstd;
      const V g = ((load_lanes(gar + i, W) * k_ga - xhat * k_xhat) - k_mean_hi) - k_mean_lo;
      store_lanes(out + i, g, cnt);
      acc[0] += mask_tail(g, cnt);
    });
    gshift[b * sh.channels + c] = static_cast<scalar_t>(r[0]);
  }
}

// Tiles are handed out one at a time from a shared counter (a thread slowed by another process
// on a shared core does not hold the others at the barrier); each tile is computed by one thread
// in a fixed order, so results do not depend on the schedule. Each thread claims its next tile
// before doing the current one (the forward prefetches it).
template <typename F>
SYMFAST_INLINE void for_each_tile(std::atomic<int64_t>& next, int64_t tiles, F&& f) {
  for (int64_t t = next++; t < tiles;) {
    const int64_t claimed = next++;
    f(t, claimed < tiles ? claimed : -1);
    t = claimed;
  }
}

// Two builds of each tile loop, picked at run time: AVX2+FMA (fused multiply-adds in the
// exponential's polynomial and the normalisation) and the baseline ISA.
#define SYMFAST_GNS_TILE_LOOPS(SUFFIX, TARGET)                                                       \
  template <typename scalar_t, typename acc_t>                                                  \
  TARGET void forward_tiles_##SUFFIX(const scalar_t* x, TileParams<scalar_t> prm, scalar_t* z,  \
                                     acc_t* mean, acc_t* rstd, ForwardArgs args,                \
                                     std::atomic<int64_t>* next) {                              \
    for_each_tile(*next, args.sh.batch * args.sh.groups, [&](int64_t t, int64_t n)              \
                                                             SYMFAST_LAMBDA_INLINE {            \
      forward_tile<scalar_t, acc_t>(x, prm, z, mean, rstd, args, t, n);                         \
    });                                                                                         \
  }                                                                                             \
  template <typename scalar_t, typename acc_t>                                                  \
  TARGET void backward_tiles_##SUFFIX(const scalar_t* gz, const scalar_t* x,                    \
                                      TileParams<scalar_t> prm, const acc_t* mean,              \
                                      const acc_t* rstd, scalar_t* gx, scalar_t* gshift,        \
                                      ChannelSums sums, Shape sh, std::atomic<int64_t>* next) { \
    std::vector<acc_t> ga_tile(sh.per_group() * padded_row<acc_t>(sh.spatial));                 \
    for_each_tile(*next, sh.batch * sh.groups, [&](int64_t t, int64_t) SYMFAST_LAMBDA_INLINE {   \
      backward_tile<scalar_t, acc_t>(gz, x, prm, mean, rstd, gx, gshift, sums, sh,                \
                                     ga_tile.data(), t);                                        \
    });                                                                                         \
  }

SYMFAST_GNS_TILE_LOOPS(baseline, )
#if defined(__x86_64__) && defined(__GNUC__)
SYMFAST_GNS_TILE_LOOPS(avx2_fma, __attribute__((target("avx2,fma"))))
#endif

Shape check_inputs(const char* fn, const at::Tensor& x, const std::optional<at::Tensor>& shift,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), fn, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, fn, ": x must be (B, C, *spatial), got ", x.sizes());
  const int64_t b = x.size(0), c = x.size(1);
  TORCH_CHECK(groups >= 1 && c % groups == 0, fn, ": groups = ", groups,
              " must be >= 1 and divide C = ", c);
  const auto check_param = [&](const std::optional<at::Tensor>& t, const char* name,
                               at::IntArrayRef shape) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), fn, ": ", name,
                " must be a CPU ", x.scalar_type(), " tensor like x, got ", t->scalar_type(),
                " on ", t->device());
    TORCH_CHECK(t->sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ",
                t->sizes());
  };
  check_param(shift, "shift", {b, c});
  check_param(weight, "weight", {c});
  check_param(bias, "bias", {c});
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {b, c, groups, spatial};
}

template <typename scalar_t>
TileParams<scalar_t> params_of(const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& bias) {
  return {shift.defined() ? shift.data_ptr<scalar_t>() : nullptr,
          weight.defined() ? weight.data_ptr<scalar_t>() : nullptr,
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr};
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

at::ScalarType stats_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Threads to start: one per ~32K elements (amortises the OpenMP fork), at most one per tile.
int64_t threads_for(const Shape& sh) {
  const int64_t tiles = sh.batch * sh.groups;
  const int64_t by_size = std::max<int64_t>(1, tiles * sh.tile() / 32768);
  return std::min<int64_t>({tiles, by_size, at::get_num_threads()});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    int64_t groups, double eps) {
  const Shape sh = check_inputs("group_norm_silu_cpu", x_in, shift_in, weight_in, bias_in, groups);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "group_norm_silu_cpu: eps must be finite and >= 0, got ",
              eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor shift = contiguous_or_undefined(shift_in);
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  at::Tensor z = at::empty_like(x);
  const auto stats_options = x.options().dtype(stats_type(x.scalar_type()));
  at::Tensor mean = at::zeros({sh.batch, groups}, stats_options);
  at::Tensor rstd = at::zeros({sh.batch, groups}, stats_options);
  if (x.numel() == 0) return {z, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const TileParams<scalar_t> prm = params_of<scalar_t>(shift, weight, bias);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    const ForwardArgs args{sh, eps};
    std::atomic<int64_t> next{0};
    parallel_team(threads_for(sh), [&] {
#if defined(__x86_64__) && defined(__GNUC__)
      if (cpu_has_avx2_fma()) {
        forward_tiles_avx2_fma<scalar_t, acc_t>(xp, prm, zp, mp, rp, args, &next);
        return;
      }
#endif
      forward_tiles_baseline<scalar_t, acc_t>(xp, prm, zp, mp, rp, args, &next);
    });
  });
  return {z, mean, rstd};
}

// Returns (grad x, grad shift (B, C), grad weight (C,), grad bias (C,)); the last three are
// computed whether or not shift/weight/bias were given (their sums are needed for grad x anyway).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_z_in, const at::Tensor& x_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t groups) {
  const char* fn = "group_norm_silu_backward_cpu";
  const Shape sh = check_inputs(fn, x_in, shift_in, weight_in, bias_in, groups);
  TORCH_CHECK(grad_z_in.device().is_cpu() && grad_z_in.scalar_type() == x_in.scalar_type() &&
                  grad_z_in.sizes() == x_in.sizes(),
              fn, ": grad_z must be a CPU tensor of x's dtype and shape ", x_in.sizes(), ", got ",
              grad_z_in.scalar_type(), " ", grad_z_in.sizes());
  const auto st = stats_type(x_in.scalar_type());
  for (const at::Tensor* t : {&mean_in, &rstd_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == st && t->dim() == 2 &&
                    t->size(0) == sh.batch && t->size(1) == groups,
                fn, ": mean and rstd must be CPU ", st, " tensors of shape (", sh.batch, ", ",
                groups, "), got ", t->scalar_type(), " ", t->sizes());
  }
  const at::Tensor x = x_in.contiguous(), grad_z = grad_z_in.contiguous();
  const at::Tensor shift = contiguous_or_undefined(shift_in);
  const at::Tensor weight = contiguous_or_undefined(weight_in);
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gshift = at::zeros({sh.batch, sh.channels}, x.options());
  at::Tensor gweight = at::zeros({sh.channels}, x.options());
  at::Tensor gbias = at::zeros({sh.channels}, x.options());
  if (x.numel() == 0) return {gx, gshift, gweight, gbias};
  std::vector<double> ga(sh.batch * sh.channels), ga_xhat(sh.batch * sh.channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const TileParams<scalar_t> prm = params_of<scalar_t>(shift, weight, bias);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gsp = gshift.data_ptr<scalar_t>();
    const ChannelSums sums{ga.data(), ga_xhat.data()};
    std::atomic<int64_t> next{0};
    parallel_team(threads_for(sh), [&] {
#if defined(__x86_64__) && defined(__GNUC__)
      if (cpu_has_avx2_fma()) {
        backward_tiles_avx2_fma<scalar_t, acc_t>(gzp, xp, prm, mp, rp, gxp, gsp, sums, sh, &next);
        return;
      }
#endif
      backward_tiles_baseline<scalar_t, acc_t>(gzp, xp, prm, mp, rp, gxp, gsp, sums, sh, &next);
    });
    // grad weight = sum over b of sum ga * xhat, grad bias = sum over b of sum ga: b in order.
    scalar_t* gwp = gweight.data_ptr<scalar_t>();
    scalar_t* gbp = gbias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < sh.channels; ++c) {
      double w = 0, bsum = 0;
      for (int64_t b = 0; b < sh.batch; ++b) {
        w += ga_xhat[b * sh.channels + c];
        bsum += ga[b * sh.channels + c];
      }
      gwp[c] = static_cast<scalar_t>(w);
      gbp[c] = static_cast<scalar_t>(bsum);
    }
  });
  return {gx, gshift, gweight, gbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def("group_norm_silu_cpu(Tensor x, Tensor? shift, Tensor? weight, Tensor? bias, int groups, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_backward_cpu(Tensor grad_z, Tensor x, Tensor? shift, Tensor? weight, "
        "Tensor? bias, Tensor mean, Tensor rstd, int groups) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("group_norm_silu_cpu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward_cpu", &group_norm_silu_backward_cpu);
}

SYMFAST_PY_MODULE()
