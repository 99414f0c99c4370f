// CUDA kernels of the losses (mse_loss, binary_cross_entropy, cross_entropy) and their backward
// passes, with the semantics of csrc/cpu/loss.cpp:
//
//   mse_loss / binary_cross_entropy: loss_i = w_i * term(x_i, t_i); 'none' writes them, 'sum'
//     adds them, 'mean' divides the sum by numel, or (mse_loss with a weight, as
//     torch.nn.functional) by sum(w). Backward: g_i * w_i * dterm(x_i, t_i), g divided by the
//     same denominator for 'mean'. binary_cross_entropy clamps its logs at -100 and bounds the
//     gradient's denominator below by 1e-12 (common/elementwise.h).
//   binary_cross_entropy_target_backward: g_i * w_i * -logit(x_i), g divided by numel for 'mean'.
//   cross_entropy (csrc/cpu/cross_entropy.cpp states the formulas): per row,
//     logp_j = x_j - m - log(sum_k exp(x_k - m)), m = max_k x_k (NaN skipped). Class-index
//     targets: loss = -w[t] * logp_t, with label smoothing eps > 0
//     (1 - eps) * (-w[t] logp_t) + eps / C * (-sum_j w_j logp_j); 0 for t == ignore_index; 'mean'
//     divides by the sum of w[t] over the rows not ignored (NaN when all are; but 0 for an
//     unbatched ignored target without smoothing, as torch's CUDA loss: launchers.h).
//     Probability targets:
//     loss = -sum_j u_j logp_j, u_j = w_j (p_j (1 - eps) + eps / C); 'mean' divides by the rows.
//     The smoothed sums are -(D - U log s), D = sum_j u_j (x_j - m), U = sum_j u_j. Backward:
//     e_j (alpha + beta U) / s - beta u_j - [j == t] gamma, e_j = exp(x_j - m): for plain class
//     targets alpha = gamma = a w[t], beta = 0 (a = g, / total for 'mean'); smoothed ones
//     alpha = gamma = a (1 - eps) w[t], beta = a eps / C; probabilities alpha = gamma = 0,
//     beta = a.
//
// Data-dependent errors cannot reach the host without a sync: an input or target outside [0, 1]
// (binary_cross_entropy forward) or a target outside [0, C) that is not ignore_index stops the
// kernel with a device-side assert whose printf names the argument, as torch's CUDA kernels do.
//
// Reductions are deterministic: pass 1 gives each block a fixed chunk of kChunk items, summed in
// double (also for float32) by a fixed pattern and a fixed tree; pass 2 (one block) adds the
// chunk partials the same way and writes the result. No atomics: bitwise reproducible. Values that
// a later kernel needs (the 'mean' denominator of a backward pass) stay on the device.
//
// Napkin math (H100, device.cuh: ~3 TB/s): mse_loss forward over 16M fp32 elements reads
// 128 MB: ~43 us; 'none' also writes 64 MB. binary_cross_entropy adds two logs per element: still
// memory-bound on an H100 (MUFU lg2 at 16/clk/SM). cross_entropy over 4096 x 1000 fp32 logits:
// reads 16 MB once per pass (max, sum of exps; the second pass hits L1/L2): ~5-10 us, plus one
// warp-reduction per row. bfloat16 / float16 inputs are read as such (half the bytes) and
// computed in float32 (compute_t, device.cuh), the sums in double as for float32; each result is
// rounded once.
#include <cmath>

#include "common/elementwise.h"
#include "cuda/device.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

// ---- Two-pass deterministic sums of (a, b) pairs ----------------------------------------------

PE_LAUNCH_CAP(kChunk, kThreads * 16);  // items per pass-1 block

int64_t chunks_for(int64_t n) { return (n + kChunk - 1) / kChunk; }
// Partials of both sums, then the two totals.
int64_t sum_workspace(int64_t n) { return 2 * chunks_for(n) + 2; }

struct Pair {
  double a, b;
};

