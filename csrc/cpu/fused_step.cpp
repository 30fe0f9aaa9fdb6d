// CPU kernel for symfast::fused_step: one sampler step's elementwise work in one pass.
//
// x: (M, N) state rows (M = B * R, R rows per sample, N = size of the dims the group acts on)
// y: (G, M, N) raw network outputs on the orbit; inverse_table (G, N) int32 gathers g_k^-1
//    (encoding: symfast/groups.py; t >= 0 -> +src[t], t < 0 -> -src[~t])
//   ybar     = 1/G sum_k g_k^-1 y_k
//   denoised = c_skip x + c_out ybar
//   x_next   = a x + b denoised + p u + q v + c z
// z: a given noise tensor, or Philox4x32-10 normals keyed by key[b] = (seed, stream): element
// e = r * N + i of a sample is normal e % 4 of counter (e / 4, step, stream, 0), whose four words
// make two Box-Muller pairs of two normals each (Triton's randn4x; symfast/philox.py), optionally
// gathered through noise_table (N,) int32 so that z <- g z. A float64 step takes the same Philox
// words through Box-Muller in float64.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "orbit_plan.h"
#include "symfast_module.h"

namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

// The inverse table's indices are validated by symfast::cached_plan, which plans it before any
// read; only the noise table, gathered directly, needs its bounds checked here.
inline void check_table(const at::Tensor& table, int64_t rows, int64_t n, const char* name,
                        bool check_bounds) {
  TORCH_CHECK(table.scalar_type() == at::kInt, name, " must be int32, got ", table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == rows && table.size(1) == n, name,
              " must have shape (", rows, ", ", n, "), got ", table.sizes());
  if (!check_bounds) return;
  const int32_t* t = table.data_ptr<int32_t>();
  bool in_bounds = true;
  for (int64_t i = 0; i < table.numel(); ++i) in_bounds &= symfast::decode(t[i]) < n;
  TORCH_CHECK(in_bounds, name, " holds an index outside [0, ", n, ")");
}

