// CUDA kernels of linear (y = x W^T + b) and linear_backward, on pyengine's GEMM (gemm.cuh), and
// the per-channel sum that gives the bias gradient of linear and conv2d.
//
// Shapes: x (rows, in) after flattening the leading dims, W (out, in), y (rows, out).
//   forward      y  = x W^T      M = rows, N = out, K = in    A = x (along k), B(k, j) = W[j, k]
//   grad_input   dx = dy W       M = rows, N = in,  K = out   A = dy (along k), B = W (along j)
//   grad_weight  dW = dy^T x     M = out,  N = in,  K = rows  split-K over the batch, partials
//                                                              summed in order (deterministic)
//   grad_bias    db = sum_r dy   channel_sum with spatial = 1
//
// Napkin math, LeNet fc1 (400 -> 120) at batch 8192, fp32: each GEMM is 2 * 8192 * 400 * 120 =
// 0.79 GFLOP over 13 MB (x) + 0.19 MB (W) + 3.9 MB (y): ~46 FLOP/byte, compute-bound on paper:
// ~13 us at the ~60 TFLOP/s fp32 peak (device.cuh), ~50-80 us at the ~10-20 TFLOP/s this simple
// tiled kernel can reach (gemm.cuh).
// The bias gradient reads 3.9 MB: ~1.3 us at 3 TB/s (plus a launch).
// bfloat16 / float16 operands are loaded as such (half the bytes: 6.6 + 0.1 + 2 MB) and
// multiplied and summed in float32 (gemm.cuh); the FLOPs are the same.
#include "cuda/device.cuh"
#include "cuda/gemm.cuh"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {
namespace {

// C[i, j] (+ bias[j]) into a row-major matrix with leading dimension ld.
template <typename T>
struct RowMajorStore {
  T* c;
  const T* bias;
  int64_t ld;
  __device__ void operator()(int64_t, int64_t i, int64_t j, compute_t<T> acc) const {
    c[i * ld + j] = from_compute<T>(bias != nullptr ? acc + to_compute(bias[j]) : acc);
  }
};

// ---- channel_sum ----------------------------------------------------------------------------
//
// g seen as (batch, channels, spatial). Pass 1 cuts the batch * spatial items of each channel
// into `chunks` fixed ranges; one block sums a (channel, chunk) pair in a fixed pattern and tree
// into partial[c * chunks + chunk] (double). Pass 2: one thread per channel adds its partials in
// chunk order. Two layouts for pass 1:
//   spatial > 1 (conv): a block per (channel, chunk); threads walk consecutive items, which are
//                       consecutive in memory within an image: coalesced.
//   spatial == 1 (linear): a block of 32 channels x 8 row-groups per chunk of rows; a warp reads
//                       32 consecutive channels of a row: coalesced.

PE_LAUNCH_CAP(kItemsPerChunk, 8192);
PE_LAUNCH_CAP(kTargetChunkBlocks, 528);
PE_LAUNCH_CAP(kMaxChunks, 1024);

struct ChannelPlan {
  int64_t chunks, per_chunk;
};

ChannelPlan channel_plan(int64_t batch, int64_t channels, int64_t spatial) {
  ChannelPlan p{0, 0};
  const int64_t items = batch * spatial;
  if (items <= 0 || channels <= 0) return p;
  const int64_t channel_blocks = spatial == 1 ? (channels + 31) / 32 : channels;
  int64_t chunks = (kTargetChunkBlocks + channel_blocks - 1) / channel_blocks;
  const int64_t by_items = (items + kItemsPerChunk - 1) / kItemsPerChunk;
  if (chunks > by_items) chunks = by_items;
  if (chunks > kMaxChunks) chunks = kMaxChunks;
  if (chunks < 1) chunks = 1;
  p.per_chunk = (items + chunks - 1) / chunks;
  p.chunks = (items + p.per_chunk - 1) / p.per_chunk;
  return p;
}

template <typename T>
__global__ void channel_sum_spatial_kernel(const T* __restrict__ g, const int64_t channels,
                                           const int64_t spatial, const int64_t items,
                                           const int64_t per_chunk, const int64_t chunks,
                                           double* __restrict__ partial) {
  __shared__ double scratch[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * per_chunk;
  const int64_t end = min(items, begin + per_chunk);
  double acc = 0;
  for (int64_t u = begin + threadIdx.x; u < end; u += kThreads) {
    const int64_t n = u / spatial;
    acc += static_cast<double>(to_compute(g[(n * channels + c) * spatial + (u - n * spatial)]));
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[c * chunks + chunk] = acc;
}

template <typename T>
__global__ void channel_sum_rows_kernel(const T* __restrict__ g, const int64_t channels,
                                        const int64_t rows, const int64_t per_chunk,
                                        const int64_t chunks,
                                        double* __restrict__ partial) {
  __shared__ double scratch[8][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * per_chunk;
  const int64_t end = min(rows, begin + per_chunk);
  double acc = 0;
  if (c < channels)
    for (int64_t r = begin + ty; r < end; r += 8)
      acc += static_cast<double>(to_compute(g[r * channels + c]));
  scratch[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < channels) {
    double s = ((scratch[0][tx] + scratch[1][tx]) + (scratch[2][tx] + scratch[3][tx])) +
               ((scratch[4][tx] + scratch[5][tx]) + (scratch[6][tx] + scratch[7][tx]));
    partial[c * chunks + chunk] = s;
  }
}

template <typename T>
__global__ void channel_sum_finish_kernel(const double* __restrict__ partial,
                                          const int64_t channels, const int64_t chunks,
                                          T* __restrict__ out) {
  PE_GRID_STRIDE_LOOP(c, channels) {
    double s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += partial[c * chunks + k];
    out[c] = from_compute<T>(static_cast<compute_t<T>>(s));
  }
}

}  // namespace

int64_t channel_sum_workspace(int64_t batch, int64_t channels, int64_t spatial) {
  const ChannelPlan p = channel_plan(batch, channels, spatial);
  return p.chunks * channels;
}

namespace {

// Reads G (T, or compute_t<T>: the fused operator's unrounded gradient), writes T.
template <typename G, typename T>
cudaError_t channel_sum_impl(const G* g, int64_t batch, int64_t channels, int64_t spatial, T* out,
                             double* workspace, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  const ChannelPlan p = channel_plan(batch, channels, spatial);
  if (p.chunks > 0) {
    if (spatial == 1) {
      const dim3 grid(static_cast<unsigned>((channels + 31) / 32),
                      static_cast<unsigned>(p.chunks));
      channel_sum_rows_kernel<G>
          <<<grid, kThreads, 0, stream>>>(g, channels, batch, p.per_chunk, p.chunks, workspace);
    } else {
      const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(p.chunks));
      channel_sum_spatial_kernel<G><<<grid, kThreads, 0, stream>>>(
          g, channels, spatial, batch * spatial, p.per_chunk, p.chunks, workspace);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // With no items (an empty batch) the sums are zeros: chunks == 0 partials.
  channel_sum_finish_kernel<T>
      <<<grid_for(channels), kThreads, 0, stream>>>(workspace, channels, p.chunks, out);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t channel_sum(const T* g, int64_t batch, int64_t channels, int64_t spatial, T* out,
                        double* workspace, cudaStream_t stream) {
  return channel_sum_impl(g, batch, channels, spatial, out, workspace, stream);
}

template <typename T>
cudaError_t channel_sum_from_compute(const compute_t<T>* g, int64_t batch, int64_t channels,
                                     int64_t spatial, T* out, double* workspace,
                                     cudaStream_t stream) {
  return channel_sum_impl(g, batch, channels, spatial, out, workspace, stream);
}

template <typename T>
cudaError_t linear_forward(const T* x, const T* w, const T* bias, T* y, int64_t rows, int64_t in,
                           int64_t out, cudaStream_t stream) {
  const gemm::Dense<T, true> a{x, 0, in, 1};
  const gemm::Dense<T, true> b{w, 0, in, 1};  // B(k, j) = W[j, k]: line j, along k
  return gemm::launch<compute_t<T>, false>(rows, out, in, 1, a, b, RowMajorStore<T>{y, bias, out},
                                           static_cast<compute_t<T>*>(nullptr), stream);
}

template <typename T>
cudaError_t linear_grad_input(const T* grad, const T* w, T* grad_input, int64_t rows, int64_t in,
                              int64_t out, cudaStream_t stream) {
  const gemm::Dense<T, true> a{grad, 0, out, 1};
  const gemm::Dense<T, false> b{w, 0, 1, in};  // B(k, j) = W[k, j]: line j, k stride in
  return gemm::launch<compute_t<T>, false>(rows, in, out, 1, a, b,
                                           RowMajorStore<T>{grad_input, nullptr, in},
                                           static_cast<compute_t<T>*>(nullptr), stream);
}

int64_t linear_grad_weight_workspace(int64_t rows, int64_t in, int64_t out) {
  return gemm::workspace_elements(out, in, rows, 1, true);
}

template <typename T>
cudaError_t linear_grad_weight(const T* grad, const T* x, T* grad_weight, int64_t rows,
                               int64_t in, int64_t out, compute_t<T>* workspace,
                               cudaStream_t stream) {
  const gemm::Dense<T, false> a{grad, 0, 1, out};  // A(i, k) = dy[k, i]: line i, k stride out
  const gemm::Dense<T, false> b{x, 0, 1, in};      // B(k, j) = x[k, j]: line j, k stride in
  return gemm::launch<compute_t<T>, true>(out, in, rows, 1, a, b,
                                          RowMajorStore<T>{grad_weight, nullptr, in}, workspace,
                                          stream);
}

#define PE_INSTANTIATE(T)                                                                     \
  template cudaError_t linear_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, \
                                         int64_t, cudaStream_t);                              \
  template cudaError_t linear_grad_input<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                            cudaStream_t);                                    \
  template cudaError_t linear_grad_weight<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                             compute_t<T>*, cudaStream_t);                    \
  template cudaError_t channel_sum<T>(const T*, int64_t, int64_t, int64_t, T*, double*,      \
                                      cudaStream_t);                                          \
  template cudaError_t channel_sum_from_compute<T>(const compute_t<T>*, int64_t, int64_t,     \
                                                   int64_t, T*, double*, cudaStream_t);
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
PE_INSTANTIATE(__half)
PE_INSTANTIATE(__nv_bfloat16)
#undef PE_INSTANTIATE

}  // namespace cuda
}  // namespace pyengine
