// Autograd for every pyengine operator, registered once at the Autograd key (all devices).
//
// Each operator's Autograd kernel is written the way PyTorch writes its own (the generated
// VariableType kernels): it redispatches below autograd to the device kernel and, when an input
// needs a gradient, records a graph node of its own type (a torch::autograd::Node subclass below)
// that holds what the backward needs. Not a torch::autograd::Function: functorch refuses those
// ("cannot use C++ torch::autograd::Function with functorch transforms"), while nodes made this
// way compose with torch.func.grad / vjp / jacrev / vmap exactly as aten's operators do.
//
//   * Forward ops: their node calls the op's backward operator through the dispatcher, so
//     torch.compile / AOTAutograd trace it as an operator of its own.
//   * Backward ops are differentiable too (double backward, gradient penalties, Hessian-vector
//     products): their nodes compute the derivative of the backward pass, in terms of pyengine's
//     operators where it is one (the derivative of conv2d_backward is made of conv2d and
//     conv2d_backward, of relu_backward of relu_backward, ...) and of ATen's elementwise arithmetic
//     for the rest. Those are differentiable in turn, so any order works.
//   * Forward-mode AD (torch.func.jvp / jacfwd / hessian, torch.autograd.forward_ad): every op,
//     forward and backward, sets the tangent of its outputs from its inputs' tangents, computed
//     from their primal values.
//
// When no input needs a gradient and none carries a tangent, a kernel only redispatches: that
// keeps the host cost of an inference call close to a bare dispatch (docs/design.md).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "op_handles.h"

namespace pyengine {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// ---- Graph-building helpers ---------------------------------------------------------------

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t.has_value() && needs_grad(*t); }
template <typename... Ts>
bool any_needs_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (needs_grad(ts) || ...);
}

// Forward-mode AD: the tangent an input carries (undefined when none).
Tensor tangent(const Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : Tensor(); }
Tensor tangent(const OptTensor& t) { return t.has_value() ? tangent(*t) : Tensor(); }
// The value of a dual tensor without its tangent: tangent formulas must read primals (a tangent
// computed from a dual tensor would carry a tangent of its own at the same level).
Tensor primal(const Tensor& t) { return t.defined() ? t._fw_primal(/*level=*/0) : t; }
template <typename... Ts>
bool any_tangent(const Ts&... ts) {
  return (tangent(ts).defined() || ...);
}

// A differentiable argument whose gradient pyengine does not compute: say so up front.
void refuse_grad(const OptTensor& t, const char* op, const char* arg) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad(t)), "pyengine.", op,
              ": the gradient with respect to ", arg, " is not supported; pass ", arg,
              ".detach() or compute it outside pyengine");
  TORCH_CHECK(!tangent(t).defined(), "pyengine.", op,
              ": forward-mode AD with respect to ", arg, " is not supported; pass ", arg,
              " without a tangent");
}

// Runs `fn` below autograd: the device kernel, with no graph recorded.
template <typename Fn>
auto below_autograd(Fn&& fn) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return fn();
}

// Node handles are std::shared_ptr<Node> in older torch, c10::intrusive_ptr<Node> in newer
// ones; everything below goes through these two so both build.
using NodePtr = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <typename N>
NodePtr self_ptr(N* node) {
  if constexpr (kSharedNodes) {
    return node->shared_from_this();
  } else {
    return node->getptr();
  }
}

template <typename N>
auto allocate_node() {
  if constexpr (kSharedNodes) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

// A graph node of pyengine's. `Derived` supplies kName and
// `variable_list backward(const variable_list& grads)`, which runs on the gradients of the
// recorded outputs and returns one gradient (or an undefined tensor) per recorded input.
template <typename Derived>
struct PyengineNode : public Node {
  std::vector<SavedVariable> saved_tensors;

  std::string name() const override { return Derived::kName; }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<Derived*>(this)->backward(grads);
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_tensors) s.reset_data();
  }

  // Saves are numbered in call order. An output is saved after set_history (autograd's rule)
  // and after its tangent is set (a saved tensor keeps the tangent it has when saved).
  void save(const Tensor& t, bool is_output = false) { saved_tensors.emplace_back(t, is_output); }
  void save(const OptTensor& t) { save(t.has_value() ? *t : Tensor()); }
  Tensor saved(size_t i) { return saved_tensors[i].unpack(self_ptr(this)); }
  OptTensor saved_opt(size_t i) {
    Tensor t = saved(i);
    return t.defined() ? OptTensor(t) : std::nullopt;
  }
  bool wants(size_t input) const { return task_should_compute_output(input); }
};

// A node of type N whose inputs (in this order) are the given tensors; the backward returns their
// gradients in the same order.
template <typename N, typename... Inputs>
auto make_node(const Inputs&... inputs) {
  auto node = allocate_node<N>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

template <typename... Outputs>
void record(const NodePtr& node, const Outputs&... outputs) {
  (torch::autograd::set_history(outputs, node), ...);
}

void set_tangent(const Tensor& output, const Tensor& tangent_value) {
  if (tangent_value.defined()) output._set_fw_grad(tangent_value, /*level=*/0, /*is_inplace_op=*/false);
}

void set_tangents(const Tensor3& outputs, const Tensor3& tangents) {
  set_tangent(std::get<0>(outputs), std::get<0>(tangents));
  set_tangent(std::get<1>(outputs), std::get<1>(tangents));
  set_tangent(std::get<2>(outputs), std::get<2>(tangents));
}

// a + b where either may be undefined (a zero).
Tensor add_maybe(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---- Formulas shared by several operators -------------------------------------------------

// f(x, w, b) bilinear in (x, w) plus b (conv2d, linear): its derivative along (dx, dw, db) is
// f(dx, w, db) + f(x, dw); `bias_like` broadcasts db alone over an output shaped like `like`.
template <typename F, typename BiasLike>
Tensor bilinear_tangent(F&& f, const Tensor& x, const Tensor& dx, const Tensor& w,
                        const Tensor& dw, const Tensor& db, BiasLike&& bias_like,
                        const Tensor& like) {
  Tensor out;
  if (dx.defined()) out = f(dx, w, opt(db));
  if (dw.defined()) out = add_maybe(out, f(x, dw, dx.defined() ? std::nullopt : opt(db)));
  if (!out.defined() && db.defined()) out = bias_like(db, like);
  return out;
}

// The tangent of a backward op bw(g, x, w) -> (grad_input, grad_weight, grad_bias) of such an f:
// linear in g, grad_input linear in w and grad_weight in x (conv2d_backward, linear_backward).
template <typename Bw>
Tensor3 bilinear_backward_tangent(Bw&& bw, const Tensor& g, const Tensor& dg, const Tensor& x,
                                  const Tensor& dx, const Tensor& w, const Tensor& dw,
                                  Mask3 mask) {
  Tensor3 out;
  if (dg.defined()) out = bw(dg, x, w, mask);
  if (dw.defined() && mask[0])
    std::get<0>(out) = add_maybe(std::get<0>(out), std::get<0>(bw(g, x, dw, {true, false, false})));
  if (dx.defined() && mask[1])
    std::get<1>(out) = add_maybe(std::get<1>(out), std::get<1>(bw(g, dx, w, {false, true, false})));
  return out;
}

// The bias's share of a gradient or tangent shaped like `like`: (*, C, H, W) or (*, C).
Tensor conv_bias_like(const Tensor& b, const Tensor& like) {
  return b.view({-1, 1, 1}).expand(like.sizes()).contiguous();
}
Tensor linear_bias_like(const Tensor& b, const Tensor& like) {
  return b.expand(like.sizes()).contiguous();
}

// Reads `source` (* , H, W) at each flat in-plane index of `indices` (*, H', W'); an index
// outside the plane (a window with no input element) reads 0, as it passes no gradient.
Tensor gather_plane(const Tensor& source, const Tensor& indices) {
  const int64_t plane = source.size(-1) * source.size(-2);
  Tensor flat_source = source.flatten(-2);
  Tensor flat_indices = indices.flatten(-2);
  Tensor valid = flat_indices.ge(0).logical_and(flat_indices.lt(plane));
  Tensor read = flat_source.gather(-1, flat_indices.clamp(0, std::max<int64_t>(plane - 1, 0)));
  return read.masked_fill(valid.logical_not(), 0).view(indices.sizes());
}

// ---- Convolution --------------------------------------------------------------------------

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  void set(IntArrayRef s, IntArrayRef p, IntArrayRef d, int64_t g) {
    stride = s.vec();
    padding = p.vec();
    dilation = d.vec();
    groups = g;
  }
};

Tensor conv2d_with(const ConvParams& p, const Tensor& x, const Tensor& w, const OptTensor& b) {
  return conv2d_op().call(x, w, b, p.stride, p.padding, p.dilation, p.groups);
}

struct Conv2dNode : PyengineNode<Conv2dNode> {
  static constexpr const char* kName = "pyengine::conv2d_backward";
  ConvParams params;
  bool has_bias = false;
  variable_list backward(const variable_list& grads) {  // inputs: input, weight, bias
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const Mask3 mask{wants(0), wants(1), has_bias && wants(2)};
    auto [gi, gw, gb] = conv2d_backward_op().call(grads[0], saved(0), saved(1), params.stride,
                                                  params.padding, params.dilation, params.groups,
                                                  mask);
    return {gi, gw, gb};
  }
};

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                       IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                       int64_t groups) {
  const bool grad = any_needs_grad(input, weight, bias);
  const bool fw = any_tangent(input, weight, bias);
  Tensor result = below_autograd(
      [&] { return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups); });
  if (grad) {
    auto node = make_node<Conv2dNode>(input, weight, bias);
    node->params.set(stride, padding, dilation, groups);
    node->has_bias = bias.has_value() && bias->defined();
    node->save(input);
    node->save(weight);
    record(node, result);
  }
  if (fw) {
    ConvParams p;
    p.set(stride, padding, dilation, groups);
    set_tangent(result, bilinear_tangent(
                            [&](const Tensor& x, const Tensor& w, const OptTensor& b) {
                              return conv2d_with(p, x, w, b);
                            },
                            primal(input), tangent(input), primal(weight), tangent(weight),
                            tangent(bias), conv_bias_like, result));
  }
  return result;
}

