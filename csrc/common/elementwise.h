#pragma once
// Per-element math of the activations and losses, written once for CPU and CUDA.
// Torch-free: CUDA kernels include this file. `using std::exp` picks the float overload on the
// host; nvcc supplies the same overloads for device code.
#include <cmath>

#include "macros.h"

namespace pyengine {

// NaN propagates: NaN > 0 is false, so relu(NaN) would be 0 without the explicit check.
template <typename T>
PE_HOST_DEVICE inline T relu_fwd(T x) {
  return (x > T(0) || x != x) ? x : T(0);
}
// d relu / dx from the result, as torch's threshold_backward: 0 where the result is <= 0, the
// incoming gradient elsewhere (NaN included: NaN <= 0 is false, so the gradient passes).
template <typename T>
PE_HOST_DEVICE inline T relu_bwd(T grad, T result) {
  return result <= T(0) ? T(0) : grad;
}

template <typename T>
PE_HOST_DEVICE inline T leaky_relu_fwd(T x, T slope) {
  return x > T(0) ? x : x * slope;  // NaN * slope is NaN: propagates
}
template <typename T>
PE_HOST_DEVICE inline T leaky_relu_bwd(T grad, T x, T slope) {
  return x > T(0) ? grad : grad * slope;
}

// Split by sign so exp never overflows: for x < 0, e^x / (1 + e^x).
template <typename T>
PE_HOST_DEVICE inline T sigmoid_fwd(T x) {
  using std::exp;
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  T e = exp(x);
  return e / (T(1) + e);
}
template <typename T>
PE_HOST_DEVICE inline T sigmoid_bwd(T grad, T y) {
  return grad * y * (T(1) - y);
}

template <typename T>
PE_HOST_DEVICE inline T tanh_fwd(T x) {
  using std::tanh;
  return tanh(x);
}
template <typename T>
PE_HOST_DEVICE inline T tanh_bwd(T grad, T y) {
  return grad * (T(1) - y * y);
}

// Binary cross entropy clamps each log at -100, as torch does, so p = 0 or 1 stays finite.
template <typename T>
PE_HOST_DEVICE inline T clamped_log(T p) {
  using std::log;
  T l = log(p);
  return l < T(-100) ? T(-100) : l;
}
template <typename T>
PE_HOST_DEVICE inline T bce_term(T p, T y) {
  return -(y * clamped_log(p) + (T(1) - y) * clamped_log(T(1) - p));
}
// d bce / dp = (p - y) / (p (1 - p)); torch bounds the denominator below by 1e-12 written as a
// float constant (1e-12f), in float64 too: the same constant keeps float64 results equal.
template <typename T>
PE_HOST_DEVICE inline T bce_grad(T p, T y) {
  const T eps = static_cast<T>(1e-12f);
  T denom = (T(1) - p) * p;
  if (denom < eps) denom = eps;
  return (p - y) / denom;
}
// d bce / dy = log(1 - p) - log(p) = -logit(p), computed as torch computes it: -log(p / (1 - p)),
// without the forward's clamps (p = 0 gives +inf, p = 1 gives -inf, as in torch).
template <typename T>
PE_HOST_DEVICE inline T bce_target_grad(T p) {
  using std::log;
  return -log(p / (T(1) - p));
}

}  // namespace pyengine
