// CPU kernel for symfast::fused_step: one sampler step's elementwise work in one pass.
//
// x: (M, N) state rows (M = B * R, R rows per sample, N = size of the dims the group acts on)
// y: (G, M, N) raw network outputs on the orbit; inverse_table (G, N) int32 gathers g_k^-1
//    (encoding: symfast/groups.py; t >= 0 -> +src[t], t < 0 -> -src[~t])
//   ybar     = 1/G sum_k g_k^-1 y_k
//   denoised = c_skip x + c_out ybar
//   x_next   = a x + b denoised + p u + q v + c z
// z: a given noise tensor, or Philox4x32-10 normals (Triton's tl.randn bit pattern) keyed by
// key[b] = (seed, stream), counter (element, step, stream, 0), element = r * N + i, optionally
// gathered through noise_table (N,) int32 so that z <- g z.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

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

// log(x) for x in [1e-7, 1] and cos(x) for x in [0, 2*pi), in plain branch-free float code (the
// Cephes single-precision algorithms, within ~1 ulp of libm) so that the loop in philox_normals
// vectorises: the scalar libm calls kept it element by element, 15 ms for the noise of a
// (64, 3, 64, 64) step against 1.8 ms for the rest of it.
inline float log_unit(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>((bits >> 23) - 126);
  float m = __builtin_bit_cast(float, (bits & 0x007FFFFF) | 0x3F000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
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

inline float cos_nonneg(float x) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // 4/pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  const bool flip_half = j > 3;
  j = flip_half ? j - 4 : j;
  const bool negate = flip_half != (j > 1);
  const float z = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float zz = z * z;
  const float sin_poly =
      ((-1.9515295891e-4f * zz + 8.3321608736e-3f) * zz - 1.6666654611e-1f) * zz * z + z;
  const float cos_poly =
      ((2.443315711809948e-5f * zz - 1.388731625493765e-3f) * zz + 4.166664568298827e-2f) * zz *
          zz -
      0.5f * zz + 1.f;
  const float r = ((j == 1) | (j == 2)) ? sin_poly : cos_poly;
  return negate ? -r : r;
}

// Philox4x32-10 -> first Box-Muller normal, as triton/language/random.py, for counters
// (c0[i], c1, c2, 0) and key (k0, k1): z[i] for i < n. No calls and no branches in the body:
// the AVX2 clone runs 8 lanes at once (the 32x32 -> 64-bit products become vpmuludq).
SYMFAST_MULTIVERSION void philox_normals(const uint32_t* __restrict c0_in, int64_t n, uint32_t c1_in,
                                         uint32_t c2_in, uint32_t k0_in, uint32_t k1_in,
                                         float* __restrict z) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = c0_in[i], c1 = c1_in, c2 = c2_in, c3 = 0, k0 = k0_in, k1 = k1_in;
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
    int32_t i0 = static_cast<int32_t>(c0), i1 = static_cast<int32_t>(c1);
    i0 = i0 < 0 ? ~i0 : i0;
    i1 = i1 < 0 ? ~i1 : i1;
    const float u1 = std::max(1.0e-7f, static_cast<float>(i0) * 4.6566127342e-10f);
    const float u2 = static_cast<float>(i1) * 4.6566127342e-10f;
    const float th = 6.283185307179586f * u2;
    z[i] = std::sqrt(-2.0f * log_unit(u1)) * cos_nonneg(th);
  }
}

// Philox normals are drawn in fp32; an fp64 step reads them widened.
inline const float* in_acc_type(std::vector<float>& z, std::vector<float>&) { return z.data(); }
inline const double* in_acc_type(std::vector<float>& z, std::vector<double>& wide) {
  std::copy(z.begin(), z.end(), wide.begin());
  return wide.data();
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
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(n), transposed(plan.square_side ? n : 0);
      std::vector<float> z(kp ? n : 0);
      std::vector<acc_t> z_wide(kp && !std::is_same<acc_t, float>::value ? n : 0);  // fp64 only
      std::vector<uint32_t> counters(kp ? n : 0);
      for (int64_t row = begin; row < end; ++row) {
        symfast::orbit_sum_row<scalar_t, acc_t>(yp, tp, plan, g, m, n, row, acc_t(1) / g,
                                                acc.data(), transposed.data());
        const acc_t* zrow = np_ ? np_ + row * n : nullptr;
        if (kp) {
          const int64_t b = row / rows_per_sample, r = row % rows_per_sample;
          const uint64_t seed = static_cast<uint64_t>(kp[2 * b]);
          const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
          const uint32_t stream = static_cast<uint32_t>(kp[2 * b + 1]);
          const uint32_t base = static_cast<uint32_t>(r * n);
          for (int64_t i = 0; i < n; ++i)
            counters[i] = base + static_cast<uint32_t>(ntp ? symfast::decode(ntp[i]) : i);
          philox_normals(counters.data(), n, static_cast<uint32_t>(step), stream, k0, k1, z.data());
          if (ntp)
            for (int64_t i = 0; i < n; ++i) z[i] = ntp[i] < 0 ? -z[i] : z[i];
          zrow = in_acc_type(z, z_wide);
        }
        combine_row<scalar_t, acc_t>(xp + row * n, acc.data(), up ? up + row * n : nullptr,
                                     vp ? vp + row * n : nullptr, zrow, k,
                                     op + row * n, dp ? dp + row * n : nullptr, n);
      }
    });
  });
  return {out, den};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(symfast, m) {
  m.def(
      "fused_step_cpu(Tensor x, Tensor y, Tensor inverse_table, Tensor? u, Tensor? v, "
      "Tensor? noise, Tensor? key, Tensor? noise_table, int rows_per_sample, int step, "
      "float[] coefs, bool write_denoised) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(symfast, CPU, m) { m.impl("fused_step_cpu", &fused_step_cpu); }

SYMFAST_PY_MODULE()
