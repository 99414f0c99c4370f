// CPU kernels of the pointwise losses, mse_loss and binary_cross_entropy, and their backward
// passes, binary_cross_entropy's with respect to the target too (cross_entropy:
// cross_entropy.cpp). Per-element math shared with CUDA lives in
// common/elementwise.h; argument checks in common/checks.h (the Meta kernels run the same ones, so
// every backend says the same thing). Reductions accumulate in double, also for float32, and are
// deterministic (cpu/reductions.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/elementwise.h"
#include "common/low_precision.h"
#include "cpu/loops.h"
#include "cpu/reductions.h"

namespace pyengine {
namespace {

using at::Tensor;
using cpu::deterministic_sum;
using cpu::kSumChunk;
using cpu::lane_sum;
using cpu::scalar_like;
using cpu::weight_or_null;
using OptTensor = std::optional<Tensor>;

// ---- mse_loss and binary_cross_entropy: one pattern, two per-element terms ------------------
//
// Forward: loss_i = w_i * term(x_i, t_i); 'none' writes them, 'sum' adds them, 'mean' divides the
// sum by numel, or (mse_loss with a weight, as torch.nn.functional) by sum(w).
// Backward: grad_i = g_i * w_i * dterm(x_i, t_i), g_i divided by the same denominator for 'mean'.

enum class MeanOver { Numel, WeightSum };

struct MseMath {
  template <typename T>
  static T term(T x, T t) { T d = x - t; return d * d; }
  template <typename T>
  static T dterm(T x, T t) { return T(2) * (x - t); }
};
struct BceMath {
  template <typename T>
  static T term(T p, T y) { return bce_term(p, y); }
  template <typename T>
  static T dterm(T p, T y) { return bce_grad(p, y); }
};
// binary_cross_entropy's derivative with respect to the target (the backward pattern only).
struct BceTargetMath {
  template <typename T>
  static T dterm(T p, T) { return bce_target_grad(p); }
};

// mean's denominator: numel, or the weights' sum (a deterministic double sum of its own).
template <typename scalar_t>
double mean_denominator(const scalar_t* pw, int64_t n, MeanOver mean_over) {
  if (mean_over == MeanOver::Numel || pw == nullptr) return static_cast<double>(n);
  return deterministic_sum<1>(n, kSumChunk, kElementwiseGrain / kSumChunk,
                              [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
                                acc[0] += lane_sum(b, e, [&](int64_t i) { return pw[i]; });
                              })[0];
}

// Napkin math (forward; reference machine: csrc/cpu/README.md): reads input and target (and
// weight), 4 or 8 bytes each per element, writes 4/8 per element for 'none' only. mse_loss is ~3
// flops per element: memory-bound, a 1M float32 loss moves 8 MB, ~0.23 ms on one core from L3
// (~35 GB/s), ~0.4 ms from DRAM (~20 GB/s); the double lanes keep up with that.
// binary_cross_entropy pays two scalar libm logs per element, tens of cycles each:
// compute-bound, ~10 ns per element on one core. Achieved figures: the benchmark suite
// (python -m benchmarks).
//
// `out` is the 'none' result, allocated in torch's layout by the caller (undefined otherwise): the
// operands are read in its storage order. The reductions read contiguous operands.
template <typename Math>
Tensor pointwise_loss(Tensor out, const Tensor& input, const Tensor& target,
                      const OptTensor& weight, int64_t reduction, MeanOver mean_over,
                      const char* op) {
  auto operand = [&](const Tensor& v) {
    return out.defined() ? in_order_of(v, out) : v.contiguous();
  };
  const Tensor x = operand(input);
  const Tensor t = operand(target);
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? operand(*wp) : Tensor();
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    if (reduction == 0) {
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        if (pw) {
          for (int64_t i = b; i < e; ++i) po[i] = pw[i] * Math::term(px[i], pt[i]);
        } else {
          for (int64_t i = b; i < e; ++i) po[i] = Math::term(px[i], pt[i]);
        }
      });
      return;
    }
    const double sum = deterministic_sum<1>(
        n, kSumChunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
          if (pw) {
            acc[0] += lane_sum(b, e, [&](int64_t i) { return pw[i] * Math::term(px[i], pt[i]); });
          } else {
            acc[0] += lane_sum(b, e, [&](int64_t i) { return Math::term(px[i], pt[i]); });
          }
        })[0];
    // 'mean' of an empty input is 0 / 0 = NaN, as torch's.
    const double value = reduction == 1 ? sum / mean_denominator(pw, n, mean_over) : sum;
    out = scalar_like(value, x);
  });
  return out;
}

