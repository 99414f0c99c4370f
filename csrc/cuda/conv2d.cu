// CUDA kernels of conv2d and conv2d_backward: implicit GEMMs on pyengine's GEMM (gemm.cuh). The
// im2col matrix is never written: its elements are computed from the window geometry where the
// GEMM tile loads them (zeros for padding). One GEMM per group (gemm's z index).
//
// Per group z (Cin_g = in_channels / groups, Cout_g = out_channels / groups, khw = kH * kW):
//   forward      y[n, co, oh, ow] = b[co] + sum_(ci, kh, kw) W[co, ci, kh, kw] x[n, ci, ih, iw]
//                M = Cout_g, N = batch * OH * OW, K = Cin_g * khw,
//                ih = oh * stride - pad + kh * dilation (same for iw)
//   grad_input   dx[n, ci, ih, iw] = sum_(co, kh, kw) W[co, ci, kh, kw] dy[n, co, oh, ow]
//                M = Cin_g, N = batch * H * W, K = Cout_g * khw, over the (kh, kw) whose
//                oh = (ih + pad - kh * dilation) / stride is whole and in range: a gather, each
//                dx element summed by one thread in a fixed order (no scatter, no atomics).
//                The GEMM multiplies the other (co, kh, kw) by zeros, which is exact for finite
//                weights; an inf or NaN weight would make those NaN where torch (col2im) adds
//                nothing, so a flag raised by a scan of the weight runs a direct gather instead
//   grad_weight  dW[co, ci, kh, kw] = sum_(n, oh, ow) dy[n, co, oh, ow] x[n, ci, ih, iw]
//                M = Cout_g, N = Cin_g * khw, K = batch * OH * OW: split-K over the batch, the
//                partials added in a fixed order by a second kernel (deterministic)
//   grad_bias    channel_sum (linear.cu) over (batch, OH * OW)
//
// Napkin math, LeNet at batch 8192, fp32 (H100, device.cuh: ~60 TFLOP/s FMA peak, ~3 TB/s):
//   conv1 (1 -> 6, 5x5, 32x32 -> 28x28) forward: 2 * 8192 * 6 * 784 * 25 = 1.9 GFLOP,
//     reads 34 MB (x, mostly from L2 after the first tap), writes 154 MB (y): ~60 us of memory;
//     the 16 x 128 tile spends 6 of its 16 rows on real channels and K = 25 takes two k steps
//     of 16, so the kernel issues ~3.4x the useful FMAs: ~6.6 GFLOP, ~0.3 ms at ~20 TFLOP/s.
//   conv2 (6 -> 16, 5x5, 14x14 -> 10x10) forward: 2 * 8192 * 16 * 100 * 150 = 3.9 GFLOP over
//     39 MB in + 52 MB out: compute-leaning; ~0.2-0.4 ms with this kernel.
//   grad_weight of conv2: the same 3.9 GFLOP reduced over K = 819200: split-K gives 264 blocks.
//   The whole LeNet training step is ~19 GFLOP (conv1 3.8 without input grad, conv2 11.7, the
//   three linears ~3), a ~0.32 ms floor at peak; with the padding above and ~10-20 TFLOP/s per
//   tile, expect a few ms (an estimate; achieved figures: python -m benchmarks).
//   In bfloat16 / float16 the operands are loaded as such and the tiles hold float32 (gemm.cuh):
//   conv1's forward moves 17 + 77 MB (~30 us of memory), the FLOPs are unchanged.
#include "common/geometry.h"
#include "cuda/device.cuh"
#include "cuda/gemm.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

using Geometry = Conv2dGeometry<int64_t>;

// Filter tap k of a GEMM's K = (channel, kh, kw) axis, in 32 bits (the glue checks that a
// filter has fewer than 2^31 taps).
struct Tap {
  int c, kh, kw;
};
__device__ __forceinline__ Tap split_tap(int64_t k, int64_t kH, int64_t kW) {
  const int kk = static_cast<int>(k);
  const int khw = static_cast<int>(kH * kW);
  const int c = kk / khw;
  const int r = kk - c * khw;
  const int kh = r / static_cast<int>(kW);
  return {c, kh, r - kh * static_cast<int>(kW)};
}

// ---- forward -----------------------------------------------------------------------------------

