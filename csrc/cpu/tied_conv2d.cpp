// CPU kernels for the tied (group-invariant kernel) convolution.
//
// A kernel with one value per orbit of kernel positions turns the convolution into
//   stencil:  S[b, c, r] = sum over positions p=(i, j) of orbit r of shift_p(x[b, c])
//   GEMM:     y[b] = theta (O, C*R) @ S[b] (C*R, Ho*Wo)
// fp32 or bf16, stride 1, on a CPU with AVX2+FMA (any plane size: narrow planes are laid side by
// side on a "canvas"): the stencil is computed inside the GEMM's panel packing and never stored
// (tied_conv2d_fused.h); the input gradient is the same kernel run on grad y (theta
// transposed, kernel positions reflected), and the weight gradient multiplies the same stencil
// strips by grad y with its own micro-kernel (S recomputed: cheaper than keeping 3x the input
// alive). Otherwise (other dtypes, strides, CPUs) the stencil is a separate pass (per sample into
// a scratch buffer, or per (b, c) plane), the GEMMs go to at::mm (MKL/oneDNN), and the input
// gradient scatters grad S = theta^T @ grad y back through the transposed stencil.
//
// Orbits arrive in CSR form: positions (P,) int32 in [0, kh*kw), offsets (R+1,) int32.
//
// This file: the route table (choose_path), the entry points and their registration. The
// stencils are in tied_conv2d_stencil.h, the fused AVX2 kernels in tied_conv2d_fused.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "symfast_module.h"
#include "tied_conv2d_fused.h"
#include "tied_conv2d_stencil.h"

namespace {

// With at least one sample per thread, each thread runs stencil -> GEMM (single-threaded inside
// the parallel region) for whole samples, so S stays in cache instead of a (B, C, R, Ho, Wo)
// round trip through memory. Fewer samples than threads: a plane-parallel stencil, then one
// multi-threaded GEMM per sample. Samples are handed out dynamically (a Chunks counter), so a
// thread slowed by another process on a shared core does not hold the others at the barrier.
bool fuse_per_sample(int64_t batch) { return batch >= at::get_num_threads(); }

// Which route each pass takes, decided here and nowhere else:
//
//   route        | forward                 | input gradient           | weight gradient
//   -------------+-------------------------+--------------------------+--------------------------
//   kFused       | fp32/bf16, AVX2+FMA,    | as forward, and padding  | as forward
//                | stride 1 (fused_applies)| < kernel (reflectable)   |
//   kSmallPlane  | Ho*Wo < kSmallPlane: S as one (C*R, B*Ho*Wo) tensor, one GEMM (both gradients
//                | share grad_out's transposed copy)
//   kPerSample   | batch >= threads: stencil + GEMM per sample in one parallel region (the
//                | weight gradient only in fp32/fp64 with Ho*Wo > 0: per-thread partials)
//   kWholeBatch  | the rest: a plane-parallel stencil of the batch, then GEMMs per sample (forward,
//                | input gradient) or one GEMM over the batch (weight gradient)
//
// The first row that applies wins. bf16/fp16 on the non-fused routes are computed in fp32 and
// rounded once, as on the fused route (reduced_in_fp32 below).
enum class Pass { kForward, kGradInput, kGradWeight };
enum class Route { kFused, kSmallPlane, kPerSample, kWholeBatch };

Route choose_path(Pass pass, at::ScalarType dtype, const Orbits& o, const Geometry& g,
                  int64_t batch) {
#ifdef SYMFAST_FUSED_TIED_CONV
  if ((dtype == at::kFloat || dtype == at::kBFloat16) && fused_applies(o, g) &&
      (pass != Pass::kGradInput || grad_input_fused_applies(o, g)))
    return Route::kFused;
#endif
  if (small_plane(g)) return Route::kSmallPlane;
  const bool full_precision = dtype == at::kFloat || dtype == at::kDouble;
  if (fuse_per_sample(batch) &&
      (pass != Pass::kGradWeight || (full_precision && g.ho * g.wo > 0)))
    return Route::kPerSample;
  return Route::kWholeBatch;
}

// bf16/fp16 off the fused route run the fp32 code on widened copies and round the results once.
// In their own dtype (a reduced-precision stencil, then at::mm) every orbit sum was rounded before
// the GEMM: a build without the AVX2 route (SYMFAST_ISA=baseline, tests/test_isa_variants.py)
// was several bf16 ulps off the fp64 result where the fused route is within half an ulp, and
// bf16 at::mm without bf16 FMA units is slow (349 ms vs 8.5 ms at the size noted in the forward).
bool reduced_in_fp32(at::ScalarType dtype, Route route) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && route != Route::kFused;
}

