#pragma once
// The strides of every operator's outputs: the ones torch's own kernels give for the same inputs,
// so that a model keeps its memory format (channels_last stays channels_last, a transposed
// activation stays transposed) when pyengine's operators replace torch's. Written once for the
// CPU, CUDA and Meta kernels: torch.compile's fake tensors must carry the real kernels' strides.
// `Int` is int64_t for real tensors and c10::SymInt for Meta kernels under dynamic shapes, where
// comparisons guard (`truth`), as torch's own meta functions do.
//
// torch's rules (torch 2.13, measured on CPU; its CUDA kernels follow the same ones):
//
//   op                                   output layout
//   -----------------------------------  --------------------------------------------------------
//   relu, leaky_relu, sigmoid, tanh,     TensorIterator's (elementwise_layout below): all
//   their backward ops, mse_loss 'none'  operands contiguous -> contiguous; all channels_last ->
//                                        channels_last; all dense with equal strides -> those
//                                        strides; else the dims ordered by the operands' strides,
//                                        the first operand deciding (a transposed input gives a
//                                        transposed output, a strided one a dense one in its
//                                        order). Operand order as in torch's kernels: see
//                                        kReluBackwardLead etc.
//   conv2d, conv2d_backward              channels_last when input or weight suggests it
//   (output, grad_input, grad_weight)    (suggest_memory_format); an unbatched input counts as the
//                                        batch of one torch makes of it. grad_output's layout
//                                        does not matter.
//   max_pool2d, max_pool2d_with_indices  channels_last when the (4-D) input suggests it.
//   (output, indices), its backward
//   linear                               output contiguous; gradients as torch's mm backward lays
//                                        them out: see linear_grad_input_layout.
//   binary_cross_entropy ('none') and    at::empty_like(input).
//   its backward
//   binary_cross_entropy_target_backward TensorIterator's over input (torch's -logit(input)).
//   mse_loss with weight                 the layouts of torch's composite (x - t)^2 * w.
//   softmax, log_softmax, cross_entropy, contiguous, whatever the input's layout.
//   their backward ops, mse_loss_backward
//   (no weight)
#include <ATen/TensorUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/MemoryFormat.h>

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "cpu/allocator.h"

namespace pyengine {

template <typename Int>
inline c10::ArrayRef<Int> strides_of(const at::Tensor& t);
template <>
inline c10::ArrayRef<int64_t> strides_of<int64_t>(const at::Tensor& t) { return t.strides(); }
template <>
inline c10::ArrayRef<c10::SymInt> strides_of<c10::SymInt>(const at::Tensor& t) {
  return t.sym_strides();
}

// Real (int64_t-sized) outputs on the CPU come from pyengine's output cache (cpu/allocator.h);
// others from at::empty. (Pinned host memory stays torch's.)
inline bool from_output_cache(const at::TensorOptions& options) {
  return options.device().is_cpu() && !options.pinned_memory() &&
         options.layout() == c10::kStrided;
}
inline at::Tensor empty_of(c10::ArrayRef<int64_t> sizes, const at::TensorOptions& options) {
  if (from_output_cache(options)) return cpu::empty_cached(sizes, options);
  return at::empty(sizes, options);
}
inline at::Tensor empty_of(c10::ArrayRef<c10::SymInt> sizes, const at::TensorOptions& options) {
  return at::empty_symint(sizes, options);
}
inline at::Tensor empty_strided_of(c10::ArrayRef<int64_t> sizes, c10::ArrayRef<int64_t> strides,
                                   const at::TensorOptions& options) {
  if (from_output_cache(options)) return cpu::empty_strided_cached(sizes, strides, options);
  return at::empty_strided(sizes, strides, options);
}
inline at::Tensor empty_strided_of(c10::ArrayRef<c10::SymInt> sizes,
                                   c10::ArrayRef<c10::SymInt> strides,
                                   const at::TensorOptions& options) {
  return at::empty_strided_symint(sizes, strides, options);
}

// An output's layout: at::empty's contiguous strides, or explicit ones.
template <typename Int>
struct Layout {
  bool contiguous = true;
  std::vector<Int> strides;  // when !contiguous
  static Layout strided(std::vector<Int> s) { return {false, std::move(s)}; }
};

template <typename Int>
at::Tensor empty_with_layout(c10::ArrayRef<Int> sizes, const Layout<Int>& layout,
                             const at::TensorOptions& options) {
  if (layout.contiguous) return empty_of(sizes, options);
  return empty_strided_of(sizes, c10::ArrayRef<Int>(layout.strides), options);
}

// ---- Kernels over dense storage ---------------------------------------------------------------

// True when one flat walk over a's storage and one over b's meet the same elements in step: both
// non-overlapping and dense, with equal strides on every dim of size > 1.
inline bool same_dense_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// `t` itself when it lies in memory in the order of `like` (a dense output), else a copy of it
// with like's strides: elementwise kernels then run one flat loop over every operand's storage,
// in whatever layout the output has, without a copy in the common case.
inline at::Tensor in_order_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_dense_order(t, like)) return t;
  at::Tensor copy = at::empty_strided(like.sizes(), like.strides(), t.options());
  copy.copy_(t);
  return copy;
}