// d/d(grad_output, input, weight) of conv2d_backward's (grad_input, grad_weight, grad_bias).
// grad_input = conv2d's input-adjoint of grad_output through weight, grad_weight its
// weight-adjoint through input: <ggi, grad_input> = <conv2d(ggi, weight), grad_output> and
// <ggw, grad_weight> = <conv2d(input, ggw), grad_output>, so
//   d/d(grad_output) = conv2d(ggi, weight, ggb) + conv2d(input, ggw),
//   d/d(input)       = conv2d_backward(grad_output, input, ggw).grad_input,
//   d/d(weight)      = conv2d_backward(grad_output, ggi, weight).grad_weight.
struct Conv2dBackwardNode : PyengineNode<Conv2dBackwardNode> {
  static constexpr const char* kName = "pyengine::conv2d_backward_backward";
  ConvParams params;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input, weight
    const Tensor &ggi = grads[0], &ggw = grads[1], &ggb = grads[2];
    const Tensor g = saved(0), x = saved(1), w = saved(2);
    variable_list out(3);
    if (wants(0)) {
      out[0] = bilinear_tangent(
          [&](const Tensor& a, const Tensor& b, const OptTensor& c) {
            return conv2d_with(params, a, b, c);
          },
          x, ggi, w, ggw, ggb, conv_bias_like, g);
    }
    if (wants(1) && ggw.defined()) {
      out[1] = std::get<0>(conv2d_backward_op().call(g, x, ggw, params.stride, params.padding,
                                                     params.dilation, params.groups,
                                                     {true, false, false}));
    }
    if (wants(2) && ggi.defined()) {
      out[2] = std::get<1>(conv2d_backward_op().call(g, ggi, w, params.stride, params.padding,
                                                     params.dilation, params.groups,
                                                     {false, true, false}));
    }
    return out;
  }
};

Tensor3 conv2d_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                 const Tensor& weight, IntArrayRef stride, IntArrayRef padding,
                                 IntArrayRef dilation, int64_t groups, Mask3 output_mask) {
  auto result = below_autograd([&] {
    return conv2d_backward_op().call(grad_output, input, weight, stride, padding, dilation,
                                     groups, output_mask);
  });
  if (any_needs_grad(grad_output, input, weight)) {
    auto node = make_node<Conv2dBackwardNode>(grad_output, input, weight);
    node->params.set(stride, padding, dilation, groups);
    node->save(grad_output);
    node->save(input);
    node->save(weight);
    record(node, std::get<0>(result), std::get<1>(result), std::get<2>(result));
  }
  if (any_tangent(grad_output, input, weight)) {
    auto bw = [&](const Tensor& g, const Tensor& x, const Tensor& w, Mask3 mask) {
      return conv2d_backward_op().call(g, x, w, stride, padding, dilation, groups, mask);
    };
    set_tangents(result, bilinear_backward_tangent(bw, primal(grad_output), tangent(grad_output),
                                                   primal(input), tangent(input), primal(weight),
                                                   tangent(weight), output_mask));
  }
  return result;
}

// ---- Max pooling --------------------------------------------------------------------------

struct PoolParams {
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  bool ceil_mode = false;
  void set(IntArrayRef k, IntArrayRef s, IntArrayRef p, IntArrayRef d, bool c) {
    kernel_size = k.vec();
    stride = s.vec();
    padding = p.vec();
    dilation = d.vec();
    ceil_mode = c;
  }
};

struct MaxPool2dNode : PyengineNode<MaxPool2dNode> {
  static constexpr const char* kName = "pyengine::max_pool2d_backward";
  PoolParams params;
  variable_list backward(const variable_list& grads) {  // inputs: input
    if (!grads[0].defined()) return variable_list(1);
    return {max_pool2d_backward_op().call(grads[0], saved(0), saved(1), params.kernel_size,
                                          params.stride, params.padding, params.dilation,
                                          params.ceil_mode)};
  }
};

// Records max pooling's node on `output` (indices: where each window's maximum is) and its
// tangent: the input's tangent read at the maxima.
void record_max_pool2d(const Tensor& input, const Tensor& output, const Tensor& indices,
                       bool grad, IntArrayRef kernel_size, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  if (grad) {
    auto node = make_node<MaxPool2dNode>(input);
    node->params.set(kernel_size, stride, padding, dilation, ceil_mode);
    node->save(input);
    node->save(indices);
    record(node, output);
  }
  const Tensor dx = tangent(input);
  if (dx.defined()) set_tangent(output, gather_plane(dx, indices));
}

Tensor2 max_pool2d_with_indices_autograd(const Tensor& input, IntArrayRef kernel_size,
                                         IntArrayRef stride, IntArrayRef padding,
                                         IntArrayRef dilation, bool ceil_mode) {
  const bool grad = any_needs_grad(input);
  auto [output, indices] = below_autograd([&] {
    return max_pool2d_with_indices_op().call(input, kernel_size, stride, padding, dilation,
                                             ceil_mode);
  });
  if (grad || any_tangent(input))
    record_max_pool2d(input, output, indices, grad, kernel_size, stride, padding, dilation,
                      ceil_mode);
  return {output, indices};
}

// Without a gradient or tangent to compute, the indices are not worth writing.
Tensor max_pool2d_autograd(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  if (!any_needs_grad(input) && !any_tangent(input)) {
    return below_autograd([&] {
      return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode);
    });
  }
  return std::get<0>(
      max_pool2d_with_indices_autograd(input, kernel_size, stride, padding, dilation, ceil_mode));
}

// grad_input scatters grad_output to the indices: its derivative with respect to grad_output
// gathers from them; `input` only gives the shape (derivative zero).
struct MaxPool2dBackwardNode : PyengineNode<MaxPool2dBackwardNode> {
  static constexpr const char* kName = "pyengine::max_pool2d_backward_backward";
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input
    variable_list out(2);
    if (grads[0].defined() && wants(0)) out[0] = gather_plane(grads[0], saved(0));
    return out;
  }
};

Tensor max_pool2d_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                    const Tensor& indices, IntArrayRef kernel_size,
                                    IntArrayRef stride, IntArrayRef padding,
                                    IntArrayRef dilation, bool ceil_mode) {
  Tensor result = below_autograd([&] {
    return max_pool2d_backward_op().call(grad_output, input, indices, kernel_size, stride,
                                         padding, dilation, ceil_mode);
  });
  if (any_needs_grad(grad_output, input)) {
    auto node = make_node<MaxPool2dBackwardNode>(grad_output, input);
    node->save(indices);
    record(node, result);
  }
  const Tensor dg = tangent(grad_output);  // linear in grad_output; input only gives the shape
  if (dg.defined()) {
    set_tangent(result, max_pool2d_backward_op().call(dg, primal(input), indices, kernel_size,
                                                      stride, padding, dilation, ceil_mode));
  }
  return result;
}

// ---- Fused: conv2d -> relu -> max_pool2d ------------------------------------------------------
// out = relu(p), (p, indices) = max_pool2d(y), y = conv2d(x, w, b). Its derivatives are the
// chain of the three operators', written with them: the backward operator's gradient image of y
// (conv_grad_image) is max_pool2d_backward of relu_backward, which are differentiable in turn.