template <class Term>
__global__ void sum_partial_kernel(const Term term, const int64_t n, const int64_t chunks,
                                   double* __restrict__ partial) {
  __shared__ double scratch[kThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(n, begin + kChunk);
  double a = 0, b = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const Pair v = term(i);
    a += v.a;
    b += v.b;
  }
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = a;
    partial[chunks + blockIdx.x] = b;
  }
}

// One block: adds the partials in a fixed order, then finish(a, b) in thread 0.
template <class Finish>
__global__ void sum_final_kernel(const double* __restrict__ partial, const int64_t chunks,
                                 const Finish finish) {
  __shared__ double scratch[kThreads];
  double a = 0, b = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    a += partial[c];
    b += partial[chunks + c];
  }
  a = block_sum(a, scratch);
  b = block_sum(b, scratch);
  if (threadIdx.x == 0) finish(a, b);
}

// Sums term(i) over [0, n) into finish(a, b). workspace: sum_workspace(n) doubles.
template <class Term, class Finish>
cudaError_t deterministic_sum(const Term& term, int64_t n, const Finish& finish,
                              double* workspace, cudaStream_t stream) {
  const int64_t chunks = chunks_for(n);
  if (chunks > 0) {
    sum_partial_kernel<Term><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        term, n, chunks, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  sum_final_kernel<Finish><<<1, kThreads, 0, stream>>>(workspace, chunks, finish);
  return cudaGetLastError();
}

// The loss value: a, or a / b ('mean' over a weight total) or a / numel. only_target (or null):
// an unbatched cross_entropy's target, whose 'mean' is 0 when it is ignore_index (launchers.h).
template <typename T>
struct WriteLoss {
  T* out;
  int64_t reduction;
  double numel;
  bool over_b;
  const int64_t* only_target = nullptr;
  int64_t ignore_index = 0;
  __device__ void operator()(double a, double b) const {
    if (only_target != nullptr && only_target[0] == ignore_index) {
      out[0] = from_compute<T>(static_cast<compute_t<T>>(0));
      return;
    }
    out[0] = from_compute<T>(
        static_cast<compute_t<T>>(reduction == 1 ? a / (over_b ? b : numel) : a));
  }
};

// Keeps the first total on the device for a later kernel.
struct StoreTotal {
  double* total;
  __device__ void operator()(double a, double) const { total[0] = a; }
};

// ---- mse_loss and binary_cross_entropy ---------------------------------------------------------

struct MseMath {
  static constexpr bool kCheckDomain = false;
  template <typename T>
  __device__ static T term(T x, T t) {
    const T d = x - t;
    return d * d;
  }
  template <typename T>
  __device__ static T dterm(T x, T t) { return T(2) * (x - t); }
};

struct BceMath {
  static constexpr bool kCheckDomain = true;
  template <typename T>
  __device__ static T term(T p, T y) { return bce_term(p, y); }
  template <typename T>
  __device__ static T dterm(T p, T y) { return bce_grad(p, y); }
};

// binary_cross_entropy's derivative with respect to the target (backward kernels only).
struct BceTargetMath {
  template <typename T>
  __device__ static T dterm(T p, T) { return bce_target_grad(p); }
};

// binary_cross_entropy's domain, as the CPU kernel checks it: [0, 1], NaN outside.
template <typename T>
__device__ __forceinline__ void check_bce_domain(T p, T y, int64_t i) {
  PE_DEVICE_CHECK(p >= T(0) && p <= T(1),
                  "pyengine.binary_cross_entropy: all elements of input should be between 0 and "
                  "1, but got input element %g at flat index %lld\n",
                  static_cast<double>(p), static_cast<long long>(i));
  PE_DEVICE_CHECK(y >= T(0) && y <= T(1),
                  "pyengine.binary_cross_entropy: all elements of target should be between 0 and "
                  "1, but got target element %g at flat index %lld\n",
                  static_cast<double>(y), static_cast<long long>(i));
}

template <typename T, class Math>
__global__ void pointwise_none_kernel(const T* __restrict__ x, const T* __restrict__ t,
                                      const T* __restrict__ w, T* __restrict__ out,
                                      const int64_t n) {
  using C = compute_t<T>;
  PE_GRID_STRIDE_LOOP(i, n) {
    const C xi = to_compute(x[i]), ti = to_compute(t[i]);
    if (Math::kCheckDomain) check_bce_domain(xi, ti, i);
    const C v = Math::term(xi, ti);
    out[i] = from_compute<T>(w != nullptr ? to_compute(w[i]) * v : v);
  }
}

// (w_i * term_i, w_i) in double, for the sum and the 'mean' denominator.
template <typename T, class Math>
struct PointwiseTerm {
  const T* x;
  const T* t;
  const T* w;
  __device__ Pair operator()(int64_t i) const {
    using C = compute_t<T>;
    const C xi = to_compute(x[i]), ti = to_compute(t[i]);
    if (Math::kCheckDomain) check_bce_domain(xi, ti, i);
    const C v = Math::term(xi, ti);
    if (w == nullptr) return {static_cast<double>(v), 0.0};
    const C wi = to_compute(w[i]);
    return {static_cast<double>(wi * v), static_cast<double>(wi)};
  }
};

template <typename T>
struct WeightTerm {
  const T* w;
  __device__ Pair operator()(int64_t i) const {
    return {static_cast<double>(to_compute(w[i])), 0.0};
  }
};

// grad_input = g * w * dterm; for 'mean' / 'sum' g = grad[0] (/ the denominator), read here on
// the device, so the op never waits on the host.
template <typename T, class Math>
__global__ void pointwise_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                          const T* __restrict__ t, const T* __restrict__ w,
                                          T* __restrict__ grad_input, const int64_t n,
                                          const int64_t reduction, const double numel,
                                          const double* __restrict__ weight_total) {
  using C = compute_t<T>;
  C gs = C(0);
  if (reduction != 0) {
    double g = static_cast<double>(to_compute(grad[0]));
    if (reduction == 1) g /= weight_total != nullptr ? weight_total[0] : numel;
    gs = static_cast<C>(g);
  }
  PE_GRID_STRIDE_LOOP(i, n) {
    const C g = reduction == 0 ? to_compute(grad[i]) : gs;
    const C d = Math::dterm(to_compute(x[i]), to_compute(t[i]));
    grad_input[i] = from_compute<T>(w != nullptr ? g * to_compute(w[i]) * d : g * d);
  }
}

