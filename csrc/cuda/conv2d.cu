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
//                dx element summed by one thread in a fixed order (no scatter, no atomics)
//   grad_weight  dW[co, ci, kh, kw] = sum_(n, oh, ow) dy[n, co, oh, ow] x[n, ci, ih, iw]
//                M = Cout_g, N = Cin_g * khw, K = batch * OH * OW: split-K over the batch, the
//                partials added in a fixed order by a second kernel (deterministic)
//   grad_bias    channel_sum (linear.cu) over (batch, OH * OW)
//
// Napkin math, LeNet at batch 8192, fp32 (H100: ~52 TFLOP/s FMA peak, ~3 TB/s):
//   conv1 (1 -> 6, 5x5, 32x32 -> 28x28) forward: 2 * 8192 * 6 * 784 * 25 = 1.9 GFLOP,
//     reads 34 MB (x, mostly from L2 after the first tap), writes 154 MB (y): ~60 us of memory;
//     the 16 x 128 tile spends 6 of its 16 rows on real channels and K = 25 takes two k steps
//     of 16, so the kernel issues ~3.4x the useful FMAs: ~6.6 GFLOP, ~0.3 ms at ~20 TFLOP/s.
//   conv2 (6 -> 16, 5x5, 14x14 -> 10x10) forward: 2 * 8192 * 16 * 100 * 150 = 3.9 GFLOP over
//     39 MB in + 52 MB out: compute-leaning; ~0.2-0.4 ms with this kernel.
//   grad_weight of conv2: the same 3.9 GFLOP reduced over K = 819200: split-K gives 264 blocks.
//   The whole LeNet training step is ~19 GFLOP (DESIGN.md), a ~0.36 ms floor at peak; with the
//   padding above and ~10-20 TFLOP/s per tile, expect a few ms (an estimate: not measured).
#include "common/shapes.h"
#include "cuda/device.cuh"
#include "cuda/gemm.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

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
  int64_t in_channels, cin_g, H, W, OH, OW, kH, kW, sh, sw, ph, pw, dh, dw;

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t ohw = OH * OW;
    const int64_t n = j / ohw;
    const int64_t s = j - n * ohw;
    const int64_t oh = s / OW;
    const int64_t ow = s - oh * OW;
    return {x + (n * in_channels + z * cin_g) * H * W, oh * sh - ph, ow * sw - pw};
  }
  __device__ KPos kpos(int64_t k) const {
    const Tap t = split_tap(k, kH, kW);
    return {t.c * H * W, t.kh * dh, t.kw * dw};
  }
  __device__ T load(const Line& l, const KPos& p) const {
    const int64_t ih = l.ih0 + p.dh;
    const int64_t iw = l.iw0 + p.dw;
    return (ih >= 0 && ih < H && iw >= 0 && iw < W) ? l.base[p.offset + ih * W + iw] : T(0);
  }
};

// y[n, z * Cout_g + i, s] = acc (+ bias), j = n * OH * OW + s.
template <typename T>
struct ForwardStore {
  T* y;
  const T* bias;
  int64_t out_channels, cout_g, ohw;
  __device__ void operator()(int64_t z, int64_t i, int64_t j, T acc) const {
    const int64_t co = z * cout_g + i;
    const int64_t n = j / ohw;
    y[(n * out_channels + co) * ohw + (j - n * ohw)] = bias != nullptr ? acc + bias[co] : acc;
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
  __device__ T load(const Line& l, const KPos& p) const { return l[p]; }
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
  int64_t out_channels, cout_g, H, W, OH, OW, kH, kW, sh, sw, ph, pw, dh, dw;

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t hw = H * W;
    const int64_t n = j / hw;
    const int64_t s = j - n * hw;
    const int64_t ih = s / W;
    const int64_t iw = s - ih * W;
    return {dy + (n * out_channels + z * cout_g) * OH * OW, ih + ph, iw + pw};
  }
  __device__ KPos kpos(int64_t k) const {
    const Tap t = split_tap(k, kH, kW);
    return {t.c * OH * OW, t.kh * dh, t.kw * dw};
  }
  __device__ T load(const Line& l, const KPos& p) const {
    const int64_t th = l.ihp - p.dh;
    const int64_t tw = l.iwp - p.dw;
    if (th < 0 || tw < 0) return T(0);
    const int64_t oh = sh == 1 ? th : th / sh;
    const int64_t ow = sw == 1 ? tw : tw / sw;
    if (oh * sh != th || ow * sw != tw || oh >= OH || ow >= OW) return T(0);
    return l.base[p.offset + oh * OW + ow];
  }
};

// dx[n, z * Cin_g + i, s] = acc, j = n * H * W + s.
template <typename T>
struct GradInputStore {
  T* dx;
  int64_t in_channels, cin_g, hw;
  __device__ void operator()(int64_t z, int64_t i, int64_t j, T acc) const {
    const int64_t n = j / hw;
    dx[(n * in_channels + z * cin_g + i) * hw + (j - n * hw)] = acc;
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
  __device__ T load(const Line& l, const KPos& p) const { return l[p]; }
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
  int64_t in_channels, cin_g, H, W, OH, OW, kH, kW, sh, sw, ph, pw, dh, dw;

  __device__ Line line(int64_t z, int64_t j) const {
    const int64_t khw = kH * kW;
    const int64_t ci = j / khw;
    const int64_t r = j - ci * khw;
    const int64_t kh = r / kW;
    const int64_t kw = r - kh * kW;
    return {x + (z * cin_g + ci) * H * W, kh * dh - ph, kw * dw - pw};
  }
  __device__ KPos kpos(int64_t k) const {
    const int64_t ohw = OH * OW;
    const int64_t n = k / ohw;
    const int64_t s = k - n * ohw;
    const int64_t oh = s / OW;
    const int64_t ow = s - oh * OW;
    return {n * in_channels * H * W, oh * sh, ow * sw};
  }
  __device__ T load(const Line& l, const KPos& p) const {
    const int64_t ih = p.ihb + l.hoff;
    const int64_t iw = p.iwb + l.woff;
    return (ih >= 0 && ih < H && iw >= 0 && iw < W) ? l.base[p.offset + ih * W + iw] : T(0);
  }
};

// dW[z * Cout_g + i, j] with j = (ci, kh, kw) flattened.
template <typename T>
struct GradWeightStore {
  T* dw;
  int64_t cout_g, n;  // n = Cin_g * khw
  __device__ void operator()(int64_t z, int64_t i, int64_t j, T acc) const {
    dw[(z * cout_g + i) * n + j] = acc;
  }
};

int64_t cin_g(const ConvGeometry& g) { return g.in_channels / g.groups; }
int64_t cout_g(const ConvGeometry& g) { return g.out_channels / g.groups; }

}  // namespace

template <typename T>
cudaError_t conv2d_forward(const T* input, const T* weight, const T* bias, T* output,
                           const ConvGeometry& g, cudaStream_t stream) {
  const int64_t K = cin_g(g) * g.kernel_h * g.kernel_w;
  const gemm::Dense<T, true> a{weight, cout_g(g) * K, K, 1};
  const ForwardInput<T> b{input,      g.in_channels, cin_g(g),   g.in_h,     g.in_w,
                          g.out_h,    g.out_w,       g.kernel_h, g.kernel_w, g.stride_h,
                          g.stride_w, g.pad_h,       g.pad_w,    g.dil_h,    g.dil_w};
  const ForwardStore<T> store{output, bias, g.out_channels, cout_g(g), g.out_h * g.out_w};
  return gemm::launch<T, false>(cout_g(g), g.batch * g.out_h * g.out_w, K, g.groups, a, b, store,
                                static_cast<T*>(nullptr), stream);
}

template <typename T>
cudaError_t conv2d_grad_input(const T* grad_output, const T* weight, T* grad_input,
                              const ConvGeometry& g, cudaStream_t stream) {
  const int64_t khw = g.kernel_h * g.kernel_w;
  const GradInputWeight<T> a{weight, cout_g(g), cin_g(g), khw};
  const GradInputGrad<T> b{grad_output, g.out_channels, cout_g(g), g.in_h,     g.in_w,
                           g.out_h,     g.out_w,        g.kernel_h, g.kernel_w, g.stride_h,
                           g.stride_w,  g.pad_h,        g.pad_w,    g.dil_h,    g.dil_w};
  const GradInputStore<T> store{grad_input, g.in_channels, cin_g(g), g.in_h * g.in_w};
  return gemm::launch<T, false>(cin_g(g), g.batch * g.in_h * g.in_w, cout_g(g) * khw, g.groups, a,
                                b, store, static_cast<T*>(nullptr), stream);
}

int64_t conv2d_grad_weight_workspace(const ConvGeometry& g) {
  return gemm::workspace_elements(cout_g(g), cin_g(g) * g.kernel_h * g.kernel_w,
                                  g.batch * g.out_h * g.out_w, g.groups, true);
}

template <typename T>
cudaError_t conv2d_grad_weight(const T* grad_output, const T* input, T* grad_weight,
                               const ConvGeometry& g, T* workspace, cudaStream_t stream) {
  const int64_t ohw = g.out_h * g.out_w;
  const int64_t n = cin_g(g) * g.kernel_h * g.kernel_w;
  const GradWeightGrad<T> a{grad_output, g.out_channels, cout_g(g), ohw};
  const GradWeightInput<T> b{input,      g.in_channels, cin_g(g),   g.in_h,     g.in_w,
                             g.out_h,    g.out_w,       g.kernel_h, g.kernel_w, g.stride_h,
                             g.stride_w, g.pad_h,       g.pad_w,    g.dil_h,    g.dil_w};
  const GradWeightStore<T> store{grad_weight, cout_g(g), n};
  return gemm::launch<T, true>(cout_g(g), n, g.batch * ohw, g.groups, a, b, store, workspace,
                               stream);
}

#define PE_INSTANTIATE(T)                                                                       \
  template cudaError_t conv2d_forward<T>(const T*, const T*, const T*, T*, const ConvGeometry&, \
                                         cudaStream_t);                                         \
  template cudaError_t conv2d_grad_input<T>(const T*, const T*, T*, const ConvGeometry&,        \
                                            cudaStream_t);                                      \
  template cudaError_t conv2d_grad_weight<T>(const T*, const T*, T*, const ConvGeometry&, T*,   \
                                             cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