// ---- TensorIterator's output strides -----------------------------------------------------------

namespace layout_detail {

// The same predicates as torch's TensorImpl flags (c10/core/Contiguity.h), on plain sizes and
// strides, so they also apply to the layouts of intermediate results that exist only on paper.
template <typename Int>
bool is_contiguous(c10::ArrayRef<Int> sizes, c10::ArrayRef<Int> strides) {
  for (const Int& s : sizes)
    if (truth(s == 0)) return true;
  Int expected = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (truth(sizes[d] == 1)) continue;
    if (truth(strides[d] != expected)) return false;
    expected = expected * sizes[d];
  }
  return true;
}

template <typename Int>
bool is_channels_last_contiguous(c10::ArrayRef<Int> sizes, c10::ArrayRef<Int> strides) {
  if (sizes.size() != 4) return false;
  Int expected = 1;
  for (int d : {1, 3, 2, 0}) {
    if (truth(sizes[d] == 1)) continue;
    if (truth(strides[d] != expected)) return false;
    expected = expected * sizes[d];
  }
  return true;
}

template <typename Int>
bool is_non_overlapping_and_dense(c10::ArrayRef<Int> sizes, c10::ArrayRef<Int> strides) {
  const size_t n = sizes.size();
  if (n == 1) return truth(sizes[0] < 2) || truth(strides[0] == 1);
  std::vector<size_t> order;  // dims of size >= 2 by increasing stride; the others do not count
  for (size_t d = 0; d < n; ++d) {
    if (truth(sizes[d] < 2)) continue;
    size_t k = order.size();
    order.push_back(d);
    for (; k > 0 && truth(strides[order[k - 1]] > strides[d]); --k) order[k] = order[k - 1];
    order[k] = d;
  }
  Int expected = 1;
  for (size_t d : order) {
    if (truth(strides[d] != expected)) return false;
    expected = expected * sizes[d];
  }
  return true;
}

template <typename Int>
Int at_least_one(const Int& v) {
  return truth(v >= 1) ? v : Int(1);
}

}  // namespace layout_detail

// at::empty's contiguous strides (a size-0 dim counts as 1).
template <typename Int>
std::vector<Int> contiguous_strides(c10::ArrayRef<Int> sizes) {
  std::vector<Int> s(sizes.size());
  Int next = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    s[d] = next;
    next = next * layout_detail::at_least_one(sizes[d]);
  }
  return s;
}