struct ConvPoolParams {
  ConvParams conv;
  PoolParams pool;
  void set(IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
           IntArrayRef pool_kernel_size, IntArrayRef pool_stride, IntArrayRef pool_padding,
           IntArrayRef pool_dilation, bool pool_ceil_mode) {
    conv.set(stride, padding, dilation, groups);
    pool.set(pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode);
  }
  Tensor3 backward(const Tensor& g, const Tensor& result, const Tensor& indices, const Tensor& x,
                   const Tensor& w, Mask3 mask) const {
    return conv2d_relu_max_pool2d_backward_op().call(
        g, result, indices, x, w, conv.stride, conv.padding, conv.dilation, conv.groups,
        pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, mask);
  }
  // An uninitialised tensor of y's shape (max_pool2d_backward reads only its shape).
  Tensor image_like_y(const Tensor& x, const Tensor& w) const {
    const auto s = check_conv2d<c10::SymInt>(x, w, std::nullopt, conv.stride, conv.padding,
                                             conv.dilation, conv.groups);
    const std::vector<c10::SymInt> sizes = s.output_sizes();
    return x.new_empty_symint(c10::SymIntArrayRef(sizes));
  }
  // dL/dy from dL/dout = g: relu's step read from the result, then each window's gradient to
  // its maximum.
  Tensor conv_grad_image(const Tensor& g, const Tensor& result, const Tensor& indices,
                         const Tensor& x, const Tensor& w) const {
    return max_pool2d_backward_op().call(relu_backward_op().call(g, result), image_like_y(x, w),
                                         indices, pool.kernel_size, pool.stride, pool.padding,
                                         pool.dilation, pool.ceil_mode);
  }
  // The tangent of out from y's tangent dy: read at the maxima, then relu's step.
  Tensor out_tangent(const Tensor& dy, const Tensor& result, const Tensor& indices) const {
    return relu_backward_op().call(gather_plane(dy, indices), result);
  }
  // y's tangent (or the vector conv2d's derivative maps (dx, dw, db) to).
  Tensor y_tangent(const Tensor& x, const Tensor& dx, const Tensor& w, const Tensor& dw,
                   const Tensor& db) const {
    return bilinear_tangent(
        [&](const Tensor& a, const Tensor& b, const OptTensor& c) {
          return conv2d_with(conv, a, b, c);
        },
        x, dx, w, dw, db,
        [&](const Tensor& b, const Tensor&) { return conv_bias_like(b, image_like_y(x, w)); },
        Tensor());
  }
};

struct Conv2dReluMaxPool2dNode : PyengineNode<Conv2dReluMaxPool2dNode> {
  static constexpr const char* kName = "pyengine::conv2d_relu_max_pool2d_backward";
  ConvPoolParams params;
  bool has_bias = false;
  variable_list backward(const variable_list& grads) {  // inputs: input, weight, bias
    variable_list out(3);
    if (!grads[0].defined()) return out;
    const Mask3 mask{wants(0), wants(1), has_bias && wants(2)};
    auto [gi, gw, gb] = params.backward(grads[0], saved(2), saved(3), saved(0), saved(1), mask);
    return {gi, gw, gb};
  }
};

Tensor2 conv2d_relu_max_pool2d_autograd(const Tensor& input, const Tensor& weight,
                                        const OptTensor& bias, IntArrayRef stride,
                                        IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                                        IntArrayRef pool_kernel_size, IntArrayRef pool_stride,
                                        IntArrayRef pool_padding, IntArrayRef pool_dilation,
                                        bool pool_ceil_mode) {
  const bool grad = any_needs_grad(input, weight, bias);
  const bool fw = any_tangent(input, weight, bias);
  auto [output, indices] = below_autograd([&] {
    return conv2d_relu_max_pool2d_op().call(input, weight, bias, stride, padding, dilation,
                                            groups, pool_kernel_size, pool_stride, pool_padding,
                                            pool_dilation, pool_ceil_mode);
  });
  if (!grad && !fw) return {output, indices};
  ConvPoolParams p;
  p.set(stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding,
        pool_dilation, pool_ceil_mode);
  if (fw) {  // before the output is saved: a saved tensor keeps the tangent it has then
    const Tensor dy = p.y_tangent(primal(input), tangent(input), primal(weight), tangent(weight),
                                  tangent(bias));
    set_tangent(output, p.out_tangent(dy, primal(output), indices));
  }
  if (grad) {
    auto node = make_node<Conv2dReluMaxPool2dNode>(input, weight, bias);
    node->params = p;
    node->has_bias = bias.has_value() && bias->defined();
    node->save(input);
    node->save(weight);
    record(node, output);
    node->save(output, /*is_output=*/true);
    node->save(indices);
  }
  return {output, indices};
}

// The backward is (grad_input, grad_weight, grad_bias) = conv2d_backward(gy, x, w) with
// gy = conv_grad_image(g, result): linear in g, and of zero derivative in result (relu's step).
// So, as conv2d_backward's (Conv2dBackwardNode), with gy for grad_output:
//   d/d(grad_output) = out_tangent(conv2d(ggi, weight, ggb) + conv2d(input, ggw)),
//   d/d(input)       = conv2d_backward(gy, input, ggw).grad_input,
//   d/d(weight)      = conv2d_backward(gy, ggi, weight).grad_weight.
struct Conv2dReluMaxPool2dBackwardNode : PyengineNode<Conv2dReluMaxPool2dBackwardNode> {
  static constexpr const char* kName = "pyengine::conv2d_relu_max_pool2d_backward_backward";
  ConvPoolParams params;
  variable_list backward(const variable_list& grads) {
    // inputs: grad_output, result, input, weight
    const Tensor &ggi = grads[0], &ggw = grads[1], &ggb = grads[2];
    const Tensor g = saved(0), result = saved(1), indices = saved(2), x = saved(3), w = saved(4);
    variable_list out(4);
    if (wants(0) && (ggi.defined() || ggw.defined() || ggb.defined()))
      out[0] = params.out_tangent(params.y_tangent(x, ggi, w, ggw, ggb), result, indices);
    const bool d_input = wants(2) && ggw.defined(), d_weight = wants(3) && ggi.defined();
    if (d_input || d_weight) {
      const Tensor gy = params.conv_grad_image(g, result, indices, x, w);
      const ConvParams& c = params.conv;
      if (d_input) {
        out[2] = std::get<0>(conv2d_backward_op().call(gy, x, ggw, c.stride, c.padding,
                                                       c.dilation, c.groups,
                                                       {true, false, false}));
      }
      if (d_weight) {
        out[3] = std::get<1>(conv2d_backward_op().call(gy, ggi, w, c.stride, c.padding,
                                                       c.dilation, c.groups,
                                                       {false, true, false}));
      }
    }
    return out;
  }
};

Tensor3 conv2d_relu_max_pool2d_backward_autograd(
    const Tensor& grad_output, const Tensor& result, const Tensor& indices, const Tensor& input,
    const Tensor& weight, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, IntArrayRef pool_kernel_size, IntArrayRef pool_stride,
    IntArrayRef pool_padding, IntArrayRef pool_dilation, bool pool_ceil_mode, Mask3 output_mask) {
  auto grads = below_autograd([&] {
    return conv2d_relu_max_pool2d_backward_op().call(
        grad_output, result, indices, input, weight, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode, output_mask);
  });
  const bool grad = any_needs_grad(grad_output, result, input, weight);
  const bool fw = any_tangent(grad_output, input, weight);  // result's: zero derivative
  if (!grad && !fw) return grads;
  ConvPoolParams p;
  p.set(stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding,
        pool_dilation, pool_ceil_mode);
  if (grad) {
    auto node = make_node<Conv2dReluMaxPool2dBackwardNode>(grad_output, result, input, weight);
    node->params = p;
    node->save(grad_output);
    node->save(result);
    node->save(indices);
    node->save(input);
    node->save(weight);
    record(node, std::get<0>(grads), std::get<1>(grads), std::get<2>(grads));
  }
  if (fw) {
    const Tensor r = primal(result), x = primal(input), w = primal(weight);
    const Tensor dg = tangent(grad_output), dx = tangent(input), dw = tangent(weight);
    const Tensor gy = dx.defined() || dw.defined()
                          ? p.conv_grad_image(primal(grad_output), r, indices, x, w)
                          : Tensor();
    const Tensor dgy = dg.defined() ? p.conv_grad_image(dg, r, indices, x, w) : Tensor();
    const ConvParams& c = p.conv;
    auto bw = [&](const Tensor& g, const Tensor& a, const Tensor& b, Mask3 mask) {
      return conv2d_backward_op().call(g, a, b, c.stride, c.padding, c.dilation, c.groups, mask);
    };
    set_tangents(grads, bilinear_backward_tangent(bw, gy, dgy, x, dx, w, dw, output_mask));
  }
  return grads;
}

// ---- Linear -------------------------------------------------------------------------------

