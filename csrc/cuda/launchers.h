#pragma once
// The CUDA launchers of every pyengine operator: plain functions over raw device pointers,
// sizes and a stream. Torch-free on purpose: the .cu files that define them include only CUDA
// headers and csrc/common, so `nvcc -c` checks each one on a machine with no GPU and no torch;
// the torch-facing glue (csrc/cuda/*_glue.cpp) runs the shared argument checks, allocates
// outputs and workspaces (caching allocator: capturable in CUDA graphs) and calls these.
//
// Conventions:
//   * T is the storage type: float, double, __half (float16) or __nv_bfloat16 (bfloat16),
//     explicitly instantiated in the .cu files. Arithmetic is in compute_t<T> (float for the
//     16-bit types, T itself otherwise): each kernel converts at load, accumulates in float32
//     (or double where the float32 kernels sum in double) and rounds each result once, at the
//     store, as the CPU operators do for 16-bit dtypes (compute in float32, then round).
//   * Every pointer is to contiguous memory on the current device; outputs are fully written.
//   * Nothing synchronises with the host; each launcher returns cudaGetLastError() after its
//     last launch (cudaSuccess when there was nothing to launch).
//   * Backward passes and reductions are deterministic: every output element is reduced by one
//     thread (or one fixed tree) in an order that depends on the shapes only. No float atomics.
//   * Workspaces are sized by the matching *_workspace() function, in elements of the stated
//     type (compute_t<T> for the GEMMs' split-K partials); a size of 0 means the pointer may be
//     null.
//   * conv2d and max_pool2d take the call's geometry (common/geometry.h) as the shared argument
//     checks (common/checks.h) filled it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/geometry.h"