// The strides torch's TensorIterator gives the output of an elementwise op whose operands (all of
// `sizes`, broadcast ones with stride 0) have `operand_strides`, in torch's operand order
// (TensorIterator.cpp: fast_set_up, reorder_dimensions, allocate_or_resize_outputs).
// `has_scalar`: one more operand is a 0-d scalar (x * 2.0), which turns the fast path off.
template <typename Int>
Layout<Int> elementwise_layout(c10::ArrayRef<Int> sizes,
                               std::initializer_list<c10::ArrayRef<Int>> operand_strides,
                               bool has_scalar = false) {
  using namespace layout_detail;
  const int64_t n = static_cast<int64_t>(sizes.size());
  if (!has_scalar) {  // fast path: the operands agree on a layout
    bool contiguous = true, channels_last = true, dense = true, same = true;
    for (c10::ArrayRef<Int> s : operand_strides) {
      contiguous = contiguous && is_contiguous(sizes, s);
      channels_last = channels_last && is_channels_last_contiguous(sizes, s);
      dense = dense && is_non_overlapping_and_dense(sizes, s);
      const c10::ArrayRef<Int> first = *operand_strides.begin();
      for (int64_t d = 0; same && d < n; ++d) same = truth(s[d] == first[d]);
    }
    if (contiguous) return {};
    if (channels_last) return Layout<Int>::strided(c10::get_channels_last_strides_2d<Int>(sizes));
    if (dense && same) {
      const c10::ArrayRef<Int> last = *(operand_strides.end() - 1);
      return Layout<Int>::strided(std::vector<Int>(last.begin(), last.end()));
    }
  }
  if (n <= 1) return {};
  // perm[0] is the fastest-moving dim. 1 if dim a should come after dim b, -1 if before, 0 if the
  // operands cannot tell (broadcast or tied dims).
  auto should_swap = [&](int64_t a, int64_t b) {
    for (c10::ArrayRef<Int> s : operand_strides) {
      if (truth(s[a] == 0) || truth(s[b] == 0)) continue;
      if (truth(s[a] < s[b])) return -1;
      if (truth(s[a] > s[b])) return 1;
      if (truth(sizes[a] > sizes[b])) return 1;
    }
    return 0;
  };
  std::vector<int64_t> perm(n);
  for (int64_t k = 0; k < n; ++k) perm[k] = n - 1 - k;
  for (int64_t i = 1; i < n; ++i) {  // insertion sort that tolerates ambiguous comparisons
    int64_t b = i;
    for (int64_t a = i - 1; a >= 0; --a) {
      const int c = should_swap(perm[a], perm[b]);
      if (c > 0) {
        std::swap(perm[a], perm[b]);
        b = a;
      } else if (c < 0) {
        break;
      }
    }
  }
  bool inverted = true;
  for (int64_t k = 0; k < n; ++k) inverted = inverted && perm[k] == n - 1 - k;
  if (inverted) return {};
  std::vector<Int> strides(n);
  Int next = 1;
  for (int64_t k = 0; k < n; ++k) {
    strides[perm[k]] = next;
    next = next * sizes[perm[k]];
  }
  return Layout<Int>::strided(std::move(strides));
}

// The strides a layout stands for (contiguous: at::empty's).
template <typename Int>
std::vector<Int> strides_of_layout(c10::ArrayRef<Int> sizes, const Layout<Int>& layout) {
  return layout.contiguous ? contiguous_strides(sizes) : layout.strides;
}

// The output of an elementwise op over same-shape tensors, given in torch's operand order.
template <typename Int>
at::Tensor empty_elementwise(std::initializer_list<const at::Tensor*> operands,
                             const at::TensorOptions& options) {
  const at::Tensor& first = **operands.begin();
  bool contiguous = true;  // the common case, answered from the tensors' cached flags
  for (const at::Tensor* t : operands) contiguous = contiguous && t->is_contiguous();
  if (contiguous) return empty_of(sizes_of<Int>(first), options);
  std::vector<c10::ArrayRef<Int>> strides;
  for (const at::Tensor* t : operands) strides.push_back(strides_of<Int>(*t));
  Layout<Int> layout;
  switch (strides.size()) {  // initializer_list cannot be built from a vector
    case 1: layout = elementwise_layout<Int>(sizes_of<Int>(first), {strides[0]}); break;
    case 2: layout = elementwise_layout<Int>(sizes_of<Int>(first), {strides[0], strides[1]}); break;
    default: TORCH_INTERNAL_ASSERT(false, "empty_elementwise: 1 or 2 operands");
  }
  return empty_with_layout<Int>(sizes_of<Int>(first), layout, options);
}

// Which operand leads the layout of an activation's backward op, as in torch's kernels:
// threshold_backward and leaky_relu_backward iterate (self, grad_output), sigmoid_backward and
// tanh_backward (grad_output, output).
enum class BackwardLead { kGradOutput, kSaved };
constexpr BackwardLead kReluBackwardLead = BackwardLead::kSaved;
constexpr BackwardLead kLeakyReluBackwardLead = BackwardLead::kSaved;
constexpr BackwardLead kSigmoidBackwardLead = BackwardLead::kGradOutput;
constexpr BackwardLead kTanhBackwardLead = BackwardLead::kGradOutput;

template <typename Int>
at::Tensor empty_activation_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                                     BackwardLead lead) {
  if (lead == BackwardLead::kSaved)
    return empty_elementwise<Int>({&saved, &grad_output}, grad_output.options());
  return empty_elementwise<Int>({&grad_output, &saved}, grad_output.options());
}

// ---- Losses ---------------------------------------------------------------------------------