Tensor linear_with(const Tensor& x, const Tensor& w, const OptTensor& b) {
  return linear_op().call(x, w, b);
}

struct LinearNode : PyengineNode<LinearNode> {
  static constexpr const char* kName = "pyengine::linear_backward";
  bool has_bias = false;
  variable_list backward(const variable_list& grads) {  // inputs: input, weight, bias
    if (!grads[0].defined()) return variable_list(3);
    const Mask3 mask{wants(0), wants(1), has_bias && wants(2)};
    auto [gi, gw, gb] = linear_backward_op().call(grads[0], saved(0), saved(1), mask);
    return {gi, gw, gb};
  }
};

Tensor linear_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  const bool grad = any_needs_grad(input, weight, bias);
  const bool fw = any_tangent(input, weight, bias);
  Tensor result = below_autograd([&] { return linear_op().call(input, weight, bias); });
  if (grad) {
    auto node = make_node<LinearNode>(input, weight, bias);
    node->has_bias = bias.has_value() && bias->defined();
    node->save(input);
    node->save(weight);
    record(node, result);
  }
  if (fw) {
    set_tangent(result, bilinear_tangent(linear_with, primal(input), tangent(input),
                                         primal(weight), tangent(weight), tangent(bias),
                                         linear_bias_like, result));
  }
  return result;
}

// As conv2d_backward's (see Conv2dBackwardNode), with linear for conv2d.
struct LinearBackwardNode : PyengineNode<LinearBackwardNode> {
  static constexpr const char* kName = "pyengine::linear_backward_backward";
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input, weight
    const Tensor &ggi = grads[0], &ggw = grads[1], &ggb = grads[2];
    const Tensor g = saved(0), x = saved(1), w = saved(2);
    variable_list out(3);
    if (wants(0)) out[0] = bilinear_tangent(linear_with, x, ggi, w, ggw, ggb, linear_bias_like, g);
    if (wants(1) && ggw.defined())
      out[1] = std::get<0>(linear_backward_op().call(g, x, ggw, {true, false, false}));
    if (wants(2) && ggi.defined())
      out[2] = std::get<1>(linear_backward_op().call(g, ggi, w, {false, true, false}));
    return out;
  }
};

Tensor3 linear_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                 const Tensor& weight, Mask3 output_mask) {
  auto result = below_autograd(
      [&] { return linear_backward_op().call(grad_output, input, weight, output_mask); });
  if (any_needs_grad(grad_output, input, weight)) {
    auto node = make_node<LinearBackwardNode>(grad_output, input, weight);
    node->save(grad_output);
    node->save(input);
    node->save(weight);
    record(node, std::get<0>(result), std::get<1>(result), std::get<2>(result));
  }
  if (any_tangent(grad_output, input, weight)) {
    auto bw = [](const Tensor& g, const Tensor& x, const Tensor& w, Mask3 mask) {
      return linear_backward_op().call(g, x, w, mask);
    };
    set_tangents(result, bilinear_backward_tangent(bw, primal(grad_output), tangent(grad_output),
                                                   primal(input), tangent(input), primal(weight),
                                                   tangent(weight), output_mask));
  }
  return result;
}

// ---- Activations --------------------------------------------------------------------------

// relu, sigmoid and tanh: elementwise, differentiated from their result. Their backward op
// g -> g * f'(y) is also their tangent map, and its own derivative with respect to g is itself;
// `d_result(g, y, ggi)` is its derivative with respect to y (zero for relu: undefined).
#define PE_RESULT_ACTIVATION(name, d_result)                                                 \
  struct name##_node : PyengineNode<name##_node> {                                          \
    static constexpr const char* kName = "pyengine::" #name "_backward";                    \
    variable_list backward(const variable_list& grads) { /* inputs: input */                \
      if (!grads[0].defined()) return variable_list(1);                                     \
      return {name##_backward_op().call(grads[0], saved(0))};                               \
    }                                                                                       \
  };                                                                                        \
  Tensor name##_autograd(const Tensor& input) {                                             \
    const bool grad = any_needs_grad(input);                                                \
    Tensor result = below_autograd([&] { return name##_op().call(input); });                \
    /* the tangent first: saving the result keeps the tangent it has then */               \
    const Tensor dx = tangent(input);                                                       \
    if (dx.defined()) set_tangent(result, name##_backward_op().call(dx, result));           \
    if (grad) {                                                                             \
      auto node = make_node<name##_node>(input);                                            \
      record(node, result);                                                                 \
      node->save(result, /*is_output=*/true);                                               \
    }                                                                                       \
    return result;                                                                          \
  }                                                                                         \
  struct name##_backward_node : PyengineNode<name##_backward_node> {                        \
    static constexpr const char* kName = "pyengine::" #name "_backward_backward";           \
    variable_list backward(const variable_list& grads) { /* inputs: grad_output, result */  \
      variable_list out(2);                                                                 \
      const Tensor& ggi = grads[0];                                                         \
      if (!ggi.defined()) return out;                                                       \
      const Tensor y = saved(1);                                                            \
      if (wants(0)) out[0] = name##_backward_op().call(ggi, y);                             \
      if (wants(1)) out[1] = d_result(saved(0), y, ggi);                                    \
      return out;                                                                           \
    }                                                                                       \
  };                                                                                        \
  Tensor name##_backward_autograd(const Tensor& grad_output, const Tensor& result) {        \
    Tensor grad_input =                                                                     \
        below_autograd([&] { return name##_backward_op().call(grad_output, result); });     \
    if (any_needs_grad(grad_output, result)) {                                              \
      auto node = make_node<name##_backward_node>(grad_output, result);                     \
      node->save(grad_output);                                                              \
      node->save(result);                                                                   \
      record(node, grad_input);                                                             \
    }                                                                                       \
    if (any_tangent(grad_output, result)) {                                                 \
      /* elementwise, so d_result is also the tangent map in y */                           \
      const Tensor y = primal(result), dg = tangent(grad_output), dy = tangent(result);     \
      Tensor t = dg.defined() ? name##_backward_op().call(dg, y) : Tensor();                \
      if (dy.defined()) t = add_maybe(t, d_result(primal(grad_output), y, dy));             \
      set_tangent(grad_input, t);                                                           \
    }                                                                                       \
    return grad_input;                                                                      \
  }

// d/dy of g * f'(y): relu's f' is a step (zero derivative), sigmoid's y(1 - y), tanh's 1 - y^2.
Tensor relu_d_result(const Tensor&, const Tensor&, const Tensor&) { return Tensor(); }
Tensor sigmoid_d_result(const Tensor& g, const Tensor& y, const Tensor& ggi) {
  return ggi * g * (1 - 2 * y);
}
Tensor tanh_d_result(const Tensor& g, const Tensor& y, const Tensor& ggi) {
  return -2 * ggi * g * y;
}

PE_RESULT_ACTIVATION(relu, relu_d_result)
PE_RESULT_ACTIVATION(sigmoid, sigmoid_d_result)
PE_RESULT_ACTIVATION(tanh, tanh_d_result)
#undef PE_RESULT_ACTIVATION

struct LeakyReluNode : PyengineNode<LeakyReluNode> {
  static constexpr const char* kName = "pyengine::leaky_relu_backward";
  double negative_slope = 0;
  variable_list backward(const variable_list& grads) {  // inputs: input
    if (!grads[0].defined()) return variable_list(1);
    return {leaky_relu_backward_op().call(grads[0], saved(0), negative_slope)};
  }
};

Tensor leaky_relu_autograd(const Tensor& input, double negative_slope) {
  const bool grad = any_needs_grad(input);
  Tensor result = below_autograd([&] { return leaky_relu_op().call(input, negative_slope); });
  if (grad) {
    auto node = make_node<LeakyReluNode>(input);
    node->negative_slope = negative_slope;
    node->save(input);
    record(node, result);
  }
  const Tensor dx = tangent(input);
  if (dx.defined())
    set_tangent(result, leaky_relu_backward_op().call(dx, primal(input), negative_slope));
  return result;
}

// g * slope(x): linear in g (itself its derivative), a step in x (zero derivative).
struct LeakyReluBackwardNode : PyengineNode<LeakyReluBackwardNode> {
  static constexpr const char* kName = "pyengine::leaky_relu_backward_backward";
  double negative_slope = 0;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input
    variable_list out(2);
    if (grads[0].defined() && wants(0))
      out[0] = leaky_relu_backward_op().call(grads[0], saved(0), negative_slope);
    return out;
  }
};

Tensor leaky_relu_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                    double negative_slope) {
  Tensor grad_input = below_autograd(
      [&] { return leaky_relu_backward_op().call(grad_output, input, negative_slope); });
  if (any_needs_grad(grad_output, input)) {
    auto node = make_node<LeakyReluBackwardNode>(grad_output, input);
    node->negative_slope = negative_slope;
    node->save(input);
    record(node, grad_input);
  }
  const Tensor dg = tangent(grad_output);
  if (dg.defined())
    set_tangent(grad_input, leaky_relu_backward_op().call(dg, primal(input), negative_slope));
  return grad_input;
}

