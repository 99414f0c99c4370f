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

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/elementwise.h"
#include "common/low_precision.h"
#include "cpu/isa.h"
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

// ---- Operands that repeat a block -----------------------------------------------------------
//
// A target or weight expanded over leading dims (a row broadcast over the batch: torch.expand,
// and the weight pyengine.functional.binary_cross_entropy expands to the target's shape) holds a
// contiguous block of `period` elements repeated: element i (in contiguous order) is
// data[i % period]. The loops read it in place, a chunk at a time through a buffer filled from
// the block (in L1), instead of a copy of the whole operand (.contiguous(): 4 MB written and read
// back for 4096 x 256 float32, which made mse_loss against an expanded row 1.72x torch's time).
// The chunks are the reductions' (kSumChunk), so a sum adds the same terms in the same order as
// with a contiguous operand: the same bits.

// The period of v's elements in contiguous order when v repeats a contiguous block over its
// leading dims (strides 0 there, size-1 dims aside), else 0 (read it as a dense operand).
int64_t repeat_period(const Tensor& v) {
  if (v.numel() == 0) return 0;
  int64_t d = v.dim() - 1, expected = 1;
  for (; d >= 0; --d) {  // the trailing contiguous block
    if (v.size(d) == 1) continue;
    if (v.stride(d) != expected) break;
    expected *= v.size(d);
  }
  if (d < 0) return 0;  // contiguous: nothing repeats
  for (; d >= 0; --d)
    if (v.size(d) != 1 && v.stride(d) != 0) return 0;
  return expected;
}

// An operand of the loops: elements in the loops' (contiguous) order, or a repeated block.
template <typename T>
struct LossOperand {
  const T* data = nullptr;
  int64_t period = 0;  // > 0: element i is data[i % period]

  // Elements [b, e) (at most kSumChunk): in place, or copied from the block into buf.
  const T* range(int64_t b, int64_t e, T* buf) const {
    if (data == nullptr || period == 0) return data == nullptr ? nullptr : data + b;
    int64_t j = b % period;
    for (int64_t k = 0; k < e - b;) {
      const int64_t len = std::min(e - b - k, period - j);
      std::memcpy(buf + k, data + j, static_cast<size_t>(len) * sizeof(T));
      k += len;
      j = 0;
    }
    return buf;
  }
};

// f(b, e, t, w) over [begin, end) in chunks of kSumChunk aligned to multiples of it, with t and
// w the chunk's operands (index i - b).
template <typename T, class F>
PE_INLINE void for_chunks(int64_t begin, int64_t end, const LossOperand<T>& target,
                          const LossOperand<T>& weight, const F& f) {
  T target_buf[kSumChunk], weight_buf[kSumChunk];
  for (int64_t b = begin; b < end;) {
    const int64_t e = std::min(end, (b / kSumChunk + 1) * kSumChunk);
    f(b, e, target.range(b, e, target_buf), weight.range(b, e, weight_buf));
    b = e;
  }
}

// A chunk's loop, compiled per level (cpu/isa.h; as loops.h's elementwise loops) with the
// caller's per-element function inlined: built for the baseline only, the double lanes of the
// sums ran at SSE2 width and made mse_loss's 'mean' slower than its 'none' (4096 x 256: 0.52 vs
// 0.28 ms). at_elementwise_level runs `body` built for the elementwise family's level;
// chunk_sum is lane_sum over [0, n), chunk_for calls f(k) for k in [0, n).
template <typename F>
PE_TARGET_AVX512 auto run_avx512(const F& body) { return body(); }
template <typename F>
PE_TARGET_AVX2 auto run_avx2(const F& body) { return body(); }
template <typename F>
auto at_elementwise_level(const F& body) {
  switch (cpu::isa_for(cpu::Family::Elementwise)) {
    case cpu::Isa::Avx512:
      return run_avx512(body);
    case cpu::Isa::Avx2:
      return run_avx2(body);
    default:
      return body();
  }
}
template <typename F>
PE_INLINE double chunk_sum(int64_t n, const F& f) {
  return at_elementwise_level([&] { return lane_sum(0, n, f); });
}
template <typename F>
PE_INLINE void chunk_for(int64_t n, const F& f) {
  at_elementwise_level([&] {
    for (int64_t k = 0; k < n; ++k) f(k);
  });
}

