// pybind11 entry points: the eager fast path from pyengine.functional into the dispatcher.
// Calling a typed operator handle from here costs about a third less host time than going
// through torch.ops (docs/design.md; the benchmark suite measures it), which matters for small
// batches. It takes plain tensors only: under torch.compile, for tensor subclasses and torch.fx
// Proxies and under a TorchFunctionMode the functional layer calls torch.ops.pyengine.* instead,
// which Dynamo and fx trace and which honours __torch_function__ (_operator in _functional.py).
//
// Only forward operators are here (PYENGINE_FORWARD_OPS in op_handles.h, one entry each):
// autograd calls the backward operators from C++, and users who want them directly have
// torch.ops.pyengine.*_backward.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include "cpu/allocator.h"
#include "cpu/isa.h"
#include "op_handles.h"

namespace py = pybind11;
using namespace pyengine;

namespace pyengine {
void bind_capture(py::module& m);  // csrc/capture.cpp: pyengine.capture_step's replay
}

// The entry point of one forward operator: its arguments, exactly as its handle takes them,
// straight into the dispatcher. One template for every op, instantiated per handle.
template <typename Signature>
struct FastPath;
template <typename Ret, typename... Args>
struct FastPath<Ret(Args...)> {
  template <const c10::TypedOperatorHandle<Ret(Args...)>& (*handle)()>
  static Ret call(Args... args) {
    return handle().call(args...);
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyengine's compiled operators (registered as torch.ops.pyengine.*)";

  // pyengine._C.<op> for every forward op of csrc/op_handles.h.
#define PYENGINE_DEFINE_FAST_PATH(name, signature) \
  m.def(#name, &FastPath<signature>::call<&name##_op>);
  PYENGINE_FORWARD_OPS(PYENGINE_DEFINE_FAST_PATH)
#undef PYENGINE_DEFINE_FAST_PATH

  // {CPU kernel family: instruction set it runs with} (csrc/cpu/isa.h, which PYENGINE_CPU_ISA
  // steers); raises for a PYENGINE_CPU_ISA value it does not know.
  m.def("cpu_isa", &cpu::kernel_isas);

  bind_capture(m);

  // The CPU output cache (cpu/allocator.h): its state, and giving its blocks back.
  m.def("cpu_cache_stats", [] {
    const cpu::CacheStats s = cpu::cache_stats();
    return py::dict(py::arg("cached_bytes") = s.cached_bytes,
                    py::arg("limit_bytes") = s.limit_bytes, py::arg("hits") = s.hits,
                    py::arg("misses") = s.misses);
  });
  m.def("cpu_cache_empty", &cpu::empty_cache);

  // What this binary was built against, checked by pyengine/__init__.py at import.
  m.attr("built_with_torch") = py::make_tuple(TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
#ifdef PYENGINE_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