// softmax and log_softmax: both differentiate from their result y along `dim`.
//   softmax:     grad_input = y * (g - sum(g * y)); J is symmetric, so the backward op is also
//                the tangent map and its own derivative with respect to g.
//   log_softmax: grad_input = g - exp(y) * sum(g) (J^T); the tangent is dx - sum(exp(y) * dx).
Tensor sum_dim(const Tensor& t, int64_t dim) { return t.sum({dim}, /*keepdim=*/true); }

Tensor softmax_tangent(const Tensor& dx, const Tensor& y, int64_t dim) {
  return softmax_backward_op().call(dx, y, dim);
}
Tensor log_softmax_tangent(const Tensor& dx, const Tensor& y, int64_t dim) {
  return dx - sum_dim(y.exp() * dx, dim);
}
// Derivatives of the backward op: with respect to g (the double backward's grad_output) and y.
Tensor softmax_bb_grad(const Tensor& ggi, const Tensor& y, int64_t dim) {
  return softmax_backward_op().call(ggi, y, dim);
}
Tensor softmax_bb_result(const Tensor& g, const Tensor& y, const Tensor& ggi, int64_t dim) {
  return ggi * (g - sum_dim(g * y, dim)) - g * sum_dim(ggi * y, dim);
}
Tensor log_softmax_bb_grad(const Tensor& ggi, const Tensor& y, int64_t dim) {
  return ggi - sum_dim(ggi * y.exp(), dim);
}
Tensor log_softmax_bb_result(const Tensor& g, const Tensor& y, const Tensor& ggi, int64_t dim) {
  return -ggi * y.exp() * sum_dim(g, dim);
}
// Tangents of the backward op along dy (along dg it is the backward op itself: linear in g).
Tensor softmax_jvp_result(const Tensor& g, const Tensor& y, const Tensor& dy, int64_t dim) {
  return dy * (g - sum_dim(g * y, dim)) - y * sum_dim(g * dy, dim);
}
Tensor log_softmax_jvp_result(const Tensor& g, const Tensor& y, const Tensor& dy, int64_t dim) {
  return log_softmax_bb_result(g, y, dy, dim);  // elementwise in dy, like its transpose
}

#define PE_SOFTMAX_LIKE(name)                                                                \
  struct name##_node : PyengineNode<name##_node> {                                          \
    static constexpr const char* kName = "pyengine::" #name "_backward";                    \
    int64_t dim = 0;                                                                        \
    variable_list backward(const variable_list& grads) { /* inputs: input */                \
      if (!grads[0].defined()) return variable_list(1);                                     \
      return {name##_backward_op().call(grads[0], saved(0), dim)};                          \
    }                                                                                       \
  };                                                                                        \
  Tensor name##_autograd(const Tensor& input, int64_t dim) {                                \
    const bool grad = any_needs_grad(input);                                                \
    Tensor result = below_autograd([&] { return name##_op().call(input, dim); });           \
    /* the tangent first: saving the result keeps the tangent it has then */               \
    const Tensor dx = tangent(input);                                                       \
    if (dx.defined()) set_tangent(result, name##_tangent(dx, result, dim));                 \
    if (grad) {                                                                             \
      auto node = make_node<name##_node>(input);                                            \
      node->dim = dim;                                                                      \
      record(node, result);                                                                 \
      node->save(result, /*is_output=*/true);                                               \
    }                                                                                       \
    return result;                                                                          \
  }                                                                                         \
  struct name##_backward_node : PyengineNode<name##_backward_node> {                        \
    static constexpr const char* kName = "pyengine::" #name "_backward_backward";           \
    int64_t dim = 0;                                                                        \
    variable_list backward(const variable_list& grads) { /* inputs: grad_output, result */  \
      variable_list out(2);                                                                 \
      const Tensor& ggi = grads[0];                                                         \
      if (!ggi.defined()) return out;                                                       \
      const Tensor y = saved(1);                                                            \
      if (wants(0)) out[0] = name##_bb_grad(ggi, y, dim);                                   \
      if (wants(1)) out[1] = name##_bb_result(saved(0), y, ggi, dim);                       \
      return out;                                                                           \
    }                                                                                       \
  };                                                                                        \
  Tensor name##_backward_autograd(const Tensor& grad_output, const Tensor& result,          \
                                  int64_t dim) {                                            \
    Tensor grad_input =                                                                     \
        below_autograd([&] { return name##_backward_op().call(grad_output, result, dim); }); \
    if (any_needs_grad(grad_output, result)) {                                              \
      auto node = make_node<name##_backward_node>(grad_output, result);                     \
      node->dim = dim;                                                                      \
      node->save(grad_output);                                                              \
      node->save(result);                                                                   \
      record(node, grad_input);                                                             \
    }                                                                                       \
    if (any_tangent(grad_output, result)) {                                                 \
      const Tensor y = primal(result), dg = tangent(grad_output), dy = tangent(result);     \
      Tensor t = dg.defined() ? name##_backward_op().call(dg, y, dim) : Tensor();           \
      if (dy.defined()) t = add_maybe(t, name##_jvp_result(primal(grad_output), y, dy, dim)); \
      set_tangent(grad_input, t);                                                           \
    }                                                                                       \
    return grad_input;                                                                      \
  }

PE_SOFTMAX_LIKE(softmax)
PE_SOFTMAX_LIKE(log_softmax)
#undef PE_SOFTMAX_LIKE

// ---- Losses -------------------------------------------------------------------------------
//
// Each loss backward op is linear in grad_output: grad_x = g * D_x(input, target, ...) with g
// broadcast for a reduced loss. So d/dg of <v, grad_x> is v * D_x summed like the loss, D_x
// itself being the backward op run with g = 1 (`unit_grad`); and the tangent of the loss along
// (dx, dt) is D_x dx + D_t dt summed like the loss.

// A grad_output of ones for a loss shaped like `loss`.
Tensor unit_grad(const Tensor& loss) { return at::ones_like(loss); }

// <v, bw(g)> differentiated in g, for a pointwise loss's backward op bw (linear in g): bw(v)
// itself for 'none' (g and v elementwise), the sum of bw(1) * v for a reduced loss (g a scalar).
template <typename Bw>
Tensor grad_output_term(Bw&& bw, const Tensor& g, const Tensor& v, int64_t reduction) {
  return reduction == 0 ? bw(v) : (bw(unit_grad(g)) * v).sum();
}

// The tangent of a pointwise loss along (dx, dt), bw_x / bw_t its backward ops in x / t.
template <typename BwX, typename BwT>
Tensor pointwise_loss_tangent(const Tensor& loss, int64_t reduction, BwX&& bw_x,
                              const Tensor& dx, BwT&& bw_t, const Tensor& dt) {
  Tensor out;
  if (dx.defined()) out = grad_output_term(bw_x, loss, dx, reduction);
  if (dt.defined()) out = add_maybe(out, grad_output_term(bw_t, loss, dt, reduction));
  return out;
}

// mse_loss and binary_cross_entropy (input, target, weight, reduction): differentiable in input
// and target, each through a backward op of its own. `Loss` names the ops: kName, forward,
// grad_input, grad_target (all with the forward op's arguments, grad_output first for the two).
template <typename Loss>
struct PointwiseLossNode : PyengineNode<PointwiseLossNode<Loss>> {
  static constexpr const char* kName = Loss::kName;
  int64_t reduction = 1;
  variable_list backward(const variable_list& grads) {  // inputs: input, target
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const Tensor x = this->saved(0), t = this->saved(1);
    const OptTensor w = this->saved_opt(2);
    if (this->wants(0)) out[0] = Loss::grad_input(grads[0], x, t, w, reduction);
    if (this->wants(1)) out[1] = Loss::grad_target(grads[0], x, t, w, reduction);
    return out;
  }
};

template <typename Loss>
Tensor pointwise_loss_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight,
                               int64_t reduction) {
  refuse_grad(weight, Loss::kOp, "weight");
  const bool grad = any_needs_grad(input, target);
  Tensor loss = below_autograd([&] { return Loss::forward(input, target, weight, reduction); });
  if (grad) {
    auto node = make_node<PointwiseLossNode<Loss>>(input, target);
    node->reduction = reduction;
    node->save(input);
    node->save(target);
    node->save(weight);
    record(node, loss);
  }
  if (any_tangent(input, target)) {
    const Tensor x = primal(input), t = primal(target);
    auto bw_x = [&](const Tensor& g) { return Loss::grad_input(g, x, t, weight, reduction); };
    auto bw_t = [&](const Tensor& g) { return Loss::grad_target(g, x, t, weight, reduction); };
    set_tangent(loss, pointwise_loss_tangent(loss, reduction, bw_x, tangent(input), bw_t,
                                             tangent(target)));
  }
  return loss;
}

// mse_loss: D_x = 2 w (x - t) / denominator = -D_t; d/dx of g D_x is 2 w g / denominator.
struct MseLoss {
  static constexpr const char* kName = "pyengine::mse_loss_backward";
  static constexpr const char* kOp = "mse_loss";
  static Tensor forward(const Tensor& x, const Tensor& t, const OptTensor& w, int64_t r) {
    return mse_loss_op().call(x, t, w, r);
  }
  static Tensor grad_input(const Tensor& g, const Tensor& x, const Tensor& t, const OptTensor& w,
                           int64_t r) {
    return mse_loss_backward_op().call(g, x, t, w, r);
  }
  // (x - t)^2 is symmetric in x and t: d/dt is the same op with the two swapped.
  static Tensor grad_target(const Tensor& g, const Tensor& x, const Tensor& t,
                            const OptTensor& w, int64_t r) {
    return mse_loss_backward_op().call(g, t, x, w, r);
  }
};

Tensor mse_loss_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight,
                         int64_t reduction) {
  return pointwise_loss_autograd<MseLoss>(input, target, weight, reduction);
}

// The slope of mse_loss_backward's output in x (and, negated, in t): 2 w / denominator, as the
// backward op computes it for g = 1 and x - t = 1.
Tensor mse_slope(const Tensor& x, const OptTensor& w, int64_t reduction) {
  Tensor ones = at::ones_like(x);
  Tensor zeros = at::zeros_like(x);
  Tensor g = reduction == 0 ? ones : at::ones({}, x.options());
  return mse_loss_backward_op().call(g, ones, zeros, w, reduction);
}

// d/dx of <v, mse_loss_backward(g, x, t)>, elementwise, so also its tangent along dx = v
// (and, negated, the same for t).
Tensor mse_input_term(const Tensor& g, const Tensor& x, const OptTensor& w, int64_t reduction,
                      const Tensor& v) {
  return v * g * mse_slope(x, w, reduction);
}

struct MseLossBackwardNode : PyengineNode<MseLossBackwardNode> {
  static constexpr const char* kName = "pyengine::mse_loss_backward_backward";
  int64_t reduction = 1;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input, target
    variable_list out(3);
    const Tensor& ggi = grads[0];
    if (!ggi.defined()) return out;
    const Tensor g = saved(0), x = saved(1), t = saved(2);
    const OptTensor w = saved_opt(3);
    auto bw = [&](const Tensor& v) { return mse_loss_backward_op().call(v, x, t, w, reduction); };
    if (wants(0)) out[0] = grad_output_term(bw, g, ggi, reduction);
    if (wants(1) || wants(2)) {
      Tensor d_x = mse_input_term(g, x, w, reduction, ggi);
      if (wants(1)) out[1] = d_x;
      if (wants(2)) out[2] = -d_x;
    }
    return out;
  }
};