// log(x) for x in [1e-7, 1], cos(x) and sin(x) for x in [0, 2*pi), in plain branch-free float
// code (the Cephes single-precision algorithms, within ~1 ulp of libm) so that the Box-Muller loop
// vectorises: the scalar libm calls kept it element by element, 15 ms for the noise of a
// (64, 3, 64, 64) step against 1.8 ms for the rest of it. The range reduction of log is musl's
// logf one, x = 2^e (1 + m) with 1 + m in [sqrt(1/2), sqrt(2)) by integer arithmetic alone: the
// same e and m as Cephes' frexp-and-compare, bit for bit, but GCC had if-converted the compare
// by computing the whole polynomial and sqrt for both sides (Box-Muller 3.1 -> 2.5 ns/normal).
inline float log_unit(float x) {
  const uint32_t ix = __builtin_bit_cast(uint32_t, x) + (0x3F800000u - 0x3F3504F3u);
  const float e = static_cast<float>(static_cast<int32_t>(ix >> 23) - 127);
  const float m = __builtin_bit_cast(float, (ix & 0x007FFFFFu) + 0x3F3504F3u) - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// cos(x) and sin(x) for x in [0, 2*pi): Cephes' octant reduction, z = x - y pi/4 with y the
// even octant nearest x (pi/4 in three parts, each part's product with y exact), then
// polynomials on |z| <= pi/4; which polynomial and sign give cos x and sin x follows from y.
template <typename T>
struct SinCos {
  T cos, sin;
};

template <typename T>
struct Octant {
  T z;
  bool swap, negate_cos, negate_sin;
};

template <typename T>
inline Octant<T> octant(T x, T four_over_pi, T dp1, T dp2, T dp3) {
  int32_t j = static_cast<int32_t>(x * four_over_pi);
  j += j & 1;
  const T y = static_cast<T>(j);
  j &= 7;
  const bool flip_half = j > 3;
  j = flip_half ? j - 4 : j;
  return {((x - y * dp1) - y * dp2) - y * dp3, static_cast<bool>((j == 1) | (j == 2)),
          flip_half != (j > 1), flip_half};
}

template <typename T>
inline SinCos<T> from_octant(const Octant<T>& o, T sin_poly, T cos_poly) {
  const T c = o.swap ? sin_poly : cos_poly, s = o.swap ? cos_poly : sin_poly;
  return {o.negate_cos ? -c : c, o.negate_sin ? -s : s};
}

// Cephes' cosf and sinf, which share the reduction and both polynomials.
inline SinCos<float> sincos_nonneg(float x) {
  const Octant<float> o = octant(x, 1.27323954473516f, 0.78515625f, 2.4187564849853515625e-4f,
                                 3.77489497744594108e-8f);
  const float z = o.z, zz = z * z;
  const float sin_poly =
      ((-1.9515295891e-4f * zz + 8.3321608736e-3f) * zz - 1.6666654611e-1f) * zz * z + z;
  const float cos_poly =
      ((2.443315711809948e-5f * zz - 1.388731625493765e-3f) * zz + 4.166664568298827e-2f) * zz *
          zz -
      0.5f * zz + 1.f;
  return from_octant(o, sin_poly, cos_poly);
}

// The Philox key and the counter words shared by a row: counter (q, step, stream, 0).
struct PhiloxRow {
  uint32_t step, stream, k0, k1;
};

// Philox4x32-10 of the counters (q0 + j, step, stream, 0), j < count, all four output words, laid
// out as the two Box-Muller pairs of each counter: pair 2j = (w0, w1), pair 2j + 1 = (w2, w3),
// a[p] and b[p] the pair's first and second word.
void philox_pairs_scalar(uint32_t q0, int64_t count, const PhiloxRow& key, uint32_t* __restrict a,
                         uint32_t* __restrict b) {
  for (int64_t j = 0; j < count; ++j) {
    uint32_t c0 = q0 + static_cast<uint32_t>(j), c1 = key.step, c2 = key.stream, c3 = 0;
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    a[2 * j] = c0;
    b[2 * j] = c1;
    a[2 * j + 1] = c2;
    b[2 * j + 1] = c3;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(SYMFAST_BASELINE_ISA)
#define SYMFAST_X86_AVX2 1
// The same rounds, 16 counters at a time. Each 32-bit word sits in the low half of a 64-bit lane,
// 4 counters to a register, so that a round is one vpmuludq per product, a shift for its high
// word and xors: the low word is the product itself (its high half is garbage that vpmuludq never
// reads), and (w0, w2) or (w1, w3) of a counter are one 64-bit lane apart from a blend, the pair
// layout of philox_pairs_scalar. GCC's own vectorisation of the scalar loop spent ~12 shuffles
// per product widening and narrowing lanes: 7.7 ns per counter against 1.9 ns here (one thread,
// Zen 3); 4 chains in flight beat 2 (2.4 ns) and 6 (2.2 ns, register spills). The tail of fewer
// than 16 counters takes the scalar loop.
__attribute__((target("avx2"))) void philox_pairs(uint32_t q0, int64_t count, const PhiloxRow& key,
                                                  uint32_t* __restrict a, uint32_t* __restrict b) {
  constexpr int kChains = 4;
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int32_t>(kRoundA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int32_t>(kRoundB));
  const __m256i weyl_a = _mm256_set1_epi32(static_cast<int32_t>(kKeyA));
  const __m256i weyl_b = _mm256_set1_epi32(static_cast<int32_t>(kKeyB));
  const __m256i step = _mm256_set1_epi32(static_cast<int32_t>(key.step));
  const __m256i stream = _mm256_set1_epi32(static_cast<int32_t>(key.stream));
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0);
  int64_t j = 0;
  for (; j + 4 * kChains <= count; j += 4 * kChains) {
    __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    for (int h = 0; h < kChains; ++h) {
      c0[h] = _mm256_add_epi32(_mm256_set1_epi64x(q0 + static_cast<uint32_t>(j + 4 * h)), lane);
      c1[h] = step;
      c2[h] = stream;
      c3[h] = _mm256_setzero_si256();
    }
    __m256i k0 = _mm256_set1_epi32(static_cast<int32_t>(key.k0));
    __m256i k1 = _mm256_set1_epi32(static_cast<int32_t>(key.k1));
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      for (int h = 0; h < kChains; ++h) {
        const __m256i pb = _mm256_mul_epu32(c2[h], mul_b);
        const __m256i pa = _mm256_mul_epu32(c0[h], mul_a);
        c0[h] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), _mm256_xor_si256(c1[h], k0));
        c2[h] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), _mm256_xor_si256(c3[h], k1));
        c1[h] = pb;
        c3[h] = pa;
      }
      k0 = _mm256_add_epi32(k0, weyl_a);
      k1 = _mm256_add_epi32(k1, weyl_b);
    }
    for (int h = 0; h < kChains; ++h) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 2 * (j + 4 * h)),
                          _mm256_blend_epi32(c0[h], _mm256_slli_epi64(c2[h], 32), 0xAA));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + 2 * (j + 4 * h)),
                          _mm256_blend_epi32(c1[h], _mm256_slli_epi64(c3[h], 32), 0xAA));
    }
  }
  philox_pairs_scalar(q0 + static_cast<uint32_t>(j), count - j, key, a + 2 * j, b + 2 * j);
}
#endif

