// CUDA kernels of max_pool2d (with and without indices) and max_pool2d_backward.
//
// Semantics: those of csrc/cpu/pool.cpp (torch's CPU kernel), bit for bit. Each window is scanned
// row by row, left to right, over its in-bounds taps only; a tap replaces the running maximum when
// `v > max || isnan(v)`, starting from max = -inf with the index of the window's first in-bounds
// tap. So ties keep the FIRST maximum and a NaN wins (the window's last NaN). Indices are flat
// positions inside each H*W input plane.
//
// Forward: one thread per output element (grid-stride, int64 indices: planes and tensors may pass
// 2^31 elements). Adjacent threads take adjacent outputs of a row, so their windows' taps are
// stride_w apart: coalesced enough, and the overlapping taps of neighbouring windows hit L1.
//
// Backward: the CPU kernel's semantics (csrc/cpu/pool.cpp, torch's CPU scatter): grad_input = 0,
// then grad_input[indices[o]] += grad_output[o] for every output o of a plane in order, for any
// index inside the H*W plane, a tap of o's window or not; a window with no in-bounds tap
// (dilation with padding can make one; its output is -inf) passes no gradient, whatever its
// index; an index outside the plane for any other window is an error (a device-side assert; the
// CPU raises). Computed as a GATHER, deterministic without atomics, in two kernels:
//   1. one thread per input element walks the windows whose span holds it (oh in
//      [ceil((ih + pad - eff + 1) / stride), (ih + pad) / stride], same for ow), in output order,
//      and adds grad_output where the window's index names it: the scatter's sum, bitwise, for
//      every index inside its own window's span (all the forward pass produces). The thread of
//      each window's first in-bounds tap also checks that window's index, once: outside the plane
//      fails, inside the plane but outside the span (a "stray", only user-supplied indices make
//      one) raises a flag in global memory;
//   2. only when the flag is up, one thread per input element scans every output of its plane
//      in order instead: the same sum for any index, at O(H*W * OH*OW) work. Without strays it
//      reads one flag and returns, so no host synchronisation is needed to choose.
//
// Napkin math (H100, device.cuh: ~3 TB/s), LeNet pool1 at batch 8192 fp32 (8192x6x28x28 ->
// 14x14, k2 s2):
//   forward with indices: reads 154 MB, writes 39 MB values + 77 MB int64 indices = 270 MB,
//   ~90 us floor; without indices ~65 us.
//   backward: reads 39 MB grad + 77 MB indices (each read by the 4 inputs of its window, from
//   cache), writes 154 MB: ~90 us floor.
// Window compares are a handful of flops per byte: memory-bound. In bfloat16 / float16 the values
// move half the bytes (the int64 indices do not shrink): forward with indices 173 MB, ~58 us
// (without indices ~32 us); backward 174 MB, ~58 us. Values compare and sum in float32
// (compute_t, device.cuh); each result is rounded once (a maximum exactly: it is an input).
#include "common/geometry.h"
#include "cuda/device.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

using Geometry = Pool2dGeometry<int64_t>;

// Reads I (T, or compute_t<T>: the fused operator's unrounded intermediate), writes T.
template <typename I, typename T, bool kIdx>
__global__ void max_pool2d_forward_kernel(const I* __restrict__ input, T* __restrict__ output,
                                          int64_t* __restrict__ indices, const Geometry g) {
  using C = compute_t<T>;
  const int64_t eff_h = g.effective_kernel_h();
  const int64_t eff_w = g.effective_kernel_w();
  const int64_t total = g.planes() * g.out_pixels();
  PE_GRID_STRIDE_LOOP(o, total) {
    const int64_t ow = o % g.out_w;
    const int64_t t = o / g.out_w;
    const int64_t oh = t % g.out_h;
    const int64_t p = t / g.out_h;
    const I* plane = input + p * g.in_pixels();
    const int64_t hs = oh * g.stride_h - g.padding_h;
    const int64_t ws = ow * g.stride_w - g.padding_w;
    const int64_t ih1 = min(hs + eff_h, g.in_h);
    const int64_t iw1 = min(ws + eff_w, g.in_w);
    const int64_t ih0 = first_tap(hs, g.dilation_h);
    const int64_t iw0 = first_tap(ws, g.dilation_w);
    C m = -infinity<C>();
    int64_t mi = ih0 * g.in_w + iw0;  // torch's index, even for a window with no in-bounds tap
    for (int64_t ih = ih0; ih < ih1; ih += g.dilation_h) {
      const I* row = plane + ih * g.in_w;
      for (int64_t iw = iw0; iw < iw1; iw += g.dilation_w) {
        const C v = to_compute(row[iw]);
        if (v > m || v != v) {
          m = v;
          if (kIdx) mi = ih * g.in_w + iw;
        }
      }
    }
    output[o] = from_compute<T>(m);
    if (kIdx) indices[o] = mi;
  }
}