Tensor mse_loss_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                  const Tensor& target, const OptTensor& weight,
                                  int64_t reduction) {
  refuse_grad(weight, "mse_loss_backward", "weight");
  Tensor grad_input = below_autograd([&] {
    return mse_loss_backward_op().call(grad_output, input, target, weight, reduction);
  });
  if (any_needs_grad(grad_output, input, target)) {
    auto node = make_node<MseLossBackwardNode>(grad_output, input, target);
    node->reduction = reduction;
    node->save(grad_output);
    node->save(input);
    node->save(target);
    node->save(weight);
    record(node, grad_input);
  }
  if (any_tangent(grad_output, input, target)) {
    const Tensor g = primal(grad_output), x = primal(input), t = primal(target);
    const Tensor dg = tangent(grad_output), dx = tangent(input), dt = tangent(target);
    Tensor out = dg.defined() ? mse_loss_backward_op().call(dg, x, t, weight, reduction) : Tensor();
    const Tensor direction = add_maybe(dx, dt.defined() ? -dt : Tensor());
    if (direction.defined()) out = add_maybe(out, mse_input_term(g, x, weight, reduction, direction));
    set_tangent(grad_input, out);
  }
  return grad_input;
}

// binary_cross_entropy: D_x = w (x - t) / clamp_min(x (1 - x), eps) / denominator (eps = 1e-12 as
// in the kernels, csrc/common/elementwise.h bce_grad), D_t = w (log(1 - x) - log(x)) /
// denominator (binary_cross_entropy_target_backward).
struct BinaryCrossEntropy {
  static constexpr const char* kName = "pyengine::binary_cross_entropy_backward";
  static constexpr const char* kOp = "binary_cross_entropy";
  static Tensor forward(const Tensor& x, const Tensor& t, const OptTensor& w, int64_t r) {
    return binary_cross_entropy_op().call(x, t, w, r);
  }
  static Tensor grad_input(const Tensor& g, const Tensor& x, const Tensor& t, const OptTensor& w,
                           int64_t r) {
    return binary_cross_entropy_backward_op().call(g, x, t, w, r);
  }
  static Tensor grad_target(const Tensor& g, const Tensor& x, const Tensor& t,
                            const OptTensor& w, int64_t r) {
    return binary_cross_entropy_target_backward_op().call(g, x, t, w, r);
  }
};

Tensor binary_cross_entropy_autograd(const Tensor& input, const Tensor& target,
                                     const OptTensor& weight, int64_t reduction) {
  return pointwise_loss_autograd<BinaryCrossEntropy>(input, target, weight, reduction);
}

// w / denominator of binary_cross_entropy_backward: the op itself at g = 1, x = 1/2, t = 1/4,
// where (x - t) / (x (1 - x)) is exactly 1.
Tensor bce_scale(const Tensor& x, const OptTensor& w, int64_t reduction) {
  const Tensor g = reduction == 0 ? at::ones_like(x) : at::ones({}, x.options());
  return binary_cross_entropy_backward_op().call(g, at::full_like(x, 0.5), at::full_like(x, 0.25),
                                                 w, reduction);
}

// The derivatives of <v, g D_x> and <v, g D_t> in x and t, v * g * d(D)/d(x or t). All are
// elementwise, so each is also the tangent along its variable = v. The clamp's flat side has no
// slope.
Tensor bce_denominator(const Tensor& x) { return (x * (1 - x)).clamp_min(1e-12); }
Tensor bce_input_term(const Tensor& g, const Tensor& x, const Tensor& t, const OptTensor& w,
                      int64_t reduction, const Tensor& v) {  // d(D_x)/dx
  const Tensor product = x * (1 - x);
  const Tensor denom = bce_denominator(x);
  const Tensor slope =
      (1 - at::where(product.ge(1e-12), (x - t) * (1 - 2 * x) / denom, at::zeros_like(x))) /
      denom;
  return v * g * bce_scale(x, w, reduction) * slope;
}
Tensor bce_target_term(const Tensor& g, const Tensor& x, const OptTensor& w, int64_t reduction,
                       const Tensor& v) {  // d(D_x)/dt
  return -v * g * bce_scale(x, w, reduction) / bce_denominator(x);
}
Tensor bce_target_input_term(const Tensor& g, const Tensor& x, const OptTensor& w,
                             int64_t reduction, const Tensor& v) {  // d(D_t)/dx, unclamped
  return -v * g * bce_scale(x, w, reduction) / (x * (1 - x));
}

struct BinaryCrossEntropyBackwardNode : PyengineNode<BinaryCrossEntropyBackwardNode> {
  static constexpr const char* kName = "pyengine::binary_cross_entropy_backward_backward";
  int64_t reduction = 1;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input, target
    variable_list out(3);
    const Tensor& ggi = grads[0];
    if (!ggi.defined()) return out;
    const Tensor g = saved(0), x = saved(1), t = saved(2);
    const OptTensor w = saved_opt(3);
    auto bw = [&](const Tensor& v) {
      return binary_cross_entropy_backward_op().call(v, x, t, w, reduction);
    };
    if (wants(0)) out[0] = grad_output_term(bw, g, ggi, reduction);
    if (wants(1)) out[1] = bce_input_term(g, x, t, w, reduction, ggi);
    if (wants(2)) out[2] = bce_target_term(g, x, w, reduction, ggi);
    return out;
  }
};