template <typename T, class Math>
cudaError_t pointwise_forward(const T* x, const T* t, const T* w, int64_t n, int64_t reduction,
                              bool mean_over_weight, T* out, double* workspace,
                              cudaStream_t stream) {
  if (reduction == 0) {
    if (n <= 0) return cudaSuccess;
    pointwise_none_kernel<T, Math><<<grid_for(n), kThreads, 0, stream>>>(x, t, w, out, n);
    return cudaGetLastError();
  }
  const WriteLoss<T> finish{out, reduction, static_cast<double>(n),
                            mean_over_weight && w != nullptr};
  return deterministic_sum(PointwiseTerm<T, Math>{x, t, w}, n, finish, workspace, stream);
}

template <typename T, class Math>
cudaError_t pointwise_backward(const T* grad, const T* x, const T* t, const T* w, int64_t n,
                               int64_t reduction, bool mean_over_weight, T* grad_input,
                               double* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const double* weight_total = nullptr;
  if (reduction == 1 && mean_over_weight && w != nullptr) {
    double* total = workspace + 2 * chunks_for(n);
    const cudaError_t err =
        deterministic_sum(WeightTerm<T>{w}, n, StoreTotal{total}, workspace, stream);
    if (err != cudaSuccess) return err;
    weight_total = total;
  }
  pointwise_backward_kernel<T, Math><<<grid_for(n), kThreads, 0, stream>>>(
      grad, x, t, w, grad_input, n, reduction, static_cast<double>(n), weight_total);
  return cudaGetLastError();
}

// ---- cross_entropy ------------------------------------------------------------------------------
//
// One warp per row: lanes stride the row (coalesced), warp-shuffle max and sum (fixed butterfly).
// exp in the input's precision, summed in double, as the CPU kernel.