// B(k = (ci, kh, kw), j = (n, oh, ow)) = x[n, z * Cin_g + ci, ih, iw], 0 in the padding.
template <typename T>
struct ForwardInput {
  static constexpr bool kAlongK = false;
  struct Line {
    const T* base;  // x[n, z * Cin_g, 0, 0]
    int64_t ih0, iw0;
  };
  struct KPos {
    int64_t offset;  // ci * H * W
    int64_t dh, dw;  // kh * dil_h, kw * dil_w
  };
  const T* x;
  Geometry g;
  int64_t cin_g;  // g.in_channels_per_group(), divided once on the host

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t ohw = g.out_pixels();
    const int64_t n = j / ohw;
    const int64_t s = j - n * ohw;
    const int64_t oh = s / g.out_w;
    const int64_t ow = s - oh * g.out_w;
    return {x + (n * g.in_channels + z * cin_g) * g.in_pixels(), oh * g.stride_h - g.padding_h,
            ow * g.stride_w - g.padding_w};
  }
  __device__ KPos kpos(int64_t k) const {
    const Tap t = split_tap(k, g.kernel_h, g.kernel_w);
    return {t.c * g.in_pixels(), t.kh * g.dilation_h, t.kw * g.dilation_w};
  }
  __device__ compute_t<T> load(const Line& l, const KPos& p) const {
    const int64_t ih = l.ih0 + p.dh;
    const int64_t iw = l.iw0 + p.dw;
    return (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
               ? to_compute(l.base[p.offset + ih * g.in_w + iw])
               : compute_t<T>(0);
  }
};

// y[n, z * Cout_g + i, s] = acc (+ bias), j = n * OH * OW + s; y of type O: T, or compute_t<T>
// unrounded (the fused operator's intermediate).
template <typename T, typename O = T>
struct ForwardStore {
  O* y;
  const T* bias;
  int64_t out_channels, cout_g, ohw;
  __device__ void operator()(int64_t z, int64_t i, int64_t j, compute_t<T> acc) const {
    const int64_t co = z * cout_g + i;
    const int64_t n = j / ohw;
    y[(n * out_channels + co) * ohw + (j - n * ohw)] =
        from_compute<O>(bias != nullptr ? acc + to_compute(bias[co]) : acc);
  }
};

// ---- grad_input --------------------------------------------------------------------------------

// A(i = ci, k = (co, kh, kw)) = W[z * Cout_g + co, ci, kh, kw].
template <typename T>
struct GradInputWeight {
  static constexpr bool kAlongK = false;
  using Line = const T*;  // W[z * Cout_g, ci, 0, 0]
  using KPos = int64_t;   // co * Cin_g * khw + (kh * kW + kw)
  const T* w;
  int64_t cout_g, cin_g, khw;
  __device__ Line line(int64_t z, int64_t i) const {
    return w + (z * cout_g * cin_g + i) * khw;
  }
  __device__ KPos kpos(int64_t k) const {
    const int kk = static_cast<int>(k);  // K = Cout_g * khw < 2^31 (checked by the glue)
    const int co = kk / static_cast<int>(khw);
    return static_cast<int64_t>(co) * cin_g * khw + (kk - co * static_cast<int>(khw));
  }
  __device__ compute_t<T> load(const Line& l, const KPos& p) const { return to_compute(l[p]); }
};