Tensor binary_cross_entropy_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                              const Tensor& target, const OptTensor& weight,
                                              int64_t reduction) {
  refuse_grad(weight, "binary_cross_entropy_backward", "weight");
  Tensor grad_input = below_autograd([&] {
    return binary_cross_entropy_backward_op().call(grad_output, input, target, weight,
                                                   reduction);
  });
  if (any_needs_grad(grad_output, input, target)) {
    auto node = make_node<BinaryCrossEntropyBackwardNode>(grad_output, input, target);
    node->reduction = reduction;
    node->save(grad_output);
    node->save(input);
    node->save(target);
    node->save(weight);
    record(node, grad_input);
  }
  if (any_tangent(grad_output, input, target)) {
    const Tensor g = primal(grad_output), x = primal(input), t = primal(target);
    const Tensor dg = tangent(grad_output), dx = tangent(input), dt = tangent(target);
    Tensor out = dg.defined()
                     ? binary_cross_entropy_backward_op().call(dg, x, t, weight, reduction)
                     : Tensor();
    if (dx.defined()) out = add_maybe(out, bce_input_term(g, x, t, weight, reduction, dx));
    if (dt.defined()) out = add_maybe(out, bce_target_term(g, x, weight, reduction, dt));
    set_tangent(grad_input, out);
  }
  return grad_input;
}

// D_t = w (log(1 - x) - log(x)) / denominator: linear in g, its slope in x is
// -w / (x (1 - x)) / denominator, and it does not depend on t.
struct BinaryCrossEntropyTargetBackwardNode
    : PyengineNode<BinaryCrossEntropyTargetBackwardNode> {
  static constexpr const char* kName = "pyengine::binary_cross_entropy_target_backward_backward";
  int64_t reduction = 1;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input
    variable_list out(2);
    const Tensor& ggt = grads[0];
    if (!ggt.defined()) return out;
    const Tensor g = saved(0), x = saved(1), t = saved(2);
    const OptTensor w = saved_opt(3);
    auto bw = [&](const Tensor& v) {
      return binary_cross_entropy_target_backward_op().call(v, x, t, w, reduction);
    };
    if (wants(0)) out[0] = grad_output_term(bw, g, ggt, reduction);
    if (wants(1)) out[1] = bce_target_input_term(g, x, w, reduction, ggt);
    return out;
  }
};

Tensor binary_cross_entropy_target_backward_autograd(const Tensor& grad_output,
                                                     const Tensor& input, const Tensor& target,
                                                     const OptTensor& weight,
                                                     int64_t reduction) {
  refuse_grad(weight, "binary_cross_entropy_target_backward", "weight");
  Tensor grad_target = below_autograd([&] {
    return binary_cross_entropy_target_backward_op().call(grad_output, input, target, weight,
                                                          reduction);
  });
  if (any_needs_grad(grad_output, input)) {
    auto node = make_node<BinaryCrossEntropyTargetBackwardNode>(grad_output, input);
    node->reduction = reduction;
    node->save(grad_output);
    node->save(input);
    node->save(target);
    node->save(weight);
    record(node, grad_target);
  }
  if (any_tangent(grad_output, input)) {
    const Tensor g = primal(grad_output), x = primal(input);
    const Tensor dg = tangent(grad_output), dx = tangent(input);
    Tensor out = dg.defined() ? binary_cross_entropy_target_backward_op().call(
                                    dg, x, target, weight, reduction)
                              : Tensor();
    if (dx.defined()) out = add_maybe(out, bce_target_input_term(g, x, weight, reduction, dx));
    set_tangent(grad_target, out);
  }
  return grad_target;
}

// cross_entropy: loss_row = -sum_c a_c log softmax(x)_c, so grad_input = g (A p - a) with
// p = softmax(x) and A = sum_c a_c per row (ce_row_mass). With q the smoothed target (a class
// index's one-hot, or the given probabilities) times (1 - eps), plus eps / C:
//   class indices:       a = w q for rows not ignored, 'mean' dividing by sum(w[t]) over them;
//   class probabilities: a = w q, 'mean' dividing by the number of rows.
// A row is one (n, d1, ...) of input (N, C, d1, ...), whose classes lie along dim 1 (ce_class_dim);
// per-row tensors have the 'none' loss's shape (N, d1, ...).
struct CrossEntropyArgs {
  int64_t reduction = 1, ignore_index = -100;
  double label_smoothing = 0;
};

// The class dim: 1 for batched input, 0 for (C).
int64_t ce_class_dim(const Tensor& x) { return x.dim() >= 2 ? 1 : 0; }

// The rows' count (N * d1 * ...; 1 unbatched): 'mean' divides probabilities' losses by it.
double ce_rows(const Tensor& x) {
  double rows = 1;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != ce_class_dim(x)) rows *= static_cast<double>(x.size(d));
  return rows;
}

// A per-class vector (C) shaped to broadcast along x's class dim: (C, 1, ...) for spatial input.
Tensor ce_along_classes(const Tensor& v, const Tensor& x) {
  if (x.dim() <= 2) return v;
  std::vector<int64_t> shape(static_cast<size_t>(x.dim() - 1), 1);
  shape[0] = v.size(0);
  return v.view(shape);
}

// A per-row tensor (the 'none' loss's shape, or 0-d) as a factor of each row's classes.
Tensor ce_per_class(const Tensor& per_row, const Tensor& x) {
  return per_row.dim() == 0 || x.dim() < 2 ? per_row : per_row.unsqueeze(1);
}

Tensor ce_row_mass(const Tensor& x, const Tensor& t, const OptTensor& w,
                   const CrossEntropyArgs& a) {
  const bool unbatched = x.dim() == 1;
  const int64_t classes = x.size(ce_class_dim(x));
  const double eps = a.label_smoothing;
  if (t.is_floating_point()) {  // probabilities: A = sum_c w_c q_c (/ rows for 'mean')
    const Tensor q = t * (1 - eps) + eps / classes;
    Tensor mass = (w.has_value() ? q * ce_along_classes(*w, x) : q).sum(ce_class_dim(x));
    return a.reduction == 1 && !unbatched ? mass / ce_rows(x) : mass;
  }
  const Tensor rows_t = unbatched ? t.reshape({1}) : t;
  const Tensor ignored = rows_t.eq(a.ignore_index);
  const Tensor safe_t = rows_t.masked_fill(ignored, 0);
  const Tensor w_t = (w.has_value() ? w->index_select(0, safe_t.reshape({-1})).view(safe_t.sizes())
                                    : at::ones(rows_t.sizes(), x.options()))
                         .masked_fill(ignored, 0);
  const Tensor w_sum = w.has_value() ? w->sum() : at::full({}, double(classes), x.options());
  Tensor mass = w_t * (1 - eps) + w_sum * (eps / classes);
  if (a.reduction == 1) mass = mass / w_t.sum();
  // An ignored row has no gradient, even when every row is (a 'mean' over nothing, 0 / 0).
  mass = mass.masked_fill(ignored, 0);
  return unbatched ? mass.reshape({}) : mass;
}

// d loss / d target for probabilities: -g w log softmax(x) (1 - eps) (/ rows for 'mean').
Tensor cross_entropy_target_grad(const Tensor& grad_output, const Tensor& input,
                                 const OptTensor& weight, const CrossEntropyArgs& a) {
  const bool batched = input.dim() >= 2;
  Tensor g = a.reduction == 0 ? ce_per_class(grad_output, input) : grad_output;
  if (a.reduction == 1 && batched) g = g / ce_rows(input);
  Tensor scale = -g * (1 - a.label_smoothing);
  if (weight.has_value()) scale = scale * ce_along_classes(*weight, input);
  return scale * log_softmax_op().call(input, ce_class_dim(input));
}

// Per-row (for 'none') or total sum of `t` (input's shape) over the class dim.
Tensor ce_reduce(const Tensor& t, const CrossEntropyArgs& a) {
  return a.reduction == 0 ? t.sum(ce_class_dim(t)) : t.sum();
}

// grad_input with g = 1 (per row for 'none'): A p - a, the loss's slope in x.
Tensor ce_slope(const Tensor& loss_like, const Tensor& x, const Tensor& t, const OptTensor& w,
                const CrossEntropyArgs& a) {
  return cross_entropy_backward_op().call(unit_grad(loss_like), x, t, w, a.reduction,
                                          a.ignore_index, a.label_smoothing, std::nullopt);
}

// d/dx of <v, cross_entropy_backward(g, x, ...)>: g A softmax_backward(v, p) per row; softmax's
// Jacobian is symmetric, so this is also the tangent along dx = v.
Tensor ce_input_term(const Tensor& g, const Tensor& x, const Tensor& t, const OptTensor& w,
                     const CrossEntropyArgs& args, const Tensor& v) {
  const int64_t dim = ce_class_dim(x);
  const Tensor p = softmax_op().call(x, dim);
  const Tensor row_scale = ce_per_class(g * ce_row_mass(x, t, w, args), x);
  return row_scale * softmax_backward_op().call(v, p, dim);
}