constexpr int kWarpsPerBlock = kThreads / 32;

// A target is a class index or ignore_index; anything else fails the kernel. Only the `report`
// thread asserts (one message per row, not one per lane); the others skip the row.
__device__ __forceinline__ bool target_ok(int64_t c, int64_t classes, int64_t ignore_index,
                                          int64_t row, bool backward, bool report) {
  if (!report) return c == ignore_index || (c >= 0 && c < classes);
  PE_DEVICE_CHECK(c == ignore_index || (c >= 0 && c < classes),
                  "pyengine.%s: target %lld is out of bounds: expected target values in [0, %lld) "
                  "or ignore_index=%lld, but got target[%lld] = %lld\n",
                  backward ? "cross_entropy_backward" : "cross_entropy",
                  static_cast<long long>(c), static_cast<long long>(classes),
                  static_cast<long long>(ignore_index), static_cast<long long>(row),
                  static_cast<long long>(c));
  return c == ignore_index || (c >= 0 && c < classes);
}

// Row max (NaN skipped) and sum_j exp(x_j - max) in double, in every lane.
template <typename T>
__device__ __forceinline__ double row_max_sum(const T* xr, int64_t classes, int lane,
                                              compute_t<T>* max_out) {
  using std::exp;
  using C = compute_t<T>;
  C m = -infinity<C>();
  for (int64_t j = lane; j < classes; j += 32) {
    const C v = to_compute(xr[j]);
    m = v > m ? v : m;
  }
  m = warp_max(m);
  double s = 0;
  for (int64_t j = lane; j < classes; j += 32)
    s += static_cast<double>(exp(to_compute(xr[j]) - m));
  *max_out = m;
  return warp_sum(s);
}

// A row's coefficients u_j of the smoothed forms: w_j (1 without weight), times the smoothed
// target p_j * keep + add for probability targets (p non-null), in the input's precision as
// torch's target * (1 - eps) + eps / C (float32 for 16-bit inputs: compute_t).
template <typename T>
struct Coefficients {
  using C = compute_t<T>;
  const T* w;
  const T* p;  // the row's probabilities, or null
  C keep, add;
  __device__ __forceinline__ C operator()(int64_t j) const {
    const C q = p != nullptr ? to_compute(p[j]) * keep + add : C(1);
    return w != nullptr ? (p != nullptr ? q * to_compute(w[j]) : to_compute(w[j])) : q;
  }
};

// U = sum_j u_j and, when dot is non-null, D = sum_j u_j (x_j - m), in double, in every lane.
template <typename T>
__device__ __forceinline__ double coefficient_sums(const T* xr, compute_t<T> m, int64_t classes,
                                                   int lane, const Coefficients<T>& u,
                                                   double* dot) {
  double d = 0, total = 0;
  for (int64_t j = lane; j < classes; j += 32) {
    const compute_t<T> c = u(j);
    if (dot != nullptr) d += static_cast<double>(c) * static_cast<double>(to_compute(xr[j]) - m);
    total += static_cast<double>(c);
  }
  if (dot != nullptr) *dot = warp_sum(d);
  return warp_sum(total);
}