// Whether window (oh, ow) has no in-bounds tap: all its taps miss the input on one axis.
__device__ __forceinline__ bool window_is_empty(int64_t oh, int64_t ow, const Geometry& g) {
  return g.row_misses_input(oh) || g.col_misses_input(ow);
}

__global__ void clear_flag_kernel(int* flag) { *flag = 0; }

// Reads T, writes O (T, or compute_t<T> unrounded for the fused operator).
template <typename T, typename O>
__global__ void max_pool2d_backward_kernel(const T* __restrict__ grad_output,
                                           const int64_t* __restrict__ indices,
                                           O* __restrict__ grad_input, const Geometry g,
                                           int* __restrict__ stray) {
  using C = compute_t<T>;
  const int64_t eff_h = g.effective_kernel_h();
  const int64_t eff_w = g.effective_kernel_w();
  const int64_t total = g.planes() * g.in_pixels();
  const int64_t plane_out = g.out_pixels();
  const int64_t plane_in = g.in_pixels();
  PE_GRID_STRIDE_LOOP(e, total) {
    const int64_t iw = e % g.in_w;
    const int64_t t = e / g.in_w;
    const int64_t ih = t % g.in_h;
    const int64_t p = t / g.in_h;
    // Windows [oh0, oh1] x [ow0, ow1] start at most eff - 1 before this element and at or after.
    const int64_t th = ih + g.padding_h - (eff_h - 1);
    const int64_t tw = iw + g.padding_w - (eff_w - 1);
    const int64_t oh0 = th <= 0 ? 0 : ceil_div(th, g.stride_h);
    const int64_t ow0 = tw <= 0 ? 0 : ceil_div(tw, g.stride_w);
    const int64_t oh1 = min((ih + g.padding_h) / g.stride_h, g.out_h - 1);
    const int64_t ow1 = min((iw + g.padding_w) / g.stride_w, g.out_w - 1);
    const int64_t flat = ih * g.in_w + iw;
    const int64_t* idx = indices + p * plane_out;
    const T* grad = grad_output + p * plane_out;
    C acc = 0;
    for (int64_t oh = oh0; oh <= oh1; ++oh) {
      for (int64_t ow = ow0; ow <= ow1; ++ow) {
        if (window_is_empty(oh, ow, g)) continue;
        const int64_t o = oh * g.out_w + ow;
        const int64_t i = idx[o];
        if (i == flat) acc += to_compute(grad[o]);
        // The window's index, checked by one thread: its first in-bounds tap's.
        const int64_t hs = oh * g.stride_h - g.padding_h;
        const int64_t ws = ow * g.stride_w - g.padding_w;
        if (ih != first_tap(hs, g.dilation_h) || iw != first_tap(ws, g.dilation_w)) continue;
        PE_DEVICE_CHECK(static_cast<uint64_t>(i) < static_cast<uint64_t>(plane_in),
                        "pyengine.max_pool2d_backward: the index of output [%lld, %lld] of "
                        "plane %lld (n * C + c) is %lld, outside the %lldx%lld input plane\n",
                        static_cast<long long>(oh), static_cast<long long>(ow),
                        static_cast<long long>(p), static_cast<long long>(i),
                        static_cast<long long>(g.in_h), static_cast<long long>(g.in_w));
        const int64_t rh = i / g.in_w - hs, rw = i % g.in_w - ws;
        if (rh < 0 || rh >= eff_h || rw < 0 || rw >= eff_w) *stray = 1;  // same value: no race
      }
    }
    grad_input[e] = from_compute<O>(acc);
  }
}