// For probability targets, grad_input = g (A p - a) is linear in t through a = w (1 - eps) t / M
// (M: the rows for 'mean', else 1): d/dt of <v, grad_input> is g (1 - eps) / M w (sum(v p) - v),
// and its tangent along dt is g (sum(da) p - da), da = w (1 - eps) dt / M.
Tensor ce_target_weights(const Tensor& x, const OptTensor& w, const CrossEntropyArgs& a) {
  const double rows = a.reduction == 1 && x.dim() >= 2 ? ce_rows(x) : 1.0;
  const Tensor scale = at::full({}, (1 - a.label_smoothing) / rows, x.options());
  return w.has_value() ? scale * ce_along_classes(*w, x) : scale;
}
Tensor ce_target_vjp(const Tensor& g, const Tensor& x, const OptTensor& w,
                     const CrossEntropyArgs& a, const Tensor& v) {
  const int64_t dim = ce_class_dim(x);
  const Tensor p = softmax_op().call(x, dim);
  const Tensor factor = a.reduction == 0 ? ce_per_class(g, x) : g;
  return factor * ce_target_weights(x, w, a) * ((v * p).sum(dim, true) - v);
}
Tensor ce_target_jvp(const Tensor& g, const Tensor& x, const OptTensor& w,
                     const CrossEntropyArgs& a, const Tensor& dt) {
  const int64_t dim = ce_class_dim(x);
  const Tensor p = softmax_op().call(x, dim);
  const Tensor da = ce_target_weights(x, w, a) * dt;
  const Tensor factor = a.reduction == 0 ? ce_per_class(g, x) : g;
  return factor * (da.sum(dim, true) * p - da);
}

// The log-sum-exps (saved 4th, where the forward computed them) go to the backward op, which
// then skips its own max and sum passes.
struct CrossEntropyNode : PyengineNode<CrossEntropyNode> {
  static constexpr const char* kName = "pyengine::cross_entropy_backward";
  CrossEntropyArgs args;
  variable_list backward(const variable_list& grads) {  // inputs: input, target
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const Tensor x = saved(0), t = saved(1);
    const OptTensor w = saved_opt(2), lse = saved_opt(3);
    if (wants(0)) {
      out[0] = cross_entropy_backward_op().call(grads[0], x, t, w, args.reduction,
                                                args.ignore_index, args.label_smoothing, lse);
    }
    // Only a target of class probabilities (floating) can need a gradient.
    if (wants(1)) out[1] = cross_entropy_target_grad(grads[0], x, w, args);
    return out;
  }
};

// The loss's tangent (both cross_entropy ops').
void set_cross_entropy_tangent(const Tensor& loss, const Tensor& input, const Tensor& target,
                               const OptTensor& weight, const CrossEntropyArgs& args) {
  const Tensor x = primal(input), t = primal(target);
  const Tensor dx = tangent(input), dt = tangent(target);
  Tensor out;
  if (dx.defined()) out = ce_reduce(ce_slope(loss, x, t, weight, args) * dx, args);
  if (dt.defined()) {
    out = add_maybe(out, ce_reduce(cross_entropy_target_grad(unit_grad(loss), x, weight,
                                                             args) * dt, args));
  }
  set_tangent(loss, out);
}

// Where the backward kernel reads the forward's log-sum-exps (csrc/ops.cpp): the CPU's, for
// float32 and float64 logits.
bool backward_reads_log_sum_exp(const Tensor& input) {
  return input.is_cpu() &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

// Both cross_entropy ops: the loss differentiable, the log-sum-exps not (a saved statistic, as
// torch's flash attention's logsumexp output; their gradient flows through input in the
// backward op). When an input needs a gradient and the backward reads them, cross_entropy runs
// the op with them and saves them for its backward.
Tensor2 record_cross_entropy(const Tensor& input, const Tensor& target, const OptTensor& weight,
                             int64_t reduction, int64_t ignore_index, double label_smoothing,
                             bool with_lse, const char* op) {
  refuse_grad(weight, op, "weight");
  const CrossEntropyArgs args{reduction, ignore_index, label_smoothing};
  const bool grad = any_needs_grad(input, target);
  Tensor loss, lse;
  below_autograd([&] {
    if ((grad && backward_reads_log_sum_exp(input)) || with_lse) {
      std::tie(loss, lse) = cross_entropy_with_log_sum_exp_op().call(
          input, target, weight, reduction, ignore_index, label_smoothing);
    } else {
      loss = cross_entropy_op().call(input, target, weight, reduction, ignore_index,
                                     label_smoothing);
    }
  });
  if (grad) {
    auto node = make_node<CrossEntropyNode>(input, target);
    node->args = args;
    node->save(input);
    node->save(target);
    node->save(weight);
    node->save(lse);
    record(node, loss);
  }
  if (any_tangent(input, target)) set_cross_entropy_tangent(loss, input, target, weight, args);
  return {loss, lse};
}

Tensor cross_entropy_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight,
                              int64_t reduction, int64_t ignore_index, double label_smoothing) {
  return std::get<0>(record_cross_entropy(input, target, weight, reduction, ignore_index,
                                          label_smoothing, false, "cross_entropy"));
}

Tensor2 cross_entropy_with_log_sum_exp_autograd(const Tensor& input, const Tensor& target,
                                                const OptTensor& weight, int64_t reduction,
                                                int64_t ignore_index, double label_smoothing) {
  return record_cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing,
                              true, "cross_entropy_with_log_sum_exp");
}

// d/dg: the slope summed against ggi like the loss; d/dx: ce_input_term; d/dt (probabilities):
// ce_target_vjp.
struct CrossEntropyBackwardNode : PyengineNode<CrossEntropyBackwardNode> {
  static constexpr const char* kName = "pyengine::cross_entropy_backward_backward";
  CrossEntropyArgs args;
  variable_list backward(const variable_list& grads) {  // inputs: grad_output, input, target
    variable_list out(3);
    const Tensor& ggi = grads[0];
    if (!ggi.defined()) return out;
    const Tensor g = saved(0), x = saved(1), t = saved(2);
    const OptTensor w = saved_opt(3);
    if (wants(0)) out[0] = ce_reduce(ce_slope(g, x, t, w, args) * ggi, args);
    if (wants(1)) out[1] = ce_input_term(g, x, t, w, args, ggi);
    if (wants(2)) out[2] = ce_target_vjp(g, x, w, args, ggi);
    return out;
  }
};

// log_sum_exp is a cache of a function of input, not an input of its own: the derivatives below
// are the total ones through input, and log_sum_exp gets no gradient edge (one would count its
// share twice).
Tensor cross_entropy_backward_autograd(const Tensor& grad_output, const Tensor& input,
                                       const Tensor& target, const OptTensor& weight,
                                       int64_t reduction, int64_t ignore_index,
                                       double label_smoothing, const OptTensor& log_sum_exp) {
  refuse_grad(weight, "cross_entropy_backward", "weight");
  const CrossEntropyArgs args{reduction, ignore_index, label_smoothing};
  Tensor grad_input = below_autograd([&] {
    return cross_entropy_backward_op().call(grad_output, input, target, weight, reduction,
                                            ignore_index, label_smoothing, log_sum_exp);
  });
  if (any_needs_grad(grad_output, input, target)) {
    auto node = make_node<CrossEntropyBackwardNode>(grad_output, input, target);
    node->args = args;
    node->save(grad_output);
    node->save(input);
    node->save(target);
    node->save(weight);
    record(node, grad_input);
  }
  if (any_tangent(grad_output, input, target)) {
    const Tensor g = primal(grad_output), x = primal(input), t = primal(target);
    const Tensor dg = tangent(grad_output), dx = tangent(input), dt = tangent(target);
    const OptTensor lse = log_sum_exp.has_value() ? opt(primal(*log_sum_exp)) : std::nullopt;
    Tensor out = dg.defined() ? cross_entropy_backward_op().call(dg, x, t, weight, reduction,
                                                                 ignore_index, label_smoothing,
                                                                 lse)
                              : Tensor();
    if (dx.defined()) out = add_maybe(out, ce_input_term(g, x, t, weight, args, dx));
    if (dt.defined()) out = add_maybe(out, ce_target_jvp(g, x, weight, args, dt));
    set_tangent(grad_input, out);
  }
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) {
  // Every op of op_handles.h: its name##_autograd above, which must take the op's signature
  // (checked here at compile time, and against the schema by m.impl at load).
#define PYENGINE_REGISTER_AUTOGRAD(name, signature)                                         \
  static_assert(std::is_same_v<decltype(name##_autograd), signature>,                      \
                #name "_autograd must have the signature of pyengine::" #name);            \
  m.impl(#name, name##_autograd);
  PYENGINE_FORWARD_OPS(PYENGINE_REGISTER_AUTOGRAD)
  PYENGINE_BACKWARD_OPS(PYENGINE_REGISTER_AUTOGRAD)
#undef PYENGINE_REGISTER_AUTOGRAD
}

}  // namespace pyengine
