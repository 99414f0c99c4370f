// Autocast for pyengine's forward operators: under torch.autocast each one casts its floating
// arguments as torch's autocast casts those of the operator's torch twin, device by device, so a
// model computes in the same dtypes on pyengine as on torch.nn. The policies are torch's (the
// lists in ATen/autocast_mode.h for CUDA; for the CPU, torch's CPU lists, as its twins behave):
//
//   lower_precision  floating arguments (not float64) to the autocast dtype (bfloat16 / float16):
//                    conv2d, linear, and the fused conv2d_relu_max_pool2d (a convolution first);
//   float32          floating arguments to float32: the losses, and softmax / log_softmax on
//                    CUDA (torch computes those in float32 there: "fp32_set_opt_dtype");
//   refuse           torch's error and advice: binary_cross_entropy on CUDA ("unsafe to
//                    autocast"; torch's CPU autocast runs it in float32, and so does pyengine's);
//   (not listed)     runs in its inputs' dtype (torch's fallthrough): relu, leaky_relu, sigmoid,
//                    tanh, max_pool2d, and softmax / log_softmax on the CPU.
//
// Backward operators are not listed: autograd calls them with the dtypes the forward ran in, as
// it does torch's. Casts of float32 leaf tensors (parameters) are cached for the duration of the
// autocast region by torch's own cache (at::autocast::cached_cast), as for torch's operators.
// tests/test_autocast.py checks each policy against the torch twin's result dtype.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "op_handles.h"

namespace pyengine {
namespace {

enum class Policy { lower_precision, float32, refuse };

// X(name, CPU policy, CUDA policy): `none` leaves the op to torch's fallthrough on that device.
#define PYENGINE_AUTOCAST_POLICIES(X)                          \
  X(conv2d, lower_precision, lower_precision)                  \
  X(conv2d_relu_max_pool2d, lower_precision, lower_precision)  \
  X(linear, lower_precision, lower_precision)                  \
  X(softmax, none, float32)                                    \
  X(log_softmax, none, float32)                                \
  X(mse_loss, float32, float32)                                \
  X(binary_cross_entropy, float32, refuse)                     \
  X(cross_entropy, float32, float32)                           \
  X(cross_entropy_with_log_sum_exp, float32, float32)

template <typename A>
const A& cast(const A& a, at::ScalarType, c10::DeviceType) {
  return a;
}
// cached_cast casts only what torch's autocast would: floating, not float64, on `device`.
inline at::Tensor cast(const at::Tensor& t, at::ScalarType to, c10::DeviceType device) {
  return t.defined() ? at::autocast::cached_cast(to, t, device) : t;
}
inline std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t, at::ScalarType to,
                                      c10::DeviceType device) {
  if (!t) return t;
  return cast(*t, to, device);
}

template <typename Handle>
struct SignatureOf;
template <typename Sig>
struct SignatureOf<const c10::TypedOperatorHandle<Sig>& (*)()> {
  using type = Sig;
};

template <c10::DeviceType device, Policy policy, typename Sig, auto handle>
struct Autocast;
template <c10::DeviceType device, Policy policy, typename R, typename... Args, auto handle>
struct Autocast<device, policy, R(Args...), handle> {
  static R call(Args... args) {
    if constexpr (policy == Policy::refuse) {
      TORCH_CHECK(false,
                  "pyengine.binary_cross_entropy (torch.nn.functional.binary_cross_entropy, "
                  "torch.nn.BCELoss) is unsafe to autocast, as torch's is.\n"
                  "Many models use a sigmoid layer right before the binary cross entropy layer. "
                  "In this case, combine the two layers using "
                  "torch.nn.functional.binary_cross_entropy_with_logits or "
                  "torch.nn.BCEWithLogitsLoss, which are safe to autocast; or compute the loss "
                  "outside the autocast region, in float32.");
    } else {
      constexpr c10::DispatchKey key = device == c10::DeviceType::CUDA
                                           ? c10::DispatchKey::AutocastCUDA
                                           : c10::DispatchKey::AutocastCPU;
      c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
      const at::ScalarType to = policy == Policy::lower_precision
                                    ? at::autocast::get_autocast_dtype(device)
                                    : at::kFloat;
      return handle().call(cast(args, to, device)...);
    }
  }
};

template <c10::DeviceType device, Policy policy, auto handle>
void register_autocast(torch::Library& m, const char* name) {
  using Sig = typename SignatureOf<decltype(handle)>::type;
  m.impl(name, TORCH_FN((Autocast<device, policy, Sig, handle>::call)));
}

// The `none` policy registers nothing: torch's fallthrough runs the op in its inputs' dtype.
#define PYENGINE_AUTOCAST_REGISTER_none(device, name)
#define PYENGINE_AUTOCAST_REGISTER_lower_precision(device, name) \
  register_autocast<device, Policy::lower_precision, &name##_op>(m, #name);
#define PYENGINE_AUTOCAST_REGISTER_float32(device, name) \
  register_autocast<device, Policy::float32, &name##_op>(m, #name);
#define PYENGINE_AUTOCAST_REGISTER_refuse(device, name) \
  register_autocast<device, Policy::refuse, &name##_op>(m, #name);

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, AutocastCPU, m) {
#define PYENGINE_AUTOCAST_CPU(name, cpu, cuda) \
  PYENGINE_AUTOCAST_REGISTER_##cpu(c10::DeviceType::CPU, name)
  PYENGINE_AUTOCAST_POLICIES(PYENGINE_AUTOCAST_CPU)
#undef PYENGINE_AUTOCAST_CPU
}

TORCH_LIBRARY_IMPL(pyengine, AutocastCUDA, m) {
#define PYENGINE_AUTOCAST_CUDA(name, cpu, cuda) \
  PYENGINE_AUTOCAST_REGISTER_##cuda(c10::DeviceType::CUDA, name)
  PYENGINE_AUTOCAST_POLICIES(PYENGINE_AUTOCAST_CUDA)
#undef PYENGINE_AUTOCAST_CUDA
}

}  // namespace pyengine