// mean's denominator: numel, or the weights' sum (a deterministic double sum of its own).
template <typename scalar_t>
double mean_denominator(const LossOperand<scalar_t>& weight, int64_t n, MeanOver mean_over) {
  if (mean_over == MeanOver::Numel || weight.data == nullptr) return static_cast<double>(n);
  return deterministic_sum<1>(n, kSumChunk, kElementwiseGrain / kSumChunk,
                              [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
                                scalar_t buf[kSumChunk];
                                const scalar_t* pw = weight.range(b, e, buf);
                                acc[0] += chunk_sum(e - b, [&](int64_t k) { return pw[k]; });
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
  // A repeated block is read in place where the loops run in contiguous order.
  const bool contiguous_loops = !out.defined() || out.is_contiguous();
  auto period_of = [&](const Tensor& v) { return contiguous_loops ? repeat_period(v) : 0; };
  const Tensor x = operand(input);
  const int64_t target_period = period_of(target);
  const Tensor t = target_period ? target : operand(target);
  const Tensor* wp = weight_or_null(weight);
  const int64_t weight_period = wp ? period_of(*wp) : 0;
  const Tensor w = wp ? (weight_period ? *wp : operand(*wp)) : Tensor();
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const LossOperand<scalar_t> to{t.const_data_ptr<scalar_t>(), target_period};
    const LossOperand<scalar_t> wo{wp ? w.const_data_ptr<scalar_t>() : nullptr, weight_period};
    if (reduction == 0) {
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
        for_chunks(begin, end, to, wo, [&](int64_t b, int64_t e, const scalar_t* pt,
                                           const scalar_t* pw) {
          const scalar_t* xc = px + b;
          scalar_t* oc = po + b;
          if (pw) {
            chunk_for(e - b, [&](int64_t k) { oc[k] = pw[k] * Math::term(xc[k], pt[k]); });
          } else {
            chunk_for(e - b, [&](int64_t k) { oc[k] = Math::term(xc[k], pt[k]); });
          }
        });
      });
      return;
    }
    const double sum = deterministic_sum<1>(
        n, kSumChunk, kElementwiseGrain / kSumChunk,
        [&](int64_t begin, int64_t end, std::array<double, 1>& acc) {
          for_chunks(begin, end, to, wo, [&](int64_t b, int64_t e, const scalar_t* pt,
                                             const scalar_t* pw) {
            const scalar_t* xc = px + b;
            if (pw) {
              acc[0] +=
                  chunk_sum(e - b, [&](int64_t k) { return pw[k] * Math::term(xc[k], pt[k]); });
            } else {
              acc[0] += chunk_sum(e - b, [&](int64_t k) { return Math::term(xc[k], pt[k]); });
            }
          });
        })[0];
    // 'mean' of an empty input is 0 / 0 = NaN, as torch's.
    const double value = reduction == 1 ? sum / mean_denominator(wo, n, mean_over) : sum;
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
  // A repeated block is read in place where grad_input is contiguous (see pointwise_loss).
  auto period_of = [&](const Tensor& v) {
    return grad_input.is_contiguous() ? repeat_period(v) : 0;
  };
  const Tensor x = in_order_of(input, grad_input);
  const int64_t target_period = period_of(target);
  const Tensor t = target_period ? target : in_order_of(target, grad_input);
  const Tensor* wp = weight_or_null(weight);
  const int64_t weight_period = wp ? period_of(*wp) : 0;
  const Tensor w = wp ? (weight_period ? *wp : in_order_of(*wp, grad_input)) : Tensor();
  const Tensor go = reduction == 0 ? in_order_of(grad_output, grad_input) : grad_output;
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const LossOperand<scalar_t> to{t.const_data_ptr<scalar_t>(), target_period};
    const LossOperand<scalar_t> wo{wp ? w.const_data_ptr<scalar_t>() : nullptr, weight_period};
    const scalar_t* pg = go.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    if (reduction == 0) {
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
        for_chunks(begin, end, to, wo, [&](int64_t b, int64_t e, const scalar_t* pt,
                                           const scalar_t* pw) {
          const scalar_t *xc = px + b, *gc = pg + b;
          scalar_t* oc = pgi + b;
          if (pw) {
            chunk_for(e - b, [&](int64_t k) { oc[k] = gc[k] * pw[k] * Math::dterm(xc[k], pt[k]); });
          } else {
            chunk_for(e - b, [&](int64_t k) { oc[k] = gc[k] * Math::dterm(xc[k], pt[k]); });
          }
        });
      });
      return;
    }
    if (n == 0) return;
    double g = static_cast<double>(pg[0]);
    if (reduction == 1) g /= mean_denominator(wo, n, mean_over);
    const scalar_t gs = static_cast<scalar_t>(g);
    at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for_chunks(begin, end, to, wo, [&](int64_t b, int64_t e, const scalar_t* pt,
                                         const scalar_t* pw) {
        const scalar_t* xc = px + b;
        scalar_t* oc = pgi + b;
        if (pw) {
          chunk_for(e - b, [&](int64_t k) { oc[k] = gs * pw[k] * Math::dterm(xc[k], pt[k]); });
        } else {
          chunk_for(e - b, [&](int64_t k) { oc[k] = gs * Math::dterm(xc[k], pt[k]); });
        }
      });
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