// B(k = (co, kh, kw), j = (n, ih, iw)) = dy[n, z * Cout_g + co, oh, ow] where
// oh * stride_h = ih + pad_h - kh * dil_h (and the same for ow), else 0.
template <typename T>
struct GradInputGrad {
  static constexpr bool kAlongK = false;
  struct Line {
    const T* base;  // dy[n, z * Cout_g, 0, 0]
    int64_t ihp, iwp;  // ih + pad_h, iw + pad_w
  };
  struct KPos {
    int64_t offset;  // co * OH * OW
    int64_t dh, dw;  // kh * dil_h, kw * dil_w
  };
  const T* dy;
  Geometry g;
  int64_t cout_g;  // g.out_channels_per_group(), divided once on the host

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t hw = g.in_pixels();
    const int64_t n = j / hw;
    const int64_t s = j - n * hw;
    const int64_t ih = s / g.in_w;
    const int64_t iw = s - ih * g.in_w;
    return {dy + (n * g.out_channels + z * cout_g) * g.out_pixels(), ih + g.padding_h,
            iw + g.padding_w};
  }
  __device__ KPos kpos(int64_t k) const {
    const Tap t = split_tap(k, g.kernel_h, g.kernel_w);
    return {t.c * g.out_pixels(), t.kh * g.dilation_h, t.kw * g.dilation_w};
  }
  __device__ compute_t<T> load(const Line& l, const KPos& p) const {
    const int64_t th = l.ihp - p.dh;
    const int64_t tw = l.iwp - p.dw;
    if (th < 0 || tw < 0) return compute_t<T>(0);
    const int64_t sh = g.stride_h, sw = g.stride_w;
    const int64_t oh = sh == 1 ? th : th / sh;
    const int64_t ow = sw == 1 ? tw : tw / sw;
    if (oh * sh != th || ow * sw != tw || oh >= g.out_h || ow >= g.out_w) return compute_t<T>(0);
    return to_compute(l.base[p.offset + oh * g.out_w + ow]);
  }
};

__global__ void clear_flag_kernel(int* flag) { *flag = 0; }

// *flag = 1 if any of the n weights is inf or NaN (every writer writes 1: no race).
template <typename T>
__global__ void nonfinite_kernel(const T* __restrict__ w, int64_t n, int* __restrict__ flag) {
  PE_GRID_STRIDE_LOOP(i, n) {
    const compute_t<T> v = to_compute(w[i]);
    if (v - v != v - v) *flag = 1;  // inf - inf and NaN - NaN are NaN; finite - itself is 0
  }
}

// grad_input by its definition, only when *flag is up: each element sums W * dy over the
// (co, kh, kw) whose tap reads it, in that order. Work: N * Cin * H * W * Cout_g * kH * kW.
// dy is of type G: T, or compute_t<T> (the fused operator's unrounded gradient).
template <typename T, typename G>
__global__ void conv2d_grad_input_direct_kernel(const G* __restrict__ dy, const T* __restrict__ w,
                                                T* __restrict__ dx, const Geometry g,
                                                const int* __restrict__ flag) {
  if (*flag == 0) return;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t total = g.batch * g.in_channels * g.in_pixels();
  PE_GRID_STRIDE_LOOP(e, total) {
    const int64_t iw = e % g.in_w;
    const int64_t ih = (e / g.in_w) % g.in_h;
    const int64_t ci = (e / g.in_pixels()) % g.in_channels;
    const int64_t n = e / (g.in_pixels() * g.in_channels);
    const int64_t z = ci / cin_g;
    compute_t<T> acc = 0;
    for (int64_t co = z * cout_g; co < (z + 1) * cout_g; ++co) {
      const T* wk = w + (co * cin_g + (ci - z * cin_g)) * g.kernel_pixels();
      const G* d = dy + (n * g.out_channels + co) * g.out_pixels();
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t th = ih + g.padding_h - kh * g.dilation_h;
        if (th < 0 || th % g.stride_h != 0 || th / g.stride_h >= g.out_h) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t tw = iw + g.padding_w - kw * g.dilation_w;
          if (tw < 0 || tw % g.stride_w != 0 || tw / g.stride_w >= g.out_w) continue;
          acc += to_compute(wk[kh * g.kernel_w + kw]) *
                 to_compute(d[(th / g.stride_h) * g.out_w + tw / g.stride_w]);
        }
      }
    }
    dx[e] = from_compute<T>(acc);
  }
}

// dx[n, z * Cin_g + i, s] = acc, j = n * H * W + s.
template <typename T>
struct GradInputStore {
  T* dx;
  int64_t in_channels, cin_g, hw;
  __device__ void operator()(int64_t z, int64_t i, int64_t j, compute_t<T> acc) const {
    const int64_t n = j / hw;
    dx[(n * in_channels + z * cin_g + i) * hw + (j - n * hw)] = from_compute<T>(acc);
  }
};

// ---- grad_weight -------------------------------------------------------------------------------