// Per row: 'none' writes the loss to out[r]; otherwise (loss, share) go to row_pairs[2r, 2r+1],
// the share being the row's part of the 'mean' denominator (w[t], or 0 when ignored; unused for
// probability targets, whose 'mean' divides by the rows). A null target means probabilities
// (probs, itself null when there are no classes). lse, when not null, gets each row's
// log-sum-exp m + log s (-inf without classes), ignored rows' too, as the pair (hi, lo) of T at
// lse[2r] (csrc/ops.cpp: hi = lse rounded to T, lo = the remainder; 0 where hi is not finite).
template <typename T>
__global__ void cross_entropy_rows_kernel(const T* __restrict__ x,
                                          const int64_t* __restrict__ target,
                                          const T* __restrict__ probs, const T* __restrict__ w,
                                          const int64_t rows, const int64_t classes,
                                          const int64_t ignore_index, const double eps,
                                          const compute_t<T> keep, const compute_t<T> add,
                                          T* __restrict__ out, double* __restrict__ row_pairs,
                                          T* __restrict__ lse) {
  using std::log;
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    const T* xr = x + r * classes;
    double loss = 0, share = 0;
    // the row's log-sum-exp as its two terms m + log s (an empty row's: -inf)
    double row_m = -infinity<double>(), row_log_sum = 0;
    if (target == nullptr) {
      if (classes > 0) {  // an empty row's loss is 0 (D - U log s would be 0 * -inf)
        C m;
        const double log_sum = log(row_max_sum(xr, classes, lane, &m));
        row_m = static_cast<double>(m), row_log_sum = log_sum;
        const Coefficients<T> u{w, probs + r * classes, keep, add};
        double dot;
        const double total = coefficient_sums(xr, m, classes, lane, u, &dot);
        loss = -(dot - total * log_sum);
      }
    } else {
      const int64_t c = target[r];
      const bool kept = c != ignore_index;
      if (kept && !target_ok(c, classes, ignore_index, r, false, lane == 0)) continue;
      if (kept || (lse != nullptr && classes > 0)) {  // an ignored row: only its log-sum-exp
        C m;
        const double log_sum = log(row_max_sum(xr, classes, lane, &m));
        row_m = static_cast<double>(m), row_log_sum = log_sum;
        if (kept) {
          share = w != nullptr ? static_cast<double>(to_compute(w[c])) : 1.0;
          loss = -share *
                 (static_cast<double>(to_compute(xr[c])) - static_cast<double>(m) - log_sum);
          if (eps > 0) {
            double dot;
            const double total = coefficient_sums(xr, m, classes, lane,
                                                  Coefficients<T>{w, nullptr, keep, add}, &dot);
            loss = (1 - eps) * loss + eps / static_cast<double>(classes) * -(dot - total * log_sum);
          }
        }
      }
    }
    if (lane == 0) {
      if (lse != nullptr) {  // m + log s exactly as sum + err (TwoSum), as the CPU's pairs
        const double sum = row_m + row_log_sum, log_part = sum - row_m;
        const double err = (row_m - (sum - log_part)) + (row_log_sum - log_part);
        const T hi = from_compute<T>(static_cast<C>(sum));
        const double hi_value = static_cast<double>(to_compute(hi));
        lse[2 * r] = hi;
        // (hi - hi is 0 for finite hi, NaN for an infinite or NaN one)
        const bool finite = hi_value - hi_value == 0.0;
        lse[2 * r + 1] = from_compute<T>(static_cast<C>(finite ? (sum - hi_value) + err : 0.0));
      }
      if (out != nullptr) {
        out[r] = from_compute<T>(static_cast<C>(loss));
      } else {
        row_pairs[2 * r] = loss;
        row_pairs[2 * r + 1] = share;
      }
    }
  }
}

struct RowPairTerm {
  const double* pairs;
  __device__ Pair operator()(int64_t i) const { return {pairs[2 * i], pairs[2 * i + 1]}; }
};

// The 'mean' denominator of the backward pass: w[t] (or 1) over the rows not ignored.
template <typename T>
struct TargetWeightTerm {
  const int64_t* target;
  const T* w;
  int64_t classes, ignore_index;
  __device__ Pair operator()(int64_t i) const {
    const int64_t c = target[i];
    if (c == ignore_index || !target_ok(c, classes, ignore_index, i, true, true))
      return {0.0, 0.0};
    return {w != nullptr ? static_cast<double>(to_compute(w[c])) : 1.0, 0.0};
  }
};

