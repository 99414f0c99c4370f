// THE list of pyengine's operators. Read this file first to know the engine.
//
// Every operator is declared here, once, with its schema. Each forward operator has a backward
// operator of its own, so torch.compile / torch.export can trace the backward pass and users can
// call it directly. The implementations are registered elsewhere, one file per concern:
//
//   csrc/autograd.cpp      Autograd key: wires each forward op to its backward op, and makes
//                          backward ops differentiable in turn (hand-written C++ graph nodes:
//                          cheap per call, and they compose with torch.func; docs/design.md).
//   csrc/autocast.cpp      AutocastCPU / AutocastCUDA keys: each forward op casts its arguments as
//                          torch's autocast casts its torch twin's (one policy table).
//   csrc/meta.cpp          Meta key: shape-only kernels, so FakeTensor / torch.compile / export work,
//                          symbolic (dynamic) shapes included.
//   csrc/cpu/<family>.cpp  CPU key: the hand-written CPU kernels.
//   csrc/cuda/<family>.*   CUDA key: the hand-written CUDA kernels (CUDA builds only).
//   csrc/python.cpp        pybind11 entry points that call the dispatcher directly (eager fast path).
//
// Argument checks and output-size math are shared by all backends: csrc/common/.
//
// Adding an operator: its schema here; its C++ signature once in csrc/op_handles.h (which
// generates its handle, its pyengine._C fast path and its Autograd registration); its kernels; its
// samples in tests/samples.py. tests/test_registry.py fails while any of them is missing.
//
// Conventions for every operator:
//   * float32, float64, bfloat16 and float16 (the last two computed in float32:
//     csrc/common/low_precision.h); other dtypes raise a clear error.
//   * Any input strides are accepted; outputs are freshly allocated, with the strides torch's own
//     operator gives for the same inputs (channels_last stays channels_last): csrc/common/layout.h.
//   * `reduction` follows ATen's enum: 0 = 'none', 1 = 'mean', 2 = 'sum'.
//   * Backward ops taking `output_mask` return undefined tensors (None in Python) for the
//     gradients they were not asked for.

#include <torch/library.h>

namespace {

// Every pyengine operator carries torch.Tag.pt2_compliant_tag: each has a Meta kernel and passes
// torch.library.opcheck (tests/test_samples.py), which is what the tag promises torch.compile
// (torch._dynamo.config.only_allow_pt2_compliant_ops refuses untagged custom operators). The
// schemas below are defined through this, so a new operator cannot leave the tag out.
struct TaggedDefs {
  torch::Library& library;
  void def(const char* schema) { library.def(schema, {at::Tag::pt2_compliant_tag}); }
};

}  // namespace

TORCH_LIBRARY(pyengine, library) {
  TaggedDefs m{library};
  // ---- Convolution --------------------------------------------------------------------------
  // input (N, C_in, H, W) or unbatched (C_in, H, W); weight (C_out, C_in / groups, kH, kW).
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- Max pooling --------------------------------------------------------------------------
  // indices: flat position of each maximum within its H*W input plane, as torch's.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> Tensor");
  m.def("max_pool2d_with_indices(Tensor input, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)");
  // The window geometry lets GPU kernels gather (deterministic) instead of scattering.
  // indices: each window's gradient goes to the element its index names. An index outside the
  // H*W plane is an error (a device-side assert on CUDA), except for a window with no input
  // element at all (dilation with padding can make one; its output is -inf), which passes no
  // gradient. An in-plane index that is not one of its window's taps gets the gradient all the
  // same, on every device (torch's CPU scatter; torch's CUDA kernel drops it).
  m.def("max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
        "-> Tensor");

  // ---- Fused: conv2d -> relu -> max_pool2d ----------------------------------------------------
  // max_pool2d(relu(conv2d(input, weight, bias, stride, padding, dilation, groups)), pool_*) in
  // one operator (LeNet's and VGG's block): the convolution's output is pooled, then the pooled
  // maxima go through relu (relu is monotonic, so the values are the same as relu first), and
  // neither the relu'd image nor its gradient is ever written. indices: the flat position, in
  // the convolution's H*W output plane, of each window's maximum (as max_pool2d_with_indices'
  // of the convolution's output). The backward takes the forward's output (`result`) and
  // indices, not the convolution's output: a window whose result is not > 0 passes no gradient.
  m.def("conv2d_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, int[2] pool_kernel_size, "
        "int[2] pool_stride, int[2] pool_padding, int[2] pool_dilation, bool pool_ceil_mode) "
        "-> (Tensor output, Tensor indices)");
  m.def("conv2d_relu_max_pool2d_backward(Tensor grad_output, Tensor result, Tensor indices, "
        "Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, int[2] pool_kernel_size, int[2] pool_stride, int[2] pool_padding, "
        "int[2] pool_dilation, bool pool_ceil_mode, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- Linear -------------------------------------------------------------------------------
  // input (*, in_features); weight (out_features, in_features); y = x W^T + b.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // ---- Activations --------------------------------------------------------------------------
  // Backward ops take whichever of input / result the derivative is cheapest from.
  m.def("relu(Tensor input) -> Tensor");
  m.def("relu_backward(Tensor grad_output, Tensor result) -> Tensor");
  m.def("leaky_relu(Tensor input, float negative_slope) -> Tensor");
  m.def("leaky_relu_backward(Tensor grad_output, Tensor input, float negative_slope) -> Tensor");
  m.def("sigmoid(Tensor input) -> Tensor");
  m.def("sigmoid_backward(Tensor grad_output, Tensor result) -> Tensor");
  m.def("tanh(Tensor input) -> Tensor");
  m.def("tanh_backward(Tensor grad_output, Tensor result) -> Tensor");
  m.def("softmax(Tensor input, int dim) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor result, int dim) -> Tensor");
  m.def("log_softmax(Tensor input, int dim) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_output, Tensor result, int dim) -> Tensor");

  // ---- Losses -------------------------------------------------------------------------------
  // mse_loss: weight (same shape as input) scales each squared error; 'mean' then divides by
  // weight.sum(), as torch.nn.functional.mse_loss does. Its backward returns d/d(input);
  // d/d(target) is the same op with input and target swapped.
  m.def("mse_loss(Tensor input, Tensor target, Tensor? weight, int reduction) -> Tensor");
  m.def("mse_loss_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "int reduction) -> Tensor");
  // binary_cross_entropy: input holds probabilities in [0, 1]; log terms are clamped at -100.
  m.def("binary_cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction) "
        "-> Tensor");
  m.def("binary_cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, "
        "Tensor? weight, int reduction) -> Tensor");
  // d/d(target) = grad_output * weight * -logit(input), torch's formula (no clamp: an input of
  // 0 or 1 gives an infinite gradient), divided by numel for 'mean'.
  m.def("binary_cross_entropy_target_backward(Tensor grad_output, Tensor input, Tensor target, "
        "Tensor? weight, int reduction) -> Tensor");
  // cross_entropy: logits (N, C), (C) or (N, C, d1, ...) (classes in dim 1, as torch's); weight
  // (C). The target's dtype decides its kind: int64 class indices (N), () or (N, d1, ...), or
  // floating class probabilities of input's shape and dtype (the 'mean' then divides by the
  // number of losses, N * d1 * ..., and ignore_index must be negative). The backward
  // op returns d/d(input); d/d(target) of probabilities is -grad * weight * log_softmax(input) *
  // (1 - label_smoothing), computed by autograd. label_smoothing defaults to 0 so that calls
  // written without it keep working.
  m.def("cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, "
        "int ignore_index, float label_smoothing=0.0) -> Tensor");
  // The loss, and each row's log-sum-exp of the logits, lse = log(sum_c exp(input_c)), which
  // cross_entropy's Autograd kernel saves for the backward (as torch saves log_softmax's
  // output): given it, the backward reads each logit once, with no max and sum passes of its
  // own. log_sum_exp is (N, d1, ..., 2) ((2) for unbatched input), input's dtype: per row the pair
  // (hi, lo), hi = lse rounded to the dtype and lo = lse - hi rounded, so that exp(x - hi - lo)
  // keeps the dtype's precision near the row's max however large the logits (a single float32
  // lse is 2^-10 off at 1e4). Not differentiable (a saved statistic, as the logsumexp output of
  // torch's flash attention): the loss is.
  m.def("cross_entropy_with_log_sum_exp(Tensor input, Tensor target, Tensor? weight, "
        "int reduction, int ignore_index, float label_smoothing=0.0) -> (Tensor, Tensor)");
  // log_sum_exp: optional, that of cross_entropy_with_log_sum_exp for this input (a cache: the
  // gradient flows through input). The CPU kernel uses it for float32 and float64 logits with
  // class-index targets and no label smoothing; the smoothed forms, 16-bit logits and the CUDA
  // kernel recompute the sums.
  m.def("cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, "
        "Tensor? weight, int reduction, int ignore_index, float label_smoothing=0.0, "
        "Tensor? log_sum_exp=None) -> Tensor");
}