// Pass 2, for indices outside their window's span: every output of the plane, in order.
template <typename T, typename O>
__global__ void max_pool2d_backward_strays_kernel(const T* __restrict__ grad_output,
                                                  const int64_t* __restrict__ indices,
                                                  O* __restrict__ grad_input, const Geometry g,
                                                  const int* __restrict__ stray) {
  if (*stray == 0) return;
  using C = compute_t<T>;
  const int64_t plane_out = g.out_pixels();
  const int64_t plane_in = g.in_pixels();
  PE_GRID_STRIDE_LOOP(e, g.planes() * plane_in) {
    const int64_t p = e / plane_in;
    const int64_t flat = e % plane_in;
    const int64_t* idx = indices + p * plane_out;
    const T* grad = grad_output + p * plane_out;
    C acc = 0;
    for (int64_t o = 0; o < plane_out; ++o) {
      if (idx[o] == flat && !window_is_empty(o / g.out_w, o % g.out_w, g))
        acc += to_compute(grad[o]);
    }
    grad_input[e] = from_compute<O>(acc);
  }
}

template <typename I, typename T>
cudaError_t forward(const I* input, T* output, int64_t* indices, const Geometry& g,
                    cudaStream_t stream) {
  const int64_t total = g.planes() * g.out_pixels();
  if (total <= 0) return cudaSuccess;
  if (indices) {
    max_pool2d_forward_kernel<I, T, true>
        <<<grid_for(total), kThreads, 0, stream>>>(input, output, indices, g);
  } else {
    max_pool2d_forward_kernel<I, T, false>
        <<<grid_for(total), kThreads, 0, stream>>>(input, output, nullptr, g);
  }
  return cudaGetLastError();
}

template <typename T, typename O>
cudaError_t backward(const T* grad_output, const int64_t* indices, O* grad_input,
                     const Geometry& g, int* workspace, cudaStream_t stream) {
  const int64_t total = g.planes() * g.in_pixels();
  if (total <= 0) return cudaSuccess;
  clear_flag_kernel<<<1, 1, 0, stream>>>(workspace);
  max_pool2d_backward_kernel<T, O>
      <<<grid_for(total), kThreads, 0, stream>>>(grad_output, indices, grad_input, g, workspace);
  max_pool2d_backward_strays_kernel<T, O>
      <<<grid_for(total), kThreads, 0, stream>>>(grad_output, indices, grad_input, g, workspace);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t max_pool2d_forward(const T* input, T* output, int64_t* indices,
                               const Geometry& g, cudaStream_t stream) {
  return forward(input, output, indices, g, stream);
}

template <typename T>
cudaError_t max_pool2d_forward_from_compute(const compute_t<T>* input, T* output,
                                            int64_t* indices, const Geometry& g,
                                            cudaStream_t stream) {
  return forward(input, output, indices, g, stream);
}

int64_t max_pool2d_backward_workspace() { return 1; }

template <typename T>
cudaError_t max_pool2d_backward(const T* grad_output, const int64_t* indices, T* grad_input,
                                const Geometry& g, int* workspace, cudaStream_t stream) {
  return backward(grad_output, indices, grad_input, g, workspace, stream);
}

template <typename T>
cudaError_t max_pool2d_backward_to_compute(const T* grad_output, const int64_t* indices,
                                           compute_t<T>* grad_input, const Geometry& g,
                                           int* workspace, cudaStream_t stream) {
  return backward(grad_output, indices, grad_input, g, workspace, stream);
}

#define PE_INSTANTIATE(T)                                                                   \
  template cudaError_t max_pool2d_forward<T>(const T*, T*, int64_t*, const Geometry&,       \
                                             cudaStream_t);                                 \
  template cudaError_t max_pool2d_backward<T>(const T*, const int64_t*, T*, const Geometry&, \
                                              int*, cudaStream_t);                          \
  template cudaError_t max_pool2d_forward_from_compute<T>(const compute_t<T>*, T*, int64_t*, \
                                                          const Geometry&, cudaStream_t);   \
  template cudaError_t max_pool2d_backward_to_compute<T>(const T*, const int64_t*,          \
                                                         compute_t<T>*, const Geometry&,    \
                                                         int*, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
