// CUDA kernels of softmax and log_softmax along any dim, and their backward passes from the
// result (the math and NaN rules of csrc/cpu/softmax.cpp):
//
//   softmax:               y = exp(x - m) * (1 / sum_j exp(x_j - m)),  m = max_j x_j (NaN skipped)
//   log_softmax:           y = (x - m) - log(sum_j exp(x_j - m))
//   softmax_backward:      gx = y * (g - sum_j g_j y_j)
//   log_softmax_backward:  gx = g - exp(y) * sum_j g_j
//
// A NaN in a row, a +inf (inf - inf) or a row of only -inf makes the whole row NaN, as in torch.
//
// The tensor is contiguous, seen as (outer, D, inner):
//   inner == 1: one warp per row of D contiguous elements (lanes stride the row: coalesced),
//               warp-shuffle reductions (fixed butterfly: deterministic).
//   inner  > 1: one thread per (outer, inner) column, walking d with stride `inner`; adjacent
//               threads read adjacent memory, so every pass over d is coalesced.
// exp is recomputed in the write pass instead of stored and re-read: compute is cheaper than the
// extra traffic.
// Sums accumulate in double (Acc), per thread and through the warp reduction, also for float: a
// float32 row of 2^28 elements gives each of a warp's 32 threads 2^23 terms, and a float partial
// sum that large drops its small terms (percent errors; csrc/cpu/softmax.cpp carries its float
// partials into double for the same reason; tests/test_softmax.py checks rows of 2^24 and 2^28
// elements on every device). One double add per element in memory-bound kernels, on GPUs whose
// FP64 rate is half the FP32 one (H100 / H200): expected to cost nothing visible, not yet
// measured (no GPU where this was written).
//
// bfloat16 / float16 are read and written as such and computed in float32 (compute_t, device.cuh;
// the sums still in double), each result rounded once.
//
// Napkin math (H100, device.cuh): a pass reads x twice (max, sum; the second mostly from L2 for
// rows that fit) and writes y once: ~12 B per fp32 element worst case, ~8 B typical; half of
// that in 16-bit.
// 4096 x 1000 fp32 (16 MB in, 16 MB out): ~11 us at 3 TB/s; the ~2 exps per element (~8M) are
// nothing beside that.
// LeNet's 64 x 10 logits are launch-bound (~3 us).
#include <cmath>

#include "cuda/device.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;
using Acc = double;

template <typename T, bool kLog>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                    int64_t D) {
  using std::exp;
  using std::log;
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    C m = -infinity<C>();
    for (int64_t j = lane; j < D; j += 32) {
      const C v = to_compute(xr[j]);
      m = v > m ? v : m;
    }
    m = warp_max(m);
    Acc s = 0;
    for (int64_t j = lane; j < D; j += 32) s += exp(to_compute(xr[j]) - m);
    s = warp_sum(s);
    if (!kLog) {
      const C inv = static_cast<C>(1 / s);
      for (int64_t j = lane; j < D; j += 32)
        yr[j] = from_compute<T>(exp(to_compute(xr[j]) - m) * inv);
    } else {
      const C lse = static_cast<C>(log(s));
      for (int64_t j = lane; j < D; j += 32)
        yr[j] = from_compute<T>((to_compute(xr[j]) - m) - lse);
    }
  }
}

template <typename T, bool kLog>
__global__ void softmax_cols_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t outer,
                                    int64_t D, int64_t inner) {
  using std::exp;
  using std::log;
  using C = compute_t<T>;
  PE_GRID_STRIDE_LOOP(c, outer * inner) {
    const int64_t o = c / inner;
    const int64_t base = o * D * inner + (c - o * inner);
    C m = -infinity<C>();
    for (int64_t d = 0; d < D; ++d) {
      const C v = to_compute(x[base + d * inner]);
      m = v > m ? v : m;
    }
    Acc s = 0;
    for (int64_t d = 0; d < D; ++d) s += exp(to_compute(x[base + d * inner]) - m);
    if (!kLog) {
      const C inv = static_cast<C>(1 / s);
      for (int64_t d = 0; d < D; ++d) {
        const int64_t k = base + d * inner;
        y[k] = from_compute<T>(exp(to_compute(x[k]) - m) * inv);
      }
    } else {
      const C lse = static_cast<C>(log(s));
      for (int64_t d = 0; d < D; ++d) {
        const int64_t k = base + d * inner;
        y[k] = from_compute<T>((to_compute(x[k]) - m) - lse);
      }
    }
  }
}

