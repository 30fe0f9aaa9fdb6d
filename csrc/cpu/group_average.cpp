// CPU kernels for orbit / orbit_mean: signed gathers through a group's index table.
//
// table: (G, N) int32; entry t of row k encodes (g_k x)[i] = +x[t] if t >= 0, -x[~t] if t < 0.
// orbit:      x (M, N)    -> out (G, M, N),  out[k, m, i] = g_k(x[m])[i]
// orbit_mean: y (G, M, N) -> out (M, N),     out[m, i] = 1/G sum_k g_k^-1(y[k, m])[i]
//             (called with the inverse table, so row k gathers g_k^-1)
//
// The planning (vectorised runs, one transpose per plane) lives in orbit_plan.h, shared with
// the fused sampler step.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "orbit_plan.h"
#include "symfast_module.h"

namespace {

using namespace symfast;

// Multi-versioned as a whole so the orbit_plan.h helpers inline into its AVX2 clone.
template <typename scalar_t>
SYMFAST_MULTIVERSION void orbit_rows(const scalar_t* xp, const int32_t* tp, scalar_t* op,
                                     const Plan& plan, int64_t m, int64_t n, int64_t begin,
                                     int64_t end) {
  // Task index r = (source row, element): each source row is read from cache for all G
  // elements instead of once per element from wherever it was evicted to.
  const int64_t g = static_cast<int64_t>(plan.rows.size());
  for (int64_t r = begin; r < end; ++r) {
    const int64_t k = r % g, row = r / g;
    const scalar_t* src = xp + row * n;
    scalar_t* dst = op + (k * m + row) * n;
    const RowPlan& rp = plan.rows[k];
    if (rp.kind == Kind::kRuns) {
      copy_blocks<scalar_t>(src, rp.blocks, dst);
    } else if (rp.kind == Kind::kTransposed) {
      copy_transposed<scalar_t>(src, rp.blocks[0], dst, plan.square_side);
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

at::Tensor orbit_cpu(const at::Tensor& x_in, const at::Tensor& table_in) {
  TORCH_CHECK(x_in.device().is_cpu() && table_in.device().is_cpu(), "orbit_cpu needs CPU tensors");
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, N), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const std::shared_ptr<const Plan> plan_owner = cached_plan(table, n);
  const Plan& plan = *plan_owner;
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
