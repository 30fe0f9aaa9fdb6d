// CPU kernels for orbit / orbit_mean: signed gathers through a group's index table.
//
// table: (G, N) int32; entry t of row k encodes (g_k x)[i] = +x[t] if t >= 0, -x[~t] if t < 0.
// orbit:      x (M, N)    -> out (G, M, N),  out[k, m, i] = g_k(x[m])[i]
// orbit_mean: y (G, M, N) -> out (M, N),     out[m, i] = 1/G sum_k g_k^-1(y[k, m])[i]
//             (called with the inverse table, so row k gathers g_k^-1)
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "symfast_module.h"

namespace {

struct TableInfo {
  bool has_sign;
};

// One pass over the (cache-resident, small) table: every index must lie in [0, N), so the
// gathers below never read out of bounds whatever table a caller passes.
TableInfo check_table(const at::Tensor& table, int64_t n) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == n,
              "table must have shape (G, ", n, "), got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kInt, "table must be int32, got ", table.scalar_type());
  TORCH_CHECK(table.size(0) >= 1, "table must have at least one row");
  const int32_t* t = table.data_ptr<int32_t>();
  const int64_t total = table.numel();
  bool has_sign = false;
  bool in_bounds = true;
  for (int64_t i = 0; i < total; ++i) {
    const int32_t v = t[i];
    const int32_t src = v < 0 ? ~v : v;
    has_sign |= v < 0;
    in_bounds &= src < n;
  }
  TORCH_CHECK(in_bounds, "table holds an index outside [0, ", n, ")");
  return {has_sign};
}

template <typename scalar_t, bool kSigned>
SYMFAST_MULTIVERSION void gather_row(const scalar_t* __restrict src, const int32_t* __restrict idx,
                                     scalar_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = idx[i];
    if constexpr (kSigned) {
      const scalar_t v = src[t < 0 ? ~t : t];
      dst[i] = t < 0 ? -v : v;
    } else {
      dst[i] = src[t];
    }
  }
}

template <typename scalar_t, typename acc_t, bool kSigned>
SYMFAST_MULTIVERSION void gather_accumulate_row(const scalar_t* __restrict src,
                                                const int32_t* __restrict idx,
                                                acc_t* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = idx[i];
    if constexpr (kSigned) {
      const acc_t v = static_cast<acc_t>(src[t < 0 ? ~t : t]);
      acc[i] += t < 0 ? -v : v;
    } else {
      acc[i] += static_cast<acc_t>(src[t]);
    }
  }
}

at::Tensor orbit_cpu(const at::Tensor& x_in, const at::Tensor& table_in) {
  TORCH_CHECK(x_in.device().is_cpu() && table_in.device().is_cpu(),
              "orbit_cpu needs CPU tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, N), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const TableInfo info = check_table(table, n);
  const int64_t g = table.size(0);
  at::Tensor out = at::empty({g, m, n}, x.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "orbit_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Rows of (k, m) are independent; grain of ~16K elements amortises the OpenMP fork.
    const int64_t grain = std::max<int64_t>(1, 16384 / n);
    at::parallel_for(0, g * m, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t k = r / m, row = r % m;
        if (info.has_sign)
          gather_row<scalar_t, true>(xp + row * n, tp + k * n, op + r * n, n);
        else
          gather_row<scalar_t, false>(xp + row * n, tp + k * n, op + r * n, n);
      }
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
  const TableInfo info = check_table(table, n);
  TORCH_CHECK(table.size(0) == g, "table has ", table.size(0), " rows but y has G = ", g);
  at::Tensor out = at::empty({m, n}, y.options());
  if (m == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "orbit_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t scale = acc_t(1) / static_cast<acc_t>(g);
    const int64_t grain = std::max<int64_t>(1, 16384 / (n * g));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(n);
      for (int64_t row = begin; row < end; ++row) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < g; ++k) {
          const scalar_t* src = yp + (k * m + row) * n;
          if (info.has_sign)
            gather_accumulate_row<scalar_t, acc_t, true>(src, tp + k * n, acc.data(), n);
          else
            gather_accumulate_row<scalar_t, acc_t, false>(src, tp + k * n, acc.data(), n);
        }
        scalar_t* dst = op + row * n;
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(acc[i] * scale);
      }
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