template <typename T, bool kLog>
__global__ void softmax_backward_rows_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                             T* __restrict__ gx, int64_t rows, int64_t D) {
  using std::exp;
  using C = compute_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += warps) {
    const T* gr = g + r * D;
    const T* yr = y + r * D;
    T* gxr = gx + r * D;
    Acc acc = 0;
    for (int64_t j = lane; j < D; j += 32)
      acc += kLog ? to_compute(gr[j]) : to_compute(gr[j]) * to_compute(yr[j]);
    const C s = static_cast<C>(warp_sum(acc));
    for (int64_t j = lane; j < D; j += 32) {
      const C gj = to_compute(gr[j]), yj = to_compute(yr[j]);
      gxr[j] = from_compute<T>(kLog ? gj - exp(yj) * s : yj * (gj - s));
    }
  }
}

template <typename T, bool kLog>
__global__ void softmax_backward_cols_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                             T* __restrict__ gx, int64_t outer, int64_t D,
                                             int64_t inner) {
  using std::exp;
  using C = compute_t<T>;
  PE_GRID_STRIDE_LOOP(c, outer * inner) {
    const int64_t o = c / inner;
    const int64_t base = o * D * inner + (c - o * inner);
    Acc acc = 0;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = base + d * inner;
      acc += kLog ? to_compute(g[k]) : to_compute(g[k]) * to_compute(y[k]);
    }
    const C s = static_cast<C>(acc);
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = base + d * inner;
      const C gk = to_compute(g[k]), yk = to_compute(y[k]);
      gx[k] = from_compute<T>(kLog ? gk - exp(yk) * s : yk * (gk - s));
    }
  }
}

template <typename T, bool kLog>
cudaError_t forward(const T* x, T* y, int64_t outer, int64_t D, int64_t inner,
                    cudaStream_t stream) {
  if (inner == 1) {
    softmax_rows_kernel<T, kLog>
        <<<grid_for(outer, kWarpsPerBlock), kThreads, 0, stream>>>(x, y, outer, D);
  } else {
    softmax_cols_kernel<T, kLog><<<grid_for(outer * inner), kThreads, 0, stream>>>(x, y, outer,
                                                                                   D, inner);
  }
  return cudaGetLastError();
}

template <typename T, bool kLog>
cudaError_t backward(const T* g, const T* y, T* gx, int64_t outer, int64_t D, int64_t inner,
                     cudaStream_t stream) {
  if (inner == 1) {
    softmax_backward_rows_kernel<T, kLog>
        <<<grid_for(outer, kWarpsPerBlock), kThreads, 0, stream>>>(g, y, gx, outer, D);
  } else {
    softmax_backward_cols_kernel<T, kLog>
        <<<grid_for(outer * inner), kThreads, 0, stream>>>(g, y, gx, outer, D, inner);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t softmax_forward(const T* x, T* y, int64_t outer, int64_t dim, int64_t inner,
                            bool log, cudaStream_t stream) {
  if (outer * dim * inner <= 0) return cudaSuccess;
  return log ? forward<T, true>(x, y, outer, dim, inner, stream)
             : forward<T, false>(x, y, outer, dim, inner, stream);
}

template <typename T>
cudaError_t softmax_backward(const T* grad, const T* result, T* grad_input, int64_t outer,
                             int64_t dim, int64_t inner, bool log, cudaStream_t stream) {
  if (outer * dim * inner <= 0) return cudaSuccess;
  return log ? backward<T, true>(grad, result, grad_input, outer, dim, inner, stream)
             : backward<T, false>(grad, result, grad_input, outer, dim, inner, stream);
}

#define PE_INSTANTIATE(T)                                                                     \
  template cudaError_t softmax_forward<T>(const T*, T*, int64_t, int64_t, int64_t, bool,     \
                                          cudaStream_t);                                      \
  template cudaError_t softmax_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                           bool, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