// Without AVX2 (picked at load time, as SYMFAST_MULTIVERSION does).
#ifdef SYMFAST_X86_AVX2
__attribute__((target("default")))
#endif
void philox_pairs(uint32_t q0, int64_t count, const PhiloxRow& key, uint32_t* __restrict a,
                  uint32_t* __restrict b) {
  philox_pairs_scalar(q0, count, key, a, b);
}

// Triton's uint32 -> [0, 1) map on the int32 bit pattern, before its scale: x < 0 ? ~x : x.
inline int32_t uniform_bits(uint32_t w) {
  const int32_t i = static_cast<int32_t>(w);
  return i < 0 ? ~i : i;
}

// c[0] x^(N-1) + c[1] x^(N-2) + ... + c[N-1], by Horner's rule from c[0]: one evaluation order
// for every series below, so the bits do not depend on how a series is written out.
template <size_t N>
inline double horner(double x, const double (&c)[N]) {
  double p = c[0];
  for (size_t i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}

// The float64 twins of log_unit and sincos_nonneg, branch-free so that they vectorise (libm's
// scalar calls cost 16-20 ns per normal, these 4.1 ns; one thread, Zen 3), within 3 ulp of libm
// (measured over 5M arguments: log 2.2e-16 relative, sin and cos 2.2e-16 absolute, the normals
// 6.3e-16 relative). log: x = 2^e m with m in [sqrt(1/2), sqrt(2)) by integer arithmetic,
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^23 (the next term
// is < 1e-19 of log m).
inline double log_unit(double x) {
  const uint64_t ix =
      __builtin_bit_cast(uint64_t, x) + (0x3FF0000000000000ull - 0x3FE6A09E667F3BCDull);
  // e exactly, without an int64 -> double conversion (none in AVX2): 2^52 + k has k in its mantissa
  const double e = __builtin_bit_cast(double, 0x4330000000000000ull | (ix >> 52)) -
                   (4503599627370496.0 + 1023.0);
  const double m = __builtin_bit_cast(double, (ix & 0x000FFFFFFFFFFFFFull) + 0x3FE6A09E667F3BCDull);
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  constexpr double kAtanh[] = {1.0 / 23, 1.0 / 21, 1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13,
                               1.0 / 11, 1.0 / 9,  1.0 / 7,  1.0 / 5,  1.0 / 3};
  const double p = horner(s2, kAtanh);
  const double log_m = 2.0 * s + 2.0 * s * s2 * p;
  // ln 2 = ln2_hi + ln2_lo, ln2_hi with trailing zero bits so that e * ln2_hi is exact
  return e * 6.93147180369123816490e-01 + (log_m + e * 1.90821492927058770002e-10);
}

// sin and cos in float64: Cephes' sin.c reduction constants, then Taylor series on |z| <= pi/4 to
// z^17 and z^18 (the next terms < 1e-19).
inline SinCos<double> sincos_nonneg(double x) {
  const Octant<double> o = octant(x, 1.27323954473516268615, 7.85398125648498535156e-1,
                                  3.77489470793079817668e-8, 2.69515142907905952645e-15);
  const double z = o.z, zz = z * z;
  // 1/17!, -1/15!, ..., -1/3! and -1/18!, 1/16!, ..., 1/4!
  constexpr double kSin[] = {1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0,
                             -1.0 / 39916800.0,       1.0 / 362880.0,         -1.0 / 5040.0,
                             1.0 / 120.0,             -1.0 / 6.0};
  constexpr double kCos[] = {-1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                             1.0 / 479001600.0,         -1.0 / 3628800.0,       1.0 / 40320.0,
                             -1.0 / 720.0,              1.0 / 24.0};
  return from_octant(o, z + z * zz * horner(zz, kSin), 1.0 - 0.5 * zz + zz * zz * horner(zz, kCos));
}

// Box-Muller of each word pair, both outputs, as Triton's pair_uniform_to_normal:
// z[2p] = r cos(th), z[2p + 1] = r sin(th). In float32 as Triton, or in float64 for a float64
// step (symfast/philox.py's float64 normals, the uniforms the 31-bit integers times 2^-31
// exactly), so that the step agrees with the reference to float64 precision (float32 normals,
// whose log and cos differ from torch's in the last bits, left it ~3e-8 off).
template <typename T>
__attribute__((always_inline)) inline void box_muller_loop(const uint32_t* __restrict a,
                                                           const uint32_t* __restrict b,
                                                           int64_t pairs, T* __restrict z) {
  const T scale = std::is_same<T, float>::value ? T(4.6566127342e-10f) : T(1.0 / 2147483648.0);
  for (int64_t p = 0; p < pairs; ++p) {
    const T u1 = std::max(T(1.0e-7), static_cast<T>(uniform_bits(a[p])) * scale);
    const T u2 = static_cast<T>(uniform_bits(b[p])) * scale;
    const T r = std::sqrt(T(-2.0) * log_unit(u1));
    const SinCos<T> t = sincos_nonneg(T(6.283185307179586) * u2);
    z[2 * p] = r * t.cos;
    z[2 * p + 1] = r * t.sin;
  }
}

#ifdef SYMFAST_X86_AVX2
// Its polynomials with fused multiply-adds: float32 1.52 -> 1.28 ns per normal (one thread,
// Zen 3). The normals then differ from the portable build's in the last bit or two.
template <typename T>
__attribute__((target("avx2,fma"))) void box_muller_avx2_fma(const uint32_t* __restrict a,
                                                             const uint32_t* __restrict b,
                                                             int64_t pairs, T* __restrict z) {
  box_muller_loop<T>(a, b, pairs, z);
}
#endif

#if defined(SYMFAST_X86_AVX2) && !defined(SYMFAST_NO_AVX512)
#define SYMFAST_X86_AVX512 1
// The same loop in 512-bit vectors, where the CPU has AVX-512 (Zen 4, recent Intel): the same
// bits as box_muller_avx2_fma (checked over 786K normals of each type), draw-only 1.04 -> 0.83-0.88
// ms in float32 and 2.31 -> 1.47-1.58 ms in float64 (192 x 4096 normals, one thread, Zen 4).
template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void box_muller_avx512(
    const uint32_t* __restrict a, const uint32_t* __restrict b, int64_t pairs, T* __restrict z) {
  box_muller_loop<T>(a, b, pairs, z);
}
#endif

template <typename T>
void box_muller(const uint32_t* __restrict a, const uint32_t* __restrict b, int64_t pairs,
                T* __restrict z) {
#ifdef SYMFAST_X86_AVX512
  if (cpu_has_avx512()) return box_muller_avx512<T>(a, b, pairs, z);
#endif
#ifdef SYMFAST_X86_AVX2
  if (cpu_has_avx2_fma()) return box_muller_avx2_fma<T>(a, b, pairs, z);
#endif
  box_muller_loop<T>(a, b, pairs, z);
}

// Normals are drawn and used a block at a time, so that the words and normals stay in L1.
constexpr int64_t kNoiseBlock = 512;

// The normals of elements [e0, e0 + len) of a sample (len <= kNoiseBlock): element e is normal
// e % 4 of counter e / 4 (the stream of symfast/philox.py, Triton's randn4x).
template <typename acc_t>
void draw_normals(const PhiloxRow& key, uint32_t e0, int64_t len, acc_t* __restrict z) {
  constexpr int64_t kMaxCounters = kNoiseBlock / 4 + 2;
  uint32_t a[2 * kMaxCounters], b[2 * kMaxCounters];
  acc_t drawn[4 * kMaxCounters];
  const int64_t skip = e0 % 4, counters = (skip + len + 3) / 4;
  philox_pairs(e0 / 4, counters, key, a, b);
  if (skip == 0 && len == 4 * counters) {  // whole counters: straight into z (saves ~8%)
    box_muller(a, b, 2 * counters, z);
    return;
  }
  box_muller(a, b, 2 * counters, drawn);
  std::copy(drawn + skip, drawn + skip + len, z);
}

// The normals of a row of n elements starting at element e0 of its sample.
template <typename acc_t>
void draw_row(const PhiloxRow& key, uint32_t e0, int64_t n, acc_t* __restrict z) {
  for (int64_t i = 0; i < n; i += kNoiseBlock)
    draw_normals<acc_t>(key, e0 + static_cast<uint32_t>(i), std::min(kNoiseBlock, n - i), z + i);
}

// Software prefetch into L2 of part `part` of `parts` equal parts of the `bytes` bytes at p.
inline void prefetch_part(const void* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = bytes * part / parts / 64 * 64; off < bytes * (part + 1) / parts; off += 64)
    __builtin_prefetch(c + off, 0, 2);
}

// Row `row` of a batch keyed by key (B, 2) [seed, stream] with rows_per_sample rows per sample.
inline PhiloxRow philox_row(const int64_t* key, int64_t row, int64_t rows_per_sample,
                            int64_t step) {
  const int64_t b = row / rows_per_sample;
  const uint64_t seed = static_cast<uint64_t>(key[2 * b]);
  return PhiloxRow{static_cast<uint32_t>(step), static_cast<uint32_t>(key[2 * b + 1]),
                   static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

struct Coefs {
  double c_skip, c_out, a, b, p, q, c;
};

// acc holds the orbit mean on entry; on exit den (if requested) and out hold the results.
template <typename scalar_t, typename acc_t>
SYMFAST_MULTIVERSION void combine_row(const scalar_t* __restrict x, const acc_t* __restrict acc,
                                      const acc_t* __restrict u, const acc_t* __restrict v,
                                      const acc_t* __restrict z, const Coefs& k,
                                      scalar_t* __restrict out, scalar_t* __restrict den,
                                      int64_t n) {
  const acc_t c_skip = k.c_skip, c_out = k.c_out, a = k.a, b = k.b, p = k.p, q = k.q, c = k.c;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t d = c_skip * xi + c_out * acc[i];
    acc_t r = a * xi + b * d;
    if (u) r = r + p * u[i];
    if (v) r = r + q * v[i];
    if (z) r = r + c * z[i];
    out[i] = static_cast<scalar_t>(r);
    if (den) den[i] = static_cast<scalar_t>(d);
  }
}

// u, v and a given noise are read in the accumulation type (fp32, or fp64 for fp64 x), as the
// reference computes: rounding them to an fp16 x's type first turned a large u into inf, and a
// float64 noise was truncated to float32.
at::Tensor contiguous_acc(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t->sizes() == x.sizes(), name, " must have shape ", x.sizes(), ", got ", t->sizes());
  return t->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> fused_step_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& inverse_table_in,
    const c10::optional<at::Tensor>& u_in, const c10::optional<at::Tensor>& v_in,
    const c10::optional<at::Tensor>& noise_in, const c10::optional<at::Tensor>& key_in,
    const c10::optional<at::Tensor>& noise_table_in, int64_t rows_per_sample, int64_t step,
    at::ArrayRef<double> coefs, bool write_denoised) {
  TORCH_CHECK(x_in.device().is_cpu() && y_in.device().is_cpu() && inverse_table_in.device().is_cpu(),
              "fused_step_cpu needs CPU tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, N), got ", x_in.sizes());
  TORCH_CHECK(y_in.dim() == 3 && y_in.size(1) == x_in.size(0) && y_in.size(2) == x_in.size(1),
              "y must be (G, ", x_in.size(0), ", ", x_in.size(1), "), got ", y_in.sizes());
  TORCH_CHECK(coefs.size() == 7, "coefs must hold 7 floats, got ", coefs.size());
  TORCH_CHECK(rows_per_sample >= 1 && x_in.size(0) % rows_per_sample == 0,
              "rows_per_sample must divide M = ", x_in.size(0), ", got ", rows_per_sample);
  TORCH_CHECK(step >= 0 && step <= 0xFFFFFFFFLL, "step must be in [0, 2^32), got ", step);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.to(x.scalar_type()).contiguous();
  const at::Tensor table = inverse_table_in.contiguous();
  const int64_t g = y.size(0), m = x.size(0), n = x.size(1);
  check_table(table, g, n, "inverse_table", /*check_bounds=*/false);
  const at::Tensor u = contiguous_acc(u_in, x, "u");
  const at::Tensor v = contiguous_acc(v_in, x, "v");
  const Coefs k{coefs[0], coefs[1], coefs[2], coefs[3], coefs[4], coefs[5], coefs[6]};
  const bool use_noise = k.c != 0.0;
  const at::Tensor noise = use_noise ? contiguous_acc(noise_in, x, "noise") : at::Tensor();
  at::Tensor key, noise_table;
  const int64_t batch = m / rows_per_sample;
  if (use_noise && !noise.defined()) {
    TORCH_CHECK(key_in.has_value(), "c != 0 needs either noise or key");
    key = key_in->contiguous();
    TORCH_CHECK(key.device().is_cpu() && key.scalar_type() == at::kLong && key.dim() == 2 &&
                    key.size(0) == batch && key.size(1) == 2,
                "key must be int64 (", batch, ", 2) on CPU, got ", key.scalar_type(), " ", key.sizes());
    TORCH_CHECK(rows_per_sample * n <= 0xFFFFFFFFLL, "a sample has more than 2^32 elements");
    if (noise_table_in.has_value()) {
      noise_table = noise_table_in->contiguous();
      TORCH_CHECK(noise_table.device().is_cpu(), "noise_table must be a CPU tensor");
      check_table(noise_table.reshape({1, -1}), 1, n, "noise_table", /*check_bounds=*/true);
    }
  }
  at::Tensor out = at::empty_like(x);
  at::Tensor den = write_denoised ? at::empty_like(x) : at::empty({0}, x.options());
  if (m == 0 || n == 0) return {out, den};
  const std::shared_ptr<const symfast::Plan> plan_owner = symfast::cached_plan(table, n);
  const symfast::Plan& plan = *plan_owner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t* up = u.defined() ? u.data_ptr<acc_t>() : nullptr;
    const acc_t* vp = v.defined() ? v.data_ptr<acc_t>() : nullptr;
    const acc_t* np_ = noise.defined() ? noise.data_ptr<acc_t>() : nullptr;
    const int64_t* kp = key.defined() ? key.data_ptr<int64_t>() : nullptr;
    const int32_t* ntp = noise_table.defined() ? noise_table.data_ptr<int32_t>() : nullptr;
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* dp = write_denoised ? den.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / (n * g));
    Chunks chunks(m, grain);
    parallel_team(chunks.count(), [&] {
      std::vector<acc_t> acc(n), transposed(plan.square_side ? n : 0);
      std::vector<acc_t> row_noise(kp ? n : 0);
      acc_t z[kNoiseBlock];
      for (int64_t chunk, begin, end; chunks.take(chunk, begin, end);) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t off = row * n;
          if (kp) {
            // The row's normals are drawn first, 64 at a time, each part followed by software
            // prefetches of the same share of the row's G orbit rows, x, u and v: the draw is
            // compute-bound and the rest of the step memory-bound, and without the prefetches
            // the two ran one after the other (noisy step = noiseless step + draw). Measured
            // (D4 (64,3,64,64), 2 threads, Zen 4, same-run A/B, noisy step): 1.80-1.83 ms
            // without the prefetches, 1.30-1.47 ms with them; prefetching after each block of
            // 512 normals instead (bursts of ~290 lines) gained nothing. Written out rather than
            // through draw_row with a per-part callback: that version measured 1.49-1.52x the
            // noiseless step against 1.30-1.41x for this loop (same-run A/B, one thread).
            const PhiloxRow pk = philox_row(kp, row, rows_per_sample, step);
            const uint32_t row_base = static_cast<uint32_t>((row % rows_per_sample) * n);
            constexpr int64_t kDrawPart = 64;
            const int64_t parts = (n + kDrawPart - 1) / kDrawPart;
            for (int64_t i = 0, part = 0; i < n; i += kDrawPart, ++part) {
              draw_normals<acc_t>(pk, row_base + static_cast<uint32_t>(i),
                                  std::min(kDrawPart, n - i), row_noise.data() + i);
              for (int64_t k = 0; k < g; ++k)
                prefetch_part(yp + (k * m + row) * n, n * sizeof(scalar_t), part, parts);
              prefetch_part(xp + off, n * sizeof(scalar_t), part, parts);
              if (up) prefetch_part(up + off, n * sizeof(acc_t), part, parts);
              if (vp) prefetch_part(vp + off, n * sizeof(acc_t), part, parts);
            }
          }
          symfast::orbit_sum_row<scalar_t, acc_t>(yp, tp, plan, g, m, n, row, acc_t(1) / g,
                                                  acc.data(), transposed.data());
          const acc_t* noise_row = kp ? row_noise.data() : (np_ ? np_ + off : nullptr);
          if (!ntp) {
            combine_row<scalar_t, acc_t>(xp + off, acc.data(), up ? up + off : nullptr,
                                         vp ? vp + off : nullptr, noise_row, k, op + off,
                                         dp ? dp + off : nullptr, n);
            continue;
          }
          // the noise table gathers across the row (the noise transformed with the state)
          for (int64_t i = 0; i < n; i += kNoiseBlock) {
            const int64_t len = std::min(kNoiseBlock, n - i);
            for (int64_t j = 0; j < len; ++j) {
              const int32_t t = ntp[i + j];
              z[j] = t < 0 ? -row_noise[~t] : row_noise[t];
            }
            combine_row<scalar_t, acc_t>(xp + off + i, acc.data() + i, up ? up + off + i : nullptr,
                                         vp ? vp + off + i : nullptr, z, k, op + off + i,
                                         dp ? dp + off + i : nullptr, len);
          }
        }
      }
    });
  });
  return {out, den};
}

