// CUDA kernels of the losses (mse_loss, binary_cross_entropy, cross_entropy) and their backward
// passes, with the semantics of csrc/cpu/loss.cpp:
//
//   mse_loss / binary_cross_entropy: loss_i = w_i * term(x_i, t_i); 'none' writes them, 'sum'
//     adds them, 'mean' divides the sum by numel, or (mse_loss with a weight, as
//     torch.nn.functional) by sum(w). Backward: g_i * w_i * dterm(x_i, t_i), g divided by the
//     same denominator for 'mean'. binary_cross_entropy clamps its logs at -100 and bounds the
//     gradient's denominator below by 1e-12 (common/elementwise.h).
//   cross_entropy: per row, logp = x[t] - m - log(sum_j exp(x_j - m)), m = max_j x_j (NaN
//     skipped); loss = -w[t] * logp, 0 for t == ignore_index; 'mean' divides by the sum of w[t]
//     over the rows not ignored (NaN when all are). Backward: a * (softmax_j - [j == t]) with
//     a = g (/ total for 'mean') * w[t].
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
// warp-reduction per row.
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

// The loss value: a, or a / b ('mean' over a weight total) or a / numel.
template <typename T>
struct WriteLoss {
  T* out;
  int64_t reduction;
  double numel;
  bool over_b;
  __device__ void operator()(double a, double b) const {
    out[0] = static_cast<T>(reduction == 1 ? a / (over_b ? b : numel) : a);
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
  PE_GRID_STRIDE_LOOP(i, n) {
    if (Math::kCheckDomain) check_bce_domain(x[i], t[i], i);
    const T v = Math::term(x[i], t[i]);
    out[i] = w != nullptr ? w[i] * v : v;
  }
}

// (w_i * term_i, w_i) in double, for the sum and the 'mean' denominator.
template <typename T, class Math>
struct PointwiseTerm {
  const T* x;
  const T* t;
  const T* w;
  __device__ Pair operator()(int64_t i) const {
    if (Math::kCheckDomain) check_bce_domain(x[i], t[i], i);
    const T v = Math::term(x[i], t[i]);
    if (w == nullptr) return {static_cast<double>(v), 0.0};
    return {static_cast<double>(w[i] * v), static_cast<double>(w[i])};
  }
};

template <typename T>
struct WeightTerm {
  const T* w;
  __device__ Pair operator()(int64_t i) const { return {static_cast<double>(w[i]), 0.0}; }
};

// grad_input = g * w * dterm; for 'mean' / 'sum' g = grad[0] (/ the denominator), read here on
// the device, so the op never waits on the host.
template <typename T, class Math>
__global__ void pointwise_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                          const T* __restrict__ t, const T* __restrict__ w,
                                          T* __restrict__ grad_input, const int64_t n,
                                          const int64_t reduction, const double numel,
                                          const double* __restrict__ weight_total) {
  T gs = T(0);
  if (reduction != 0) {
    double g = static_cast<double>(grad[0]);
    if (reduction == 1) g /= weight_total != nullptr ? weight_total[0] : numel;
    gs = static_cast<T>(g);
  }
  PE_GRID_STRIDE_LOOP(i, n) {
    const T g = reduction == 0 ? grad[i] : gs;
    const T d = Math::dterm(x[i], t[i]);
    grad_input[i] = w != nullptr ? g * w[i] * d : g * d;
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
__device__ __forceinline__ double row_max_sum(const T* xr, int64_t classes, int lane, T* max_out) {
  using std::exp;
  T m = -infinity<T>();
  for (int64_t j = lane; j < classes; j += 32) m = xr[j] > m ? xr[j] : m;
  m = warp_max(m);
  double s = 0;
  for (int64_t j = lane; j < classes; j += 32) s += static_cast<double>(exp(xr[j] - m));
  *max_out = m;
  return warp_sum(s);
}

// Per row: 'none' writes the loss to out[r]; otherwise (loss, weight) go to row_pairs[2r, 2r+1].
template <typename T>
__global__ void cross_entropy_rows_kernel(const T* __restrict__ x,
                                          const int64_t* __restrict__ target,
                                          const T* __restrict__ w, const int64_t rows,
                                          const int64_t classes, const int64_t ignore_index,
                                          T* __restrict__ out, double* __restrict__ row_pairs) {
  using std::log;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    const int64_t c = target[r];
    double loss = 0, weight = 0;
    if (c != ignore_index) {
      if (!target_ok(c, classes, ignore_index, r, false, lane == 0)) continue;
      const T* xr = x + r * classes;
      T m;
      const double s = row_max_sum(xr, classes, lane, &m);
      weight = w != nullptr ? static_cast<double>(w[c]) : 1.0;
      loss = -weight * (static_cast<double>(xr[c]) - static_cast<double>(m) - log(s));
    }
    if (lane == 0) {
      if (out != nullptr) {
        out[r] = static_cast<T>(loss);
      } else {
        row_pairs[2 * r] = loss;
        row_pairs[2 * r + 1] = weight;
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
    return {w != nullptr ? static_cast<double>(w[c]) : 1.0, 0.0};
  }
};

template <typename T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ grad,
                                              const T* __restrict__ x,
                                              const int64_t* __restrict__ target,
                                              const T* __restrict__ w, const int64_t rows,
                                              const int64_t classes, const int64_t reduction,
                                              const int64_t ignore_index,
                                              const double* __restrict__ total,
                                              T* __restrict__ grad_input) {
  using std::exp;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    T* gr = grad_input + r * classes;
    const int64_t c = target[r];
    if (c == ignore_index) {
      for (int64_t j = lane; j < classes; j += 32) gr[j] = T(0);
      continue;
    }
    if (!target_ok(c, classes, ignore_index, r, true, lane == 0)) continue;
    // a = g (/ total for 'mean') * w[c]: g / total first, as torch (0 / 0 weight gives NaN).
    double a = static_cast<double>(reduction == 0 ? grad[r] : grad[0]);
    if (reduction == 1) a /= total[0];
    if (w != nullptr) a *= static_cast<double>(w[c]);
    const T* xr = x + r * classes;
    T m;
    const double s = row_max_sum(xr, classes, lane, &m);
    const T scale = static_cast<T>(a / s);
    const T as = static_cast<T>(a);
    for (int64_t j = lane; j < classes; j += 32) {
      T v = exp(xr[j] - m) * scale;
      if (j == c) v -= as;
      gr[j] = v;
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
  return pointwise_backward<T, BceMath>(grad, x, t, w, n, reduction, mean_over_weight,
                                        grad_input, workspace, stream);
}

// forward: (loss, weight) per row, then the sum's partials; backward ('mean'): the partials of
// the weight total, then the total.
int64_t cross_entropy_workspace(int64_t rows, int64_t reduction) {
  return reduction == 0 ? 0 : 2 * rows + sum_workspace(rows);
}
int64_t cross_entropy_backward_workspace(int64_t rows, int64_t reduction) {
  return reduction == 1 ? sum_workspace(rows) : 0;
}

template <typename T>
cudaError_t cross_entropy_forward(const T* x, const int64_t* target, const T* w, int64_t rows,
                                  int64_t classes, int64_t reduction, int64_t ignore_index,
                                  T* out, double* workspace, cudaStream_t stream) {
  double* pairs = reduction == 0 ? nullptr : workspace;
  if (rows > 0) {
    cross_entropy_rows_kernel<T><<<grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        x, target, w, rows, classes, ignore_index, reduction == 0 ? out : nullptr, pairs);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (reduction == 0) return cudaSuccess;
  const WriteLoss<T> finish{out, reduction, static_cast<double>(rows), true};
  return deterministic_sum(RowPairTerm{pairs}, rows, finish, workspace + 2 * rows, stream);
}

template <typename T>
cudaError_t cross_entropy_backward(const T* grad, const T* x, const int64_t* target, const T* w,
                                   int64_t rows, int64_t classes, int64_t reduction,
                                   int64_t ignore_index, T* grad_input, double* workspace,
                                   cudaStream_t stream) {
  if (rows <= 0 || classes <= 0) return cudaSuccess;
  const double* total = nullptr;
  if (reduction == 1) {
    double* t = workspace + 2 * chunks_for(rows);
    const cudaError_t err = deterministic_sum(TargetWeightTerm<T>{target, w, classes, ignore_index},
                                              rows, StoreTotal{t}, workspace, stream);
    if (err != cudaSuccess) return err;
    total = t;
  }
  cross_entropy_backward_kernel<T><<<grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
      grad, x, target, w, rows, classes, reduction, ignore_index, total, grad_input);
  return cudaGetLastError();
}

#define PE_INSTANTIATE(T)                                                                       \
  template cudaError_t pointwise_loss_forward<T>(PointwiseLoss, const T*, const T*, const T*,  \
                                                 int64_t, int64_t, bool, T*, double*,           \
                                                 cudaStream_t);                                 \
  template cudaError_t pointwise_loss_backward<T>(PointwiseLoss, const T*, const T*, const T*, \
                                                  const T*, int64_t, int64_t, bool, T*,         \
                                                  double*, cudaStream_t);                       \
  template cudaError_t cross_entropy_forward<T>(const T*, const int64_t*, const T*, int64_t,   \
                                                int64_t, int64_t, int64_t, T*, double*,         \
                                                cudaStream_t);                                  \
  template cudaError_t cross_entropy_backward<T>(const T*, const T*, const int64_t*, const T*, \
                                                 int64_t, int64_t, int64_t, int64_t, T*,        \
                                                 double*, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