// A(i = co, k = (n, oh, ow)) = dy[n, z * Cout_g + co, oh, ow]: along k within an image.
template <typename T>
struct GradWeightGrad {
  static constexpr bool kAlongK = true;
  using Line = const T*;  // dy[0, z * Cout_g + co, 0, 0]
  using KPos = int64_t;   // n * Cout * OH * OW + s
  const T* dy;
  int64_t out_channels, cout_g, ohw;
  __device__ Line line(int64_t z, int64_t i) const { return dy + (z * cout_g + i) * ohw; }
  __device__ KPos kpos(int64_t k) const {
    const int64_t n = k / ohw;
    return n * out_channels * ohw + (k - n * ohw);
  }
  __device__ compute_t<T> load(const Line& l, const KPos& p) const { return to_compute(l[p]); }
};

// B(k = (n, oh, ow), j = (ci, kh, kw)) = x[n, z * Cin_g + ci, ih, iw], 0 in the padding.
template <typename T>
struct GradWeightInput {
  static constexpr bool kAlongK = true;
  struct Line {
    const T* base;       // x[0, z * Cin_g + ci, 0, 0]
    int64_t hoff, woff;  // kh * dil_h - pad_h, kw * dil_w - pad_w
  };
  struct KPos {
    int64_t offset;      // n * Cin * H * W
    int64_t ihb, iwb;    // oh * stride_h, ow * stride_w
  };
  const T* x;
  Geometry g;
  int64_t cin_g;  // g.in_channels_per_group(), divided once on the host

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t khw = g.kernel_pixels();
    const int64_t ci = j / khw;
    const int64_t r = j - ci * khw;
    const int64_t kh = r / g.kernel_w;
    const int64_t kw = r - kh * g.kernel_w;
    return {x + (z * cin_g + ci) * g.in_pixels(), kh * g.dilation_h - g.padding_h,
            kw * g.dilation_w - g.padding_w};
  }
  __device__ KPos kpos(int64_t k) const {
    const int64_t ohw = g.out_pixels();
    const int64_t n = k / ohw;
    const int64_t s = k - n * ohw;
    const int64_t oh = s / g.out_w;
    const int64_t ow = s - oh * g.out_w;
    return {n * g.in_image(), oh * g.stride_h, ow * g.stride_w};
  }
  __device__ compute_t<T> load(const Line& l, const KPos& p) const {
    const int64_t ih = p.ihb + l.hoff;
    const int64_t iw = p.iwb + l.woff;
    return (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
               ? to_compute(l.base[p.offset + ih * g.in_w + iw])
               : compute_t<T>(0);
  }
};

// dW[z * Cout_g + i, j] with j = (ci, kh, kw) flattened.
template <typename T>
struct GradWeightStore {
  T* dw;
  int64_t cout_g, n;  // n = Cin_g * khw
  __device__ void operator()(int64_t z, int64_t i, int64_t j, compute_t<T> acc) const {
    dw[(z * cout_g + i) * n + j] = from_compute<T>(acc);
  }
};

// The launchers' bodies; O is the forward's output type, G the backward's grad_output type (T,
// or compute_t<T> for the fused operator's unrounded intermediates).
template <typename T, typename O>
cudaError_t forward_impl(const T* input, const T* weight, const T* bias, O* output,
                         const Geometry& g, cudaStream_t stream) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t K = g.taps_per_group();
  const gemm::Dense<T, true> a{weight, cout_g * K, K, 1};
  const ForwardInput<T> b{input, g, cin_g};
  const ForwardStore<T, O> store{output, bias, g.out_channels, cout_g, g.out_pixels()};
  return gemm::launch<compute_t<T>, false>(cout_g, g.batch * g.out_pixels(), K, g.groups, a, b,
                                           store, static_cast<compute_t<T>*>(nullptr), stream);
}