// The fused step's noise alone: out (M, N) float32 or float64 <- the normals fused_step_cpu adds
// (without a noise table), through the same draw_row. What drawing costs with no memory
// traffic but one write of out (the compute floor in benchmarks/bench_sampler.py).
void fused_step_cpu_noise(const at::Tensor& key_in, int64_t rows_per_sample, int64_t step,
                          at::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble),
              "out must be a contiguous float32 or float64 (M, N) CPU tensor, got ",
              out.scalar_type(), " ", out.sizes());
  const int64_t m = out.size(0), n = out.size(1);
  TORCH_CHECK(rows_per_sample >= 1 && m % rows_per_sample == 0,
              "rows_per_sample must divide M = ", m, ", got ", rows_per_sample);
  TORCH_CHECK(step >= 0 && step <= 0xFFFFFFFFLL, "step must be in [0, 2^32), got ", step);
  TORCH_CHECK(rows_per_sample * n <= 0xFFFFFFFFLL, "a sample has more than 2^32 elements");
  const at::Tensor key = key_in.contiguous();
  TORCH_CHECK(key.device().is_cpu() && key.scalar_type() == at::kLong && key.dim() == 2 &&
                  key.size(0) == m / rows_per_sample && key.size(1) == 2,
              "key must be int64 (", m / rows_per_sample, ", 2) on CPU, got ", key.scalar_type(),
              " ", key.sizes());
  if (m == 0 || n == 0) return;
  const int64_t* kp = key.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fused_step_cpu_noise", [&] {
    scalar_t* zp = out.data_ptr<scalar_t>();
    parallel_chunks(m, std::max<int64_t>(1, 16384 / n), [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        draw_row<scalar_t>(philox_row(kp, row, rows_per_sample, step),
                           static_cast<uint32_t>((row % rows_per_sample) * n), n, zp + row * n);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def(
      "fused_step_cpu(Tensor x, Tensor y, Tensor inverse_table, Tensor? u, Tensor? v, "
      "Tensor? noise, Tensor? key, Tensor? noise_table, int rows_per_sample, int step, "
      "float[] coefs, bool write_denoised) -> (Tensor, Tensor)");
  m.def("fused_step_cpu_noise(Tensor key, int rows_per_sample, int step, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) {
  m.impl("fused_step_cpu", &fused_step_cpu);
  m.impl("fused_step_cpu_noise", &fused_step_cpu_noise);
}

SYMFAST_PY_MODULE()