// total: the 'mean' denominator of class-index targets (on the device); probability targets
// (target null) divide by rows.
template <typename T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ grad,
                                              const T* __restrict__ x,
                                              const int64_t* __restrict__ target,
                                              const T* __restrict__ probs,
                                              const T* __restrict__ w, const int64_t rows,
                                              const int64_t classes, const int64_t reduction,
                                              const int64_t ignore_index, const double eps,
                                              const compute_t<T> keep, const compute_t<T> add,
                                              const double* __restrict__ total,
                                              T* __restrict__ grad_input) {
  using std::exp;
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    T* gr = grad_input + r * classes;
    const bool probabilities = target == nullptr;
    const int64_t c = probabilities ? -1 : target[r];
    if (!probabilities) {
      if (c == ignore_index) {
        for (int64_t j = lane; j < classes; j += 32) gr[j] = from_compute<T>(C(0));
        continue;
      }
      if (!target_ok(c, classes, ignore_index, r, true, lane == 0)) continue;
    }
    // a = g (/ the 'mean' denominator): g / total first, then * w[c], as torch (a zero weight
    // over a zero total gives NaN).
    double a = static_cast<double>(to_compute(reduction == 0 ? grad[r] : grad[0]));
    if (reduction == 1) a /= probabilities ? static_cast<double>(rows) : total[0];
    const bool smoothed = probabilities || eps > 0;
    double alpha = 0, beta = 0;
    if (probabilities) {
      beta = a;
    } else {
      alpha = a * (w != nullptr ? static_cast<double>(to_compute(w[c])) : 1.0);
      if (smoothed) {
        alpha *= 1 - eps;
        beta = a * eps / static_cast<double>(classes);
      }
    }
    const T* xr = x + r * classes;
    C m;
    const double s = row_max_sum(xr, classes, lane, &m);
    const Coefficients<T> u{w, probabilities ? probs + r * classes : nullptr, keep, add};
    const double u_total = smoothed ? coefficient_sums(xr, m, classes, lane, u, nullptr) : 0.0;
    const C scale = static_cast<C>((alpha + beta * u_total) / s);
    const C b = static_cast<C>(beta);
    const C as = static_cast<C>(alpha);
    for (int64_t j = lane; j < classes; j += 32) {
      C v = exp(to_compute(xr[j]) - m) * scale;
      if (smoothed) v -= b * u(j);
      if (j == c) v -= as;
      gr[j] = from_compute<T>(v);
    }
  }
}

}  // namespace

int64_t pointwise_loss_workspace(int64_t n, int64_t reduction) {
  return reduction == 0 ? 0 : sum_workspace(n);
}

int64_t pointwise_loss_backward_workspace(int64_t n, int64_t reduction, bool mean_over_weight,
                                          bool has_weight) {
  return reduction == 1 && mean_over_weight && has_weight ? sum_workspace(n) : 0;
}

template <typename T>
cudaError_t pointwise_loss_forward(PointwiseLoss loss, const T* x, const T* t, const T* w,
                                   int64_t n, int64_t reduction, bool mean_over_weight, T* out,
                                   double* workspace, cudaStream_t stream) {
  if (loss == PointwiseLoss::BinaryCrossEntropyTarget) return cudaErrorInvalidValue;  // no forward
  if (loss == PointwiseLoss::Mse)
    return pointwise_forward<T, MseMath>(x, t, w, n, reduction, mean_over_weight, out, workspace,
                                         stream);
  return pointwise_forward<T, BceMath>(x, t, w, n, reduction, mean_over_weight, out, workspace,
                                       stream);
}

template <typename T>
cudaError_t pointwise_loss_backward(PointwiseLoss loss, const T* grad, const T* x, const T* t,
                                    const T* w, int64_t n, int64_t reduction,
                                    bool mean_over_weight, T* grad_input, double* workspace,
                                    cudaStream_t stream) {
  if (loss == PointwiseLoss::Mse)
    return pointwise_backward<T, MseMath>(grad, x, t, w, n, reduction, mean_over_weight,
                                          grad_input, workspace, stream);
  if (loss == PointwiseLoss::BinaryCrossEntropyTarget)
    return pointwise_backward<T, BceTargetMath>(grad, x, t, w, n, reduction, mean_over_weight,
                                                grad_input, workspace, stream);
  return pointwise_backward<T, BceMath>(grad, x, t, w, n, reduction, mean_over_weight,
                                        grad_input, workspace, stream);
}