at::Tensor widened(const at::Tensor& t) { return t.to(at::kFloat); }

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
  const Route route = choose_path(Pass::kForward, x.scalar_type(), o, g, bsz);
  if (reduced_in_fp32(x.scalar_type(), route)) {
    const c10::optional<at::Tensor> b32 =
        has_bias ? c10::optional<at::Tensor>(widened(*bias)) : c10::nullopt;
    return tied_conv2d_cpu(widened(x), widened(weight), b32, positions, offsets, kh, kw, sh, sw,
                           ph, pw).to(x.scalar_type());
  }
#ifdef SYMFAST_FUSED_TIED_CONV
  if (route == Route::kFused) {
    // bf16: fp32 throughout (weights and bias widened here, inputs as they are copied), one
    // rounding of the result. D4 3x3, 64 -> 64, 32x32, batch 32: 349 ms with the bf16 stencil
    // and bf16 at::mm below (no bf16 FMA units on this CPU), 8.5 ms this way (fp32: 7.7 ms).
    const at::Tensor b = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor y32 = x.scalar_type() == at::kFloat ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
    const at::Tensor w32 = w2.to(at::kFloat).contiguous();
    const float* bp = has_bias ? b.data_ptr<float>() : nullptr;
    if (x.scalar_type() == at::kFloat)
      tied_conv2d_fused<float>(x.data_ptr<float>(), bsz, c, w32.data_ptr<float>(), oc, bp, o, g,
                               y32.data_ptr<float>());
    else
      tied_conv2d_fused<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), bsz, c, w32.data_ptr<float>(), oc,
                                       bp, o, g, y32.data_ptr<float>());
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
  if (route == Route::kSmallPlane) {
    at::Tensor s;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_small", [&] {
      s = stencil_batched<scalar_t>(x, o, g);
    });
    const at::Tensor y2 = has_bias ? at::addmm(bias->view({oc, 1}), w2, s) : at::mm(w2, s);
    y.copy_(y2.view({oc, bsz, g.ho, g.wo}).transpose(0, 1));
  } else if (route == Route::kPerSample) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      Chunks samples(bsz, 1);
      parallel_team(bsz, [&] {
        // OpenMP workers do not inherit the caller's below-autograd dispatch state.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor sb = at::empty({c * r, hw}, x.options());
        std::vector<acc_t> acc(plane_scratch(g, o.count()));
        for (int64_t b; samples.take(b);) {
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
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const at::Tensor gy = grad_out.contiguous().view({bsz, oc, hw});
  at::Tensor gx, gw, gb;
  const Route gx_route = choose_path(Pass::kGradInput, x.scalar_type(), o, g, bsz);
  const Route gw_route = choose_path(Pass::kGradWeight, x.scalar_type(), o, g, bsz);
#ifdef SYMFAST_FUSED_TIED_CONV
  // fp32 and bf16 (computed in fp32, rounded once), stride 1: the gradients whose route is
  // kFused; the others take the routes below.
  if (gx_route == Route::kFused || gw_route == Route::kFused) {
    const bool is_float = x.scalar_type() == at::kFloat;
    const auto as_float = [&](const at::Tensor& t) {
      return is_float ? t : at::empty(t.sizes(), t.options().dtype(at::kFloat));
    };
    if (mask[0] && gx_route == Route::kFused) {
      gx = at::empty(x.sizes(), x.options());
      if (gx.numel() > 0) {
        at::Tensor gx32 = as_float(gx);
        if (is_float)
          tied_conv2d_grad_input_fused<float>(gy.data_ptr<float>(), weight, o, g, bsz, gx32.data_ptr<float>());
        else
          tied_conv2d_grad_input_fused<c10::BFloat16>(gy.data_ptr<c10::BFloat16>(), weight, o, g, bsz,
                                                      gx32.data_ptr<float>());
        if (!gx32.is_same(gx)) gx.copy_(gx32);
      }
      mask[0] = false;
    }
    if (mask[1] && gw_route == Route::kFused) {
      at::Tensor gw32 = at::zeros({oc, c * r}, x.options().dtype(at::kFloat));
      if (bsz > 0 && hw > 0 && c > 0 && oc > 0) {
        const at::Tensor xc = x.contiguous();
        if (is_float)
          tied_conv2d_grad_weight_fused<float>(xc.data_ptr<float>(), gy.data_ptr<float>(), bsz, c, oc,
                                               o, g, gw32.data_ptr<float>());
        else
          tied_conv2d_grad_weight_fused<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(),
                                                       gy.data_ptr<c10::BFloat16>(), bsz, c, oc, o, g,
                                                       gw32.data_ptr<float>());
      }
      gw = gw32.view({oc, c, r}).to(x.scalar_type());
      mask[1] = false;
    }
  }
#endif
  const bool reduced = reduced_in_fp32(x.scalar_type(), gx_route) || reduced_in_fp32(x.scalar_type(), gw_route);
  if (reduced && (mask[0] || mask[1] || mask[2])) {
    const auto [gx32, gw32, gb32] = tied_conv2d_backward_cpu(
        widened(grad_out), widened(x), widened(weight), positions, offsets, kh, kw, sh, sw, ph, pw, mask);
    if (mask[0]) gx = gx32.to(x.scalar_type());
    if (mask[1]) gw = gw32.to(x.scalar_type());
    if (mask[2]) gb = gb32.to(x.scalar_type());
    return {gx, gw, gb};
  }
  // kSmallPlane does not depend on the pass: it is the route of every gradient not yet done.
  if ((gx_route == Route::kSmallPlane || gw_route == Route::kSmallPlane) && (mask[0] || mask[1])) {
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
    if (gx.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tied_conv2d_bwd_x", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (gx_route == Route::kPerSample) {
          Chunks samples(bsz, 1);
      parallel_team(bsz, [&] {
            at::AutoDispatchBelowADInplaceOrView below_autograd;
            at::Tensor gsb = at::empty({c * r, hw}, x.options());
            std::vector<acc_t> acc(plane_scratch(g, o.count()));
            for (int64_t b; samples.take(b);) {
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
  if (mask[1] && gw_route == Route::kPerSample) {
    // grad theta summed over whole samples with S[b] formed in a per-thread scratch that stays
    // in cache: the (C, R, B, Ho*Wo) tensor of the path below (25 MB at 64 channels, 32x32, batch
    // 32) and the transposed copy of grad_out are never written. Measured (D4 3x3, 64 -> 64,
    // 32x32, batch 32, same-run A/B): 11.8-19.8 -> 8.9-12.6 ms at 2 threads, 16.2-18.0 -> 13.1-15.7
    // ms at 1 thread. The samples are cut into fixed runs, each summed into its own partial and
    // the partials added in run order (as the fused route does): the bits do not depend on the
    // thread count or on which thread took which run. Per-thread partials over samples handed out
    // one by one gave other bits from one call to the next.
    const int64_t runs = std::min<int64_t>(bsz, 8);
    at::Tensor partial = at::zeros({runs, oc, c * r}, x.options());
    const at::Tensor xc = x.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tied_conv2d_bwd_w", [&] {
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      Chunks run_chunks(runs, 1);
      parallel_team(runs, [&] {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor sb = at::empty({c * r, hw}, x.options());
        std::vector<scalar_t> scratch(plane_scratch(g, o.count()));
        for (int64_t run; run_chunks.take(run);) {
          at::Tensor acc = partial[run];
          for (int64_t b = run * bsz / runs; b < (run + 1) * bsz / runs; ++b) {
            stencil_sample<scalar_t, scalar_t>(xp + b * c * g.h * g.w, c, sb.data_ptr<scalar_t>(),
                                               o, g, scratch.data());
            acc.addmm_(gy[b], sb.t());
          }
        }
      });
    });
    gw = partial[0];
    for (int64_t run = 1; run < runs; ++run) gw.add_(partial[run]);
    gw = gw.view({oc, c, r});
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
