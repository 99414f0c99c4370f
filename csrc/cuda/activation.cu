// CUDA kernels of the elementwise activations (relu, leaky_relu, sigmoid, tanh) and their
// backward passes. The per-element math is common/elementwise.h, shared with the CPU kernels, so
// NaN handling (relu(NaN) = NaN, relu' = 0 at 0 and NaN) is the same on both.
//
// One grid-stride kernel per arity: int64 indices (tensors past 2^31 elements), each thread a
// strided walk so that a warp reads 32 consecutive elements (coalesced, 128 B per fp32 access).
//
// The functors compute in compute_t<T> (device.cuh): float for bfloat16 / float16, whose values
// are converted at the load and rounded once at the store.
//
// Napkin math (H100, device.cuh: ~3 TB/s): forward reads 1 and writes 1 array (8 B per fp32
// element, 4 B per 16-bit one), backward reads 2 and writes 1 (12 B; 6 B in 16-bit). A
// 64M-float relu moves 512 MB: ~0.17 ms floor; backward ~0.25 ms; half that in bfloat16 /
// float16. A few flops per element (sigmoid/tanh: one exp or tanh) stay far below the
// fp32 peak: memory-bound. Small tensors (LeNet's 64x120) are launch-bound (~3 us).
#include "common/elementwise.h"
#include "cuda/device.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

struct ReluFwd {
  template <typename T>
  __device__ T operator()(T x) const { return relu_fwd(x); }
};
struct LeakyReluFwd {
  double slope;
  template <typename T>
  __device__ T operator()(T x) const { return leaky_relu_fwd(x, static_cast<T>(slope)); }
};
struct SigmoidFwd {
  template <typename T>
  __device__ T operator()(T x) const { return sigmoid_fwd(x); }
};
struct TanhFwd {
  template <typename T>
  __device__ T operator()(T x) const { return tanh_fwd(x); }
};

struct ReluBwd {
  template <typename T>
  __device__ T operator()(T g, T y) const { return relu_bwd(g, y); }
};
struct LeakyReluBwd {
  double slope;
  template <typename T>
  __device__ T operator()(T g, T x) const { return leaky_relu_bwd(g, x, static_cast<T>(slope)); }
};
struct SigmoidBwd {
  template <typename T>
  __device__ T operator()(T g, T y) const { return sigmoid_bwd(g, y); }
};
struct TanhBwd {
  template <typename T>
  __device__ T operator()(T g, T y) const { return tanh_bwd(g, y); }
};

template <typename T, typename F>
__global__ void map_unary_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, F f) {
  PE_GRID_STRIDE_LOOP(i, n) { y[i] = from_compute<T>(f(to_compute(x[i]))); }
}

template <typename T, typename F>
__global__ void map_binary_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ out, int64_t n, F f) {
  PE_GRID_STRIDE_LOOP(i, n) {
    out[i] = from_compute<T>(f(to_compute(a[i]), to_compute(b[i])));
  }
}

template <typename T, typename F>
cudaError_t launch_unary(const T* x, T* y, int64_t n, F f, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  map_unary_kernel<T, F><<<grid_for(n), kThreads, 0, stream>>>(x, y, n, f);
  return cudaGetLastError();
}

template <typename T, typename F>
cudaError_t launch_binary(const T* a, const T* b, T* out, int64_t n, F f, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  map_binary_kernel<T, F><<<grid_for(n), kThreads, 0, stream>>>(a, b, out, n, f);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t activation_forward(Activation act, const T* x, T* y, int64_t n, double slope,
                               cudaStream_t stream) {
  switch (act) {
    case Activation::Relu: return launch_unary(x, y, n, ReluFwd{}, stream);
    case Activation::LeakyRelu: return launch_unary(x, y, n, LeakyReluFwd{slope}, stream);
    case Activation::Sigmoid: return launch_unary(x, y, n, SigmoidFwd{}, stream);
    case Activation::Tanh: return launch_unary(x, y, n, TanhFwd{}, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t activation_backward(Activation act, const T* grad, const T* saved, T* grad_input,
                                int64_t n, double slope, cudaStream_t stream) {
  switch (act) {
    case Activation::Relu: return launch_binary(grad, saved, grad_input, n, ReluBwd{}, stream);
    case Activation::LeakyRelu:
      return launch_binary(grad, saved, grad_input, n, LeakyReluBwd{slope}, stream);
    case Activation::Sigmoid:
      return launch_binary(grad, saved, grad_input, n, SigmoidBwd{}, stream);
    case Activation::Tanh: return launch_binary(grad, saved, grad_input, n, TanhBwd{}, stream);
  }
  return cudaErrorInvalidValue;
}

#define PE_INSTANTIATE(T)                                                                    \
  template cudaError_t activation_forward<T>(Activation, const T*, T*, int64_t, double,     \
                                             cudaStream_t);                                  \
  template cudaError_t activation_backward<T>(Activation, const T*, const T*, T*, int64_t,  \
                                              double, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