// forward: (loss, share) per row, then the sum's partials; backward ('mean' of class indices):
// the partials of the weight total, then the total.
int64_t cross_entropy_workspace(int64_t rows, int64_t reduction) {
  return reduction == 0 ? 0 : 2 * rows + sum_workspace(rows);
}
int64_t cross_entropy_backward_workspace(int64_t rows, int64_t reduction, bool probabilities) {
  return reduction == 1 && !probabilities ? sum_workspace(rows) : 0;
}

// keep and add of the smoothed target, in T (a compute type) as torch computes it.
template <typename T>
void smoothing(double eps, int64_t classes, T* keep, T* add) {
  *keep = static_cast<T>(1.0 - eps);
  *add = static_cast<T>(classes > 0 ? eps / static_cast<double>(classes) : 0.0);
}

template <typename T>
cudaError_t cross_entropy_forward(const T* x, const int64_t* target, const T* probs, const T* w,
                                  int64_t rows, int64_t classes, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing, bool unbatched,
                                  T* out, T* lse, double* workspace, cudaStream_t stream) {
  double* pairs = reduction == 0 ? nullptr : workspace;
  compute_t<T> keep, add;
  smoothing(label_smoothing, classes, &keep, &add);
  if (rows > 0) {
    cross_entropy_rows_kernel<T><<<grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        x, target, probs, w, rows, classes, ignore_index, label_smoothing, keep, add,
        reduction == 0 ? out : nullptr, pairs, lse);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (reduction == 0) return cudaSuccess;
  // 'mean' of probabilities: over the rows (none without classes: torch's mean over no element
  // is NaN); of class indices: over the shares.
  const double numel = classes > 0 ? static_cast<double>(rows) : 0.0;
  WriteLoss<T> finish{out, reduction, numel, target != nullptr};
  if (unbatched && reduction == 1 && target != nullptr && label_smoothing == 0) {
    finish.only_target = target;
    finish.ignore_index = ignore_index;
  }
  return deterministic_sum(RowPairTerm{pairs}, rows, finish, workspace + 2 * rows, stream);
}

template <typename T>
cudaError_t cross_entropy_backward(const T* grad, const T* x, const int64_t* target,
                                   const T* probs, const T* w, int64_t rows, int64_t classes,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing, T* grad_input, double* workspace,
                                   cudaStream_t stream) {
  if (rows <= 0 || classes <= 0) return cudaSuccess;
  const double* total = nullptr;
  if (reduction == 1 && target != nullptr) {
    double* t = workspace + 2 * chunks_for(rows);
    const cudaError_t err = deterministic_sum(TargetWeightTerm<T>{target, w, classes, ignore_index},
                                              rows, StoreTotal{t}, workspace, stream);
    if (err != cudaSuccess) return err;
    total = t;
  }
  compute_t<T> keep, add;
  smoothing(label_smoothing, classes, &keep, &add);
  cross_entropy_backward_kernel<T><<<grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
      grad, x, target, probs, w, rows, classes, reduction, ignore_index, label_smoothing, keep,
      add, total, grad_input);
  return cudaGetLastError();
}

#define PE_INSTANTIATE(T)                                                                       \
  template cudaError_t pointwise_loss_forward<T>(PointwiseLoss, const T*, const T*, const T*,  \
                                                 int64_t, int64_t, bool, T*, double*,           \
                                                 cudaStream_t);                                 \
  template cudaError_t pointwise_loss_backward<T>(PointwiseLoss, const T*, const T*, const T*, \
                                                  const T*, int64_t, int64_t, bool, T*,         \
                                                  double*, cudaStream_t);                       \
  template cudaError_t cross_entropy_forward<T>(const T*, const int64_t*, const T*, const T*,  \
                                                int64_t, int64_t, int64_t, int64_t, double,     \
                                                bool, T*, T*, double*, cudaStream_t);           \
  template cudaError_t cross_entropy_backward<T>(const T*, const T*, const int64_t*, const T*, \
                                                 const T*, int64_t, int64_t, int64_t, int64_t,  \
                                                 double, T*, double*, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