// Napkin math (backward): reads grad_output (one scalar, or an input-sized array for 'none'),
// input, target (and weight), writes grad_input: 12-20 bytes per float32 element, memory-bound
// (~0.35-0.6 ms per 1M floats on one core from L3) with a division per element for
// binary_cross_entropy.
// grad_input comes allocated in torch's layout; the operands are read in its storage order.
template <typename Math>
Tensor pointwise_loss_backward(Tensor grad_input, const Tensor& grad_output, const Tensor& input,
                               const Tensor& target, const OptTensor& weight, int64_t reduction,
                               MeanOver mean_over, const char* op) {
  const Tensor x = in_order_of(input, grad_input);
  const Tensor t = in_order_of(target, grad_input);
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? in_order_of(*wp, grad_input) : Tensor();
  const Tensor go = reduction == 0 ? in_order_of(grad_output, grad_input) : grad_output;
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = go.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    if (reduction == 0) {
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        if (pw) {
          for (int64_t i = b; i < e; ++i) pgi[i] = pg[i] * pw[i] * Math::dterm(px[i], pt[i]);
        } else {
          for (int64_t i = b; i < e; ++i) pgi[i] = pg[i] * Math::dterm(px[i], pt[i]);
        }
      });
      return;
    }
    if (n == 0) return;
    double g = static_cast<double>(pg[0]);
    if (reduction == 1) g /= mean_denominator(pw, n, mean_over);
    const scalar_t gs = static_cast<scalar_t>(g);
    at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
      if (pw) {
        for (int64_t i = b; i < e; ++i) pgi[i] = gs * pw[i] * Math::dterm(px[i], pt[i]);
      } else {
        for (int64_t i = b; i < e; ++i) pgi[i] = gs * Math::dterm(px[i], pt[i]);
      }
    });
  });
  return grad_input;
}

Tensor mse_loss_cpu(const Tensor& input, const Tensor& target, const OptTensor& weight,
                    int64_t reduction) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, "mse_loss");
  Tensor out;
  if (reduction == 0)
    out = empty_with_layout<int64_t>(
        input.sizes(), mse_loss_layout<int64_t>(input, target, weight_or_null(weight)),
        input.options());
  return pointwise_loss<MseMath>(out, input, target, weight, reduction, MeanOver::WeightSum,
                                 "mse_loss");
}
Tensor mse_loss_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& target,
                             const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction,
                                         "mse_loss_backward");
  Tensor grad_input = empty_with_layout<int64_t>(
      input.sizes(),
      mse_loss_backward_layout<int64_t>(grad_output, input, target, weight_or_null(weight),
                                        reduction),
      input.options());
  return pointwise_loss_backward<MseMath>(grad_input, grad_output, input, target, weight,
                                          reduction, MeanOver::WeightSum, "mse_loss_backward");
}

// binary_cross_entropy's domain, checked as torch does on CPU: input and target in [0, 1] (NaN
// fails too). A separate pass (reads 8 B per float32 element) costs little beside two logs per
// element, and keeps the error out of the parallel loop. The message names the first bad element.
void check_bce_domain(const Tensor& x, const Tensor& t) {
  dispatch_floating(x.scalar_type(), "binary_cross_entropy", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    auto outside = [](scalar_t v) { return !(v >= scalar_t(0) && v <= scalar_t(1)); };
    const auto bad = deterministic_sum<2>(
        n, kSumChunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
          int64_t bad_x = 0, bad_t = 0;
          for (int64_t i = b; i < e; ++i) {
            bad_x += outside(px[i]);
            bad_t += outside(pt[i]);
          }
          acc[0] += static_cast<double>(bad_x);
          acc[1] += static_cast<double>(bad_t);
        });
    const char* names[2] = {"input", "target"};
    const scalar_t* data[2] = {px, pt};
    for (int k = 0; k < 2; ++k) {
      if (bad[k] == 0) continue;
      int64_t i = 0;
      while (i < n && !outside(data[k][i])) ++i;
      TORCH_CHECK(false, "pyengine.binary_cross_entropy: all elements of ", names[k],
                  " should be between 0 and 1, but got ", names[k], " element ",
                  static_cast<double>(data[k][i]), " at flat index ", i, " (",
                  static_cast<int64_t>(bad[k]), " element(s) outside [0, 1])");
    }
  });
}

Tensor binary_cross_entropy_cpu(const Tensor& input, const Tensor& target,
                                const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, "binary_cross_entropy");
  check_bce_domain(input.contiguous(), target.contiguous());
  return pointwise_loss<BceMath>(reduction == 0 ? empty_binary_cross_entropy(input) : Tensor(),
                                 input, target, weight, reduction, MeanOver::Numel,
                                 "binary_cross_entropy");
}
// Like torch's, the backward pass does not re-check the domain: it is a formula of (p, y).
Tensor binary_cross_entropy_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                         const Tensor& target, const OptTensor& weight,
                                         int64_t reduction) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction,
                                         "binary_cross_entropy_backward");
  return pointwise_loss_backward<BceMath>(empty_binary_cross_entropy(input), grad_output, input,
                                          target, weight, reduction, MeanOver::Numel,
                                          "binary_cross_entropy_backward");
}

Tensor binary_cross_entropy_target_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                const Tensor& target, const OptTensor& weight,
                                                int64_t reduction) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction,
                                         "binary_cross_entropy_target_backward");
  return pointwise_loss_backward<BceTargetMath>(
      empty_binary_cross_entropy_target_grad<int64_t>(input), grad_output, input, target, weight,
      reduction, MeanOver::Numel, "binary_cross_entropy_target_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("mse_loss", PE_KERNEL(mse_loss_cpu));
  m.impl("mse_loss_backward", PE_KERNEL(mse_loss_backward_cpu));
  m.impl("binary_cross_entropy", PE_KERNEL(binary_cross_entropy_cpu));
  m.impl("binary_cross_entropy_backward", PE_KERNEL(binary_cross_entropy_backward_cpu));
  m.impl("binary_cross_entropy_target_backward",
         PE_KERNEL(binary_cross_entropy_target_backward_cpu));
}

}  // namespace pyengine