// mse_loss(input, target, weight, 'none'). Without weight torch's mse_loss iterates
// (input, target); with weight F.mse_loss computes pow(input - target, 2) * weight.
template <typename Int>
Layout<Int> mse_loss_layout(const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor* weight) {
  const auto sizes = sizes_of<Int>(input);
  const Layout<Int> diff =
      elementwise_layout<Int>(sizes, {strides_of<Int>(input), strides_of<Int>(target)});
  if (!weight) return diff;
  const auto diff_s = strides_of_layout<Int>(sizes, diff);
  const auto squared = strides_of_layout<Int>(sizes, elementwise_layout<Int>(sizes, {diff_s}));
  return elementwise_layout<Int>(sizes, {squared, strides_of<Int>(*weight)});
}

// d mse_loss / d input: torch's mse_loss_backward is contiguous; with weight, autograd through
// F.mse_loss's composite gives grad_d = (grad * weight) * (2 * d), with grad_output broadcast
// (stride 0) for 'mean' / 'sum', d = input - target.
template <typename Int>
Layout<Int> mse_loss_backward_layout(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& target, const at::Tensor* weight,
                                     int64_t reduction) {
  if (!weight) return {};
  const auto sizes = sizes_of<Int>(input);
  const std::vector<Int> broadcast(sizes.size(), Int(0));
  const c10::ArrayRef<Int> grad =
      reduction == 0 ? strides_of<Int>(grad_output) : c10::ArrayRef<Int>(broadcast);
  const auto grad_squared = strides_of_layout<Int>(
      sizes, elementwise_layout<Int>(sizes, {grad, strides_of<Int>(*weight)}));
  const auto diff = strides_of_layout<Int>(
      sizes, elementwise_layout<Int>(sizes, {strides_of<Int>(input), strides_of<Int>(target)}));
  const auto diff_pow1 = strides_of_layout<Int>(sizes, elementwise_layout<Int>(sizes, {diff}));
  const auto twice = strides_of_layout<Int>(
      sizes, elementwise_layout<Int>(sizes, {diff_pow1}, /*has_scalar=*/true));
  return elementwise_layout<Int>(sizes, {grad_squared, twice});
}

// binary_cross_entropy 'none' and its backward: torch allocates at::empty_like(input).
inline at::Tensor empty_binary_cross_entropy(const at::Tensor& input) {
  return at::empty_like(input);
}
// binary_cross_entropy_target_backward: torch computes -logit(input), an elementwise op over
// input (then scaled in place by grad_output and weight).
template <typename Int>
at::Tensor empty_binary_cross_entropy_target_grad(const at::Tensor& input) {
  return empty_elementwise<Int>({&input}, input.options());
}

// ---- Convolution and pooling ------------------------------------------------------------------

inline bool suggests_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// torch (oneDNN on CPU, cuDNN on CUDA) convolves in channels_last when the input or the weight
// suggests it. An unbatched input is judged as torch's batch of one, input.unsqueeze(0) (which
// rarely looks channels_last: its batch stride is C).
inline bool conv2d_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  if (suggests_channels_last(weight)) return true;
  return suggests_channels_last(input.dim() == 4 ? input : input.unsqueeze(0));
}

// torch's max-pooling kernels follow input.suggest_memory_format() (4-D inputs only).
inline bool pool2d_channels_last(const at::Tensor& input) {
  return suggests_channels_last(input);
}

// (N, C, H, W) or unbatched (C, H, W): in channels_last order, the unbatched one as the batch of
// one's channels_last strides with the batch dim dropped.
template <typename Int>
at::Tensor empty_image(c10::ArrayRef<Int> sizes, bool channels_last,
                       const at::TensorOptions& options) {
  if (!channels_last) return empty_of(sizes, options);
  const std::vector<Int> strides = c10::get_channels_last_strides_2d<Int>(sizes);
  return empty_strided_of(sizes, c10::ArrayRef<Int>(strides), options);
}

// conv2d_relu_max_pool2d's output: torch's max_pool2d of relu(conv2d(input, weight)) follows the
// suggested format of the convolution's output, itself channels_last as conv2d_channels_last
// says. Judged on a meta tensor of that output's sizes and strides (no memory), so every backend
// and the Meta kernel decide alike, ambiguous shapes (one channel, 1x1 planes) included.
template <typename Int>
bool conv2d_pool2d_channels_last(const at::Tensor& input, const at::Tensor& weight,
                                 c10::ArrayRef<Int> conv_output_sizes) {
  return pool2d_channels_last(empty_image<Int>(conv_output_sizes,
                                               conv2d_channels_last(input, weight),
                                               input.options().device(at::kMeta)));
}

// `t`, a contiguous (N, C, H, W) or (C, H, W) result as the kernels write it, in torch's layout:
// itself, or a channels_last copy. (The kernels compute in NCHW; channels_last pays one copy.)
inline at::Tensor as_image_layout(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return t;
  at::Tensor out = empty_image<int64_t>(t.sizes(), true, t.options());
  out.copy_(t);
  return out;
}

// conv2d_backward's (grad_input, grad_weight, grad_bias), contiguous as the kernels write them,
// in torch's layout: grad_input and grad_weight channels_last when the convolution is
// (conv2d_channels_last), copied by `in_layout` (as_image_layout's contract; the CPU kernels
// pass their own, cpu/image_layout.h); undefined gradients stay undefined.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_grads_in_layout(
    std::tuple<at::Tensor, at::Tensor, at::Tensor> grads, const at::Tensor& input,
    const at::Tensor& weight,
    at::Tensor (*in_layout)(const at::Tensor&, bool) = as_image_layout) {
  const bool channels_last = conv2d_channels_last(input, weight);
  auto& [grad_input, grad_weight, grad_bias] = grads;
  if (grad_input.defined()) grad_input = in_layout(grad_input, channels_last);
  if (grad_weight.defined()) grad_weight = in_layout(grad_weight, channels_last);
  return grads;
}

// ---- Linear ---------------------------------------------------------------------------------

// torch's linear is addmm / matmul of input (seen as a (rows, in) matrix) by weight.t(), and its
// mm backward returns a column-major gradient for a column-major operand ("for efficiency").
//   grad_input: column-major (strides (1, rows) in the (rows, in) view) when that view of the
//     input is: a 2-D input's own strides; an N-D input folded by reshape as matmul does (only
//     when the fold is a view: a copy is contiguous; and matmul folds only when weight needs a
//     gradient or the leading dims chain).
//   grad_weight: contiguous when weight is (strides (in, 1)), else column-major (1, out).
template <typename Int>
Layout<Int> linear_grad_input_layout(const at::Tensor& input, const Int& rows,
                                     const Int& in_features, bool weight_needs_grad) {
  const auto sizes = sizes_of<Int>(input);
  const auto strides = strides_of<Int>(input);
  const size_t n = sizes.size();
  if (n < 2) return {};
  std::vector<Int> matrix;  // the (rows, in) view's strides
  if (n == 2) {
    matrix.assign(strides.begin(), strides.end());
  } else {
    bool chained = true;  // every leading dim steps over the next one (matmul's should_fold)
    for (size_t i = 0; chained && i + 2 < n; ++i)
      chained = truth(strides[i] == strides[i + 1] * sizes[i + 1]);
    if (!(weight_needs_grad || truth(rows * in_features == 0) || chained)) return {};
    const std::vector<Int> shape2{rows, in_features};
    auto view = at::detail::computeStride(sizes, strides, c10::ArrayRef<Int>(shape2));
    if (!view.has_value()) return {};
    matrix.assign(view->begin(), view->end());
  }
  if (!(truth(matrix[0] == 1) && truth(matrix[1] == rows))) return {};
  // The gradient as mm makes it, (in, rows) contiguous transposed, then viewed as input's shape.
  const std::vector<Int> shape2{rows, in_features};
  const std::vector<Int> col_major{Int(1), layout_detail::at_least_one(rows)};
  if (n == 2) return Layout<Int>::strided(col_major);
  auto view = at::detail::computeStride(c10::ArrayRef<Int>(shape2), c10::ArrayRef<Int>(col_major),
                                        sizes);
  TORCH_INTERNAL_ASSERT(view.has_value());
  return Layout<Int>::strided(std::vector<Int>(view->begin(), view->end()));
}

template <typename Int>
Layout<Int> linear_grad_weight_layout(const at::Tensor& weight) {
  const auto sizes = sizes_of<Int>(weight);
  const auto strides = strides_of<Int>(weight);
  if (truth(strides[1] == 1) && truth(strides[0] == sizes[1])) return {};
  return Layout<Int>::strided({Int(1), layout_detail::at_least_one(sizes[0])});
}

}  // namespace pyengine