template <typename T, typename G>
cudaError_t grad_input_impl(const G* grad_output, const T* weight, T* grad_input,
                            const Geometry& g, int* workspace, cudaStream_t stream) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t khw = g.kernel_pixels();
  const int64_t weights = g.out_channels * cin_g * khw;
  clear_flag_kernel<<<1, 1, 0, stream>>>(workspace);
  nonfinite_kernel<T><<<grid_for(weights), kThreads, 0, stream>>>(weight, weights, workspace);
  const GradInputWeight<T> a{weight, cout_g, cin_g, khw};
  const GradInputGrad<G> b{grad_output, g, cout_g};
  const GradInputStore<T> store{grad_input, g.in_channels, cin_g, g.in_pixels()};
  const cudaError_t err = gemm::launch<compute_t<T>, false>(
      cin_g, g.batch * g.in_pixels(), cout_g * khw, g.groups, a, b, store,
      static_cast<compute_t<T>*>(nullptr), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = g.batch * g.in_channels * g.in_pixels();
  conv2d_grad_input_direct_kernel<T, G><<<grid_for(total), kThreads, 0, stream>>>(
      grad_output, weight, grad_input, g, workspace);
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t grad_weight_impl(const G* grad_output, const T* input, T* grad_weight,
                             const Geometry& g, compute_t<T>* workspace, cudaStream_t stream) {
  const int64_t cout_g = g.out_channels_per_group();
  const int64_t ohw = g.out_pixels();
  const int64_t n = g.taps_per_group();
  const GradWeightGrad<G> a{grad_output, g.out_channels, cout_g, ohw};
  const GradWeightInput<T> b{input, g, g.in_channels_per_group()};
  const GradWeightStore<T> store{grad_weight, cout_g, n};
  return gemm::launch<compute_t<T>, true>(cout_g, n, g.batch * ohw, g.groups, a, b, store,
                                          workspace, stream);
}

}  // namespace

template <typename T>
cudaError_t conv2d_forward(const T* input, const T* weight, const T* bias, T* output,
                           const Geometry& g, cudaStream_t stream) {
  return forward_impl(input, weight, bias, output, g, stream);
}

template <typename T>
cudaError_t conv2d_forward_to_compute(const T* input, const T* weight, const T* bias,
                                      compute_t<T>* output, const Geometry& g,
                                      cudaStream_t stream) {
  return forward_impl(input, weight, bias, output, g, stream);
}

int64_t conv2d_grad_input_workspace() { return 1; }

template <typename T>
cudaError_t conv2d_grad_input(const T* grad_output, const T* weight, T* grad_input,
                              const Geometry& g, int* workspace, cudaStream_t stream) {
  return grad_input_impl(grad_output, weight, grad_input, g, workspace, stream);
}

template <typename T>
cudaError_t conv2d_grad_input_from_compute(const compute_t<T>* grad_output, const T* weight,
                                           T* grad_input, const Geometry& g, int* workspace,
                                           cudaStream_t stream) {
  return grad_input_impl(grad_output, weight, grad_input, g, workspace, stream);
}

int64_t conv2d_grad_weight_workspace(const Geometry& g) {
  return gemm::workspace_elements(g.out_channels_per_group(), g.taps_per_group(),
                                  g.batch * g.out_pixels(), g.groups, true);
}

template <typename T>
cudaError_t conv2d_grad_weight(const T* grad_output, const T* input, T* grad_weight,
                               const Geometry& g, compute_t<T>* workspace,
                               cudaStream_t stream) {
  return grad_weight_impl(grad_output, input, grad_weight, g, workspace, stream);
}

template <typename T>
cudaError_t conv2d_grad_weight_from_compute(const compute_t<T>* grad_output, const T* input,
                                            T* grad_weight, const Geometry& g,
                                            compute_t<T>* workspace, cudaStream_t stream) {
  return grad_weight_impl(grad_output, input, grad_weight, g, workspace, stream);
}

#define PE_INSTANTIATE(T)                                                                    \
  template cudaError_t conv2d_forward<T>(const T*, const T*, const T*, T*, const Geometry&,  \
                                         cudaStream_t);                                      \
  template cudaError_t conv2d_grad_input<T>(const T*, const T*, T*, const Geometry&, int*,   \
                                            cudaStream_t);                                   \
  template cudaError_t conv2d_grad_weight<T>(const T*, const T*, T*, const Geometry&,       \
                                             compute_t<T>*, cudaStream_t);                   \
  template cudaError_t conv2d_forward_to_compute<T>(const T*, const T*, const T*,            \
                                                    compute_t<T>*, const Geometry&,          \
                                                    cudaStream_t);                           \
  template cudaError_t conv2d_grad_input_from_compute<T>(const compute_t<T>*, const T*, T*,  \
                                                         const Geometry&, int*,              \
                                                         cudaStream_t);                      \
  template cudaError_t conv2d_grad_weight_from_compute<T>(const compute_t<T>*, const T*, T*, \
                                                          const Geometry&, compute_t<T>*,    \
                                                          cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