namespace pyengine {
namespace cuda {

// The arithmetic type of a storage type: float for __half and __nv_bfloat16, T otherwise. The
// conversions between the two are device.cuh's to_compute() / from_compute<T>().
template <typename T>
struct Compute {
  using type = T;
};
template <>
struct Compute<__half> {
  using type = float;
};
template <>
struct Compute<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using compute_t = typename Compute<T>::type;

// ---- Activations (activation.cu) ------------------------------------------------------------

enum class Activation : int { Relu = 0, LeakyRelu = 1, Sigmoid = 2, Tanh = 3 };

// y[i] = f(x[i]); `slope` is leaky_relu's negative_slope (ignored by the others).
template <typename T>
cudaError_t activation_forward(Activation act, const T* x, T* y, int64_t n, double slope,
                               cudaStream_t stream);
// grad_input[i] = f'(saved[i]) * grad[i]; `saved` is the result (relu, sigmoid, tanh) or the
// input (leaky_relu), as the schemas in csrc/ops.cpp say.
template <typename T>
cudaError_t activation_backward(Activation act, const T* grad, const T* saved, T* grad_input,
                                int64_t n, double slope, cudaStream_t stream);

// ---- softmax / log_softmax (softmax.cu) ------------------------------------------------------
// The tensor seen as (outer, dim, inner), contiguous; the softmax runs along `dim`.

template <typename T>
cudaError_t softmax_forward(const T* x, T* y, int64_t outer, int64_t dim, int64_t inner,
                            bool log, cudaStream_t stream);
template <typename T>
cudaError_t softmax_backward(const T* grad, const T* result, T* grad_input, int64_t outer,
                             int64_t dim, int64_t inner, bool log, cudaStream_t stream);

// ---- max_pool2d (pool.cu) ----------------------------------------------------------------------

// indices may be null (max_pool2d without indices).
template <typename T>
cudaError_t max_pool2d_forward(const T* input, T* output, int64_t* indices,
                               const Pool2dGeometry<int64_t>& g, cudaStream_t stream);
// The CPU kernel's scatter (any in-plane index; windows without an in-bounds tap pass nothing),
// computed as a gather: each input element sums, in output order, the grad of the windows whose
// index names it. workspace: max_pool2d_backward_workspace() ints.
int64_t max_pool2d_backward_workspace();
template <typename T>
cudaError_t max_pool2d_backward(const T* grad_output, const int64_t* indices, T* grad_input,
                                const Pool2dGeometry<int64_t>& g, int* workspace,
                                cudaStream_t stream);
// The fused conv2d_relu_max_pool2d keeps its intermediates (the convolution's output, the
// gradient the pooling scatters) unrounded, in compute_t<T>, as the CPU operator keeps them in
// float32: max_pool2d over such an input, and the backward pass into such a gradient. For float
// and double they are the launchers above.
template <typename T>
cudaError_t max_pool2d_forward_from_compute(const compute_t<T>* input, T* output,
                                            int64_t* indices, const Pool2dGeometry<int64_t>& g,
                                            cudaStream_t stream);
template <typename T>
cudaError_t max_pool2d_backward_to_compute(const T* grad_output, const int64_t* indices,
                                           compute_t<T>* grad_input,
                                           const Pool2dGeometry<int64_t>& g, int* workspace,
                                           cudaStream_t stream);

// ---- linear (linear.cu) ------------------------------------------------------------------------
// x (rows, in), w (out, in), y (rows, out).

template <typename T>
cudaError_t linear_forward(const T* x, const T* w, const T* bias /*nullable*/, T* y, int64_t rows,
                           int64_t in, int64_t out, cudaStream_t stream);
template <typename T>
cudaError_t linear_grad_input(const T* grad, const T* w, T* grad_input, int64_t rows, int64_t in,
                              int64_t out, cudaStream_t stream);
// Elements of compute_t<T> needed by linear_grad_weight's deterministic split-K partial sums.
int64_t linear_grad_weight_workspace(int64_t rows, int64_t in, int64_t out);
template <typename T>
cudaError_t linear_grad_weight(const T* grad, const T* x, T* grad_weight, int64_t rows,
                               int64_t in, int64_t out, compute_t<T>* workspace,
                               cudaStream_t stream);

// out[c] = sum over n < batch, s < spatial of g[(n * channels + c) * spatial + s]: the bias
// gradient of linear (spatial = 1) and conv2d (spatial = out_h * out_w). Fixed-shape two-pass
// reduction in double; workspace in doubles.
int64_t channel_sum_workspace(int64_t batch, int64_t channels, int64_t spatial);
template <typename T>
cudaError_t channel_sum(const T* g, int64_t batch, int64_t channels, int64_t spatial, T* out,
                        double* workspace, cudaStream_t stream);
// The same over an unrounded compute_t<T> gradient (the fused operator's).
template <typename T>
cudaError_t channel_sum_from_compute(const compute_t<T>* g, int64_t batch, int64_t channels,
                                     int64_t spatial, T* out, double* workspace,
                                     cudaStream_t stream);

// ---- conv2d (conv2d.cu) -------------------------------------------------------------------------

template <typename T>
cudaError_t conv2d_forward(const T* input, const T* weight, const T* bias /*nullable*/, T* output,
                           const Conv2dGeometry<int64_t>& g, cudaStream_t stream);
// grad_input sums only the (tap, output) pairs that read each element, as torch's col2im does:
// the implicit GEMM's zeros for the others would turn an inf weight into NaN, so when the weight
// holds a non-finite value a direct gather recomputes grad_input. workspace:
// conv2d_grad_input_workspace() ints.
int64_t conv2d_grad_input_workspace();
template <typename T>
cudaError_t conv2d_grad_input(const T* grad_output, const T* weight, T* grad_input,
                              const Conv2dGeometry<int64_t>& g, int* workspace,
                              cudaStream_t stream);
// Elements of compute_t<T> (split-K partials).
int64_t conv2d_grad_weight_workspace(const Conv2dGeometry<int64_t>& g);
template <typename T>
cudaError_t conv2d_grad_weight(const T* grad_output, const T* input, T* grad_weight,
                               const Conv2dGeometry<int64_t>& g, compute_t<T>* workspace,
                               cudaStream_t stream);
// The fused operator's variants (see max_pool2d_forward_from_compute): the forward's output, the
// backward's grad_output in compute_t<T>, unrounded.
template <typename T>
cudaError_t conv2d_forward_to_compute(const T* input, const T* weight,
                                      const T* bias /*nullable*/, compute_t<T>* output,
                                      const Conv2dGeometry<int64_t>& g, cudaStream_t stream);
template <typename T>
cudaError_t conv2d_grad_input_from_compute(const compute_t<T>* grad_output, const T* weight,
                                           T* grad_input, const Conv2dGeometry<int64_t>& g,
                                           int* workspace, cudaStream_t stream);
template <typename T>
cudaError_t conv2d_grad_weight_from_compute(const compute_t<T>* grad_output, const T* input,
                                            T* grad_weight, const Conv2dGeometry<int64_t>& g,
                                            compute_t<T>* workspace, cudaStream_t stream);

// ---- Losses (loss.cu) ---------------------------------------------------------------------------
// reduction: 0 'none', 1 'mean', 2 'sum'. Sums are two-pass fixed-order trees in double.

// BinaryCrossEntropyTarget: binary_cross_entropy's derivative with respect to the target,
// g * w * -logit(x) (pointwise_loss_backward only; its grad_input is then d/d(target)).
enum class PointwiseLoss : int { Mse = 0, BinaryCrossEntropy = 1, BinaryCrossEntropyTarget = 2 };

// Doubles of workspace for pointwise_loss_forward / _backward over n elements.
int64_t pointwise_loss_workspace(int64_t n, int64_t reduction);
int64_t pointwise_loss_backward_workspace(int64_t n, int64_t reduction, bool mean_over_weight,
                                          bool has_weight);
// 'none': out has n elements; otherwise out is one element. 'mean' divides by n, or by sum(w)
// when mean_over_weight (mse_loss with a weight, as torch.nn.functional). binary_cross_entropy
// stops with a device-side assert when an input or target element lies outside [0, 1].
template <typename T>
cudaError_t pointwise_loss_forward(PointwiseLoss loss, const T* x, const T* t,
                                   const T* w /*nullable*/, int64_t n, int64_t reduction,
                                   bool mean_over_weight, T* out, double* workspace,
                                   cudaStream_t stream);
// grad is n elements for 'none', else one (read on the device: no host sync).
template <typename T>
cudaError_t pointwise_loss_backward(PointwiseLoss loss, const T* grad, const T* x, const T* t,
                                    const T* w /*nullable*/, int64_t n, int64_t reduction,
                                    bool mean_over_weight, T* grad_input, double* workspace,
                                    cudaStream_t stream);

// Logits (rows, classes), class weights (classes) or null, and one kind of target: int64 class
// indices (rows), probs null; or probabilities (rows, classes), target null (probs may be null
// too when there are no classes). A class index that is neither in [0, classes) nor
// ignore_index stops the kernel with a device-side assert. label_smoothing in [0, 1].
// unbatched: one row given as a (classes) input and a 0-d target; its 'mean' without smoothing
// is then 0 when the target is ignore_index, as torch's CUDA loss gives (its CPU loss, and
// every batch, give 0 / 0 = NaN). lse: null, or 2 * rows slots for each row's log-sum-exp pair
// (cross_entropy_with_log_sum_exp).
int64_t cross_entropy_workspace(int64_t rows, int64_t reduction);
int64_t cross_entropy_backward_workspace(int64_t rows, int64_t reduction, bool probabilities);
template <typename T>
cudaError_t cross_entropy_forward(const T* x, const int64_t* target, const T* probs, const T* w,
                                  int64_t rows, int64_t classes, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing, bool unbatched,
                                  T* out, T* lse, double* workspace, cudaStream_t stream);
template <typename T>
cudaError_t cross_entropy_backward(const T* grad, const T* x, const int64_t* target,
                                   const T* probs, const T* w, int64_t rows, int64_t classes,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing, T* grad_input, double* workspace,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine
