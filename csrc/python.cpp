// pybind11 entry points: the eager fast path from pyengine.functional into the dispatcher.
// Calling a typed operator handle from here costs about a third less host time than going
// through torch.ops (docs/design.md; the benchmark suite measures it), which matters for small
// batches. Under torch.compile the functional layer calls torch.ops.pyengine.* instead, which
// Dynamo can trace.
//
// Only forward operators are here: autograd calls the backward operators from C++, and users
// who want them directly have torch.ops.pyengine.*_backward.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include "cpu/isa.h"
#include "op_handles.h"

namespace py = pybind11;
using namespace pyengine;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyengine's compiled operators (registered as torch.ops.pyengine.*)";

  m.def("conv2d", [](const Tensor& input, const Tensor& weight, const OptTensor& bias,
                     IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                     int64_t groups) {
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
  });
  m.def("max_pool2d", [](const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                         IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
    return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode);
  });
  m.def("max_pool2d_with_indices", [](const Tensor& input, IntArrayRef kernel_size,
                                      IntArrayRef stride, IntArrayRef padding,
                                      IntArrayRef dilation, bool ceil_mode) {
    return max_pool2d_with_indices_op().call(input, kernel_size, stride, padding, dilation,
                                             ceil_mode);
  });
  m.def("linear", [](const Tensor& input, const Tensor& weight, const OptTensor& bias) {
    return linear_op().call(input, weight, bias);
  });
  m.def("relu", [](const Tensor& input) { return relu_op().call(input); });
  m.def("leaky_relu", [](const Tensor& input, double negative_slope) {
    return leaky_relu_op().call(input, negative_slope);
  });
  m.def("sigmoid", [](const Tensor& input) { return sigmoid_op().call(input); });
  m.def("tanh", [](const Tensor& input) { return tanh_op().call(input); });
  m.def("softmax", [](const Tensor& input, int64_t dim) { return softmax_op().call(input, dim); });
  m.def("log_softmax",
        [](const Tensor& input, int64_t dim) { return log_softmax_op().call(input, dim); });
  m.def("mse_loss", [](const Tensor& input, const Tensor& target, const OptTensor& weight,
                       int64_t reduction) {
    return mse_loss_op().call(input, target, weight, reduction);
  });
  m.def("binary_cross_entropy", [](const Tensor& input, const Tensor& target,
                                   const OptTensor& weight, int64_t reduction) {
    return binary_cross_entropy_op().call(input, target, weight, reduction);
  });
  m.def("cross_entropy", [](const Tensor& input, const Tensor& target, const OptTensor& weight,
                            int64_t reduction, int64_t ignore_index) {
    return cross_entropy_op().call(input, target, weight, reduction, ignore_index);
  });

  // {CPU kernel family: instruction set it runs with} (csrc/cpu/isa.h, which PYENGINE_CPU_ISA
  // steers); raises for a PYENGINE_CPU_ISA value it does not know.
  m.def("cpu_isa", &cpu::kernel_isas);

  // What this binary was built against, checked by pyengine/__init__.py at import.
  m.attr("built_with_torch") = py::make_tuple(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
#ifdef PYENGINE_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
