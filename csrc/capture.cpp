// The replay half of pyengine.capture_step (pyengine/_capture.py records, this runs): a training
// step recorded once as the list of dispatcher calls it made below autograd (pyengine's forward
// and backward operators, the views and detaches autograd made, the optimizer's in-place ATen
// ops) and replayed as one C++ call, without Python, autograd's graph or the optimizer's Python.
// Each call is the same operator on the same kind of arguments, so the results are the eager
// step's, bit for bit: the kernels are the same, run in the same order on the same values.
//
// The program's tensors live in a table of slots: the step's inputs first (set per call), then
// the persistent tensors the step read but did not create (parameters, momentum buffers: held by
// reference, so in-place updates land in the user's tensors), then each call's outputs. A slot
// is released after its last use, so a replay holds no more memory than the eager step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace pyengine {
namespace {

// One argument of a recorded call: a constant, a tensor slot, or a list of tensor slots
// (-1: None in a Tensor?[] list).
struct Arg {
  enum Kind { kConst, kSlot, kSlots } kind;
  c10::IValue value;
  int64_t slot = -1;
  std::vector<int64_t> slots;
  bool optional_list = false;
};

struct Call {
  c10::OperatorHandle op;
  std::vector<Arg> args;
  std::vector<int64_t> outputs;  // a slot per returned tensor (flattened lists), -1: unused
  std::vector<int64_t> written;  // slots the schema marks as written in place (version bump)
  std::vector<int64_t> release;  // slots whose last use is this call
};

class StepProgram {
 public:
  StepProgram(int64_t inputs, int64_t slots) : inputs_(inputs), table_(slots) {}

  // A persistent tensor for `slot` (held by reference).
  void set_persistent(int64_t slot, const at::Tensor& t) {
    check_slot(slot);
    table_[slot] = t;
    persistent_.push_back(slot);
  }

  // args: one (kind, payload) pair per schema argument, in schema order: ("const", value),
  // ("slot", i) or ("slots", [i, ...]).
  void add_call(const std::string& name, const std::string& overload, const py::list& args,
                const std::vector<int64_t>& outputs) {
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const c10::FunctionSchema& schema = handle.schema();
    TORCH_CHECK(static_cast<size_t>(py::len(args)) == schema.arguments().size(),
                "capture_step: ", name, ".", overload, " recorded with ", py::len(args),
                " arguments, its schema has ", schema.arguments().size());
    Call call{handle, {}, outputs, {}, {}};
    for (size_t i = 0; i < schema.arguments().size(); ++i) {
      const c10::Argument& formal = schema.arguments()[i];
      const py::tuple entry = args[i].cast<py::tuple>();
      const std::string kind = entry[0].cast<std::string>();
      Arg arg{Arg::kConst, {}, -1, {}, false};
      if (kind == "slot") {
        arg.kind = Arg::kSlot;
        arg.slot = entry[1].cast<int64_t>();
        check_slot(arg.slot);
        if (formal.alias_info() && formal.alias_info()->isWrite()) call.written.push_back(arg.slot);
      } else if (kind == "slots") {
        arg.kind = Arg::kSlots;
        arg.slots = entry[1].cast<std::vector<int64_t>>();
        for (int64_t s : arg.slots)
          if (s >= 0) check_slot(s);
        arg.optional_list = formal.type()->kind() == c10::TypeKind::ListType &&
                            formal.type()->containedType(0)->kind() == c10::TypeKind::OptionalType;
      } else {
        TORCH_CHECK(kind == "const", "capture_step: unknown argument kind ", kind);
        const py::handle v = entry[1];
        if (formal.type()->kind() == c10::TypeKind::TensorType &&
            (py::isinstance<py::bool_>(v) || py::isinstance<py::int_>(v) ||
             py::isinstance<py::float_>(v))) {
          // A Python number where the schema has a Tensor (x.mul_(0.9)): the "wrapped number"
          // tensor torch's argument parser makes of it, which type promotion ignores.
          at::Tensor w = py::isinstance<py::bool_>(v)   ? at::scalar_tensor(v.cast<bool>())
                         : py::isinstance<py::int_>(v) ? at::scalar_tensor(v.cast<int64_t>(),
                                                                           at::kLong)
                                                       : at::scalar_tensor(v.cast<double>(),
                                                                           at::kDouble);
          w.unsafeGetTensorImpl()->set_wrapped_number(true);
          arg.value = std::move(w);
        } else {
          arg.value = torch::jit::toIValue(v, formal.type());
        }
      }
      call.args.push_back(std::move(arg));
    }
    for (int64_t s : outputs)
      if (s >= 0) check_slot(s);
    calls_.push_back(std::move(call));
  }

  // After the step, param.grad = the tensor in grad_slot (autograd's AccumulateGrad, replayed).
  void set_grads(const std::vector<std::pair<int64_t, int64_t>>& param_and_grad) {
    for (const auto& [p, g] : param_and_grad) {
      check_slot(p);
      check_slot(g);
    }
    grads_ = param_and_grad;
  }

  // The slots run() returns; every other slot is released after its last use.
  void finalize(const std::vector<int64_t>& results) {
    for (int64_t s : results) check_slot(s);
    results_ = results;
    drop_detaches();
    std::vector<bool> keep(table_.size(), false);
    for (int64_t s : persistent_) keep[s] = true;
    for (int64_t s : results_) keep[s] = true;
    for (const auto& [p, g] : grads_) keep[p] = keep[g] = true;
    std::vector<int64_t> last(table_.size(), -1);
    for (size_t c = 0; c < calls_.size(); ++c) {
      for (const Arg& a : calls_[c].args) {
        if (a.kind == Arg::kSlot) last[a.slot] = static_cast<int64_t>(c);
        for (int64_t s : a.slots)
          if (s >= 0) last[s] = static_cast<int64_t>(c);
      }
      for (int64_t s : calls_[c].outputs)
        if (s >= 0 && last[s] < static_cast<int64_t>(c)) last[s] = static_cast<int64_t>(c);
    }
    for (size_t s = 0; s < table_.size(); ++s)
      if (!keep[s] && last[s] >= 0) calls_[last[s]].release.push_back(static_cast<int64_t>(s));
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == inputs_, "the captured step takes ",
                inputs_, " tensors, got ", inputs.size());
    std::vector<at::Tensor> t = table_;  // persistent tensors by reference, the rest empty
    for (int64_t i = 0; i < inputs_; ++i) t[i] = inputs[i];
    std::vector<at::Tensor> results;
    {
      // Below autograd: the recorded calls are what autograd itself ran; nothing records a graph.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      torch::jit::Stack stack;
      for (const Call& call : calls_) {
        stack.clear();
        for (const Arg& a : call.args) {
          switch (a.kind) {
            case Arg::kConst:
              stack.push_back(a.value);
              break;
            case Arg::kSlot:
              stack.emplace_back(t[a.slot]);
              break;
            case Arg::kSlots:
              if (a.optional_list) {
                c10::List<std::optional<at::Tensor>> list;
                for (int64_t s : a.slots)
                  list.push_back(s >= 0 ? std::optional<at::Tensor>(t[s]) : std::nullopt);
                stack.emplace_back(list);
              } else {
                c10::List<at::Tensor> list;
                for (int64_t s : a.slots) list.push_back(t[s]);
                stack.emplace_back(list);
              }
              break;
          }
        }
        call.op.callBoxed(stack);
        size_t out = 0;
        for (c10::IValue& v : stack) {
          if (v.isTensor()) {
            if (out < call.outputs.size() && call.outputs[out] >= 0)
              t[call.outputs[out]] = std::move(v).toTensor();
            ++out;
          } else if (v.isTensorList()) {
            for (const at::Tensor& e : v.toTensorList()) {
              if (out < call.outputs.size() && call.outputs[out] >= 0) t[call.outputs[out]] = e;
              ++out;
            }
          } else if (v.isNone()) {
            ++out;
          }
        }
        // In-place updates below ADInplaceOrView skip the version counter: bump it, so that an
        // autograd graph saved before the step sees its tensors modified, as after an eager step.
        for (int64_t s : call.written)
          if (t[s].defined() && !t[s].is_inference()) t[s].unsafeGetTensorImpl()->bump_version();
        for (int64_t s : call.release) t[s] = at::Tensor();
      }
    }
    for (const auto& [p, g] : grads_) t[p].mutable_grad() = t[g];
    for (int64_t s : results_) results.push_back(t[s]);
    return results;
  }

  int64_t calls() const { return static_cast<int64_t>(calls_.size()); }

  std::vector<std::string> operators() const {
    std::vector<std::string> names;
    for (const Call& call : calls_) names.push_back(call.op.schema().name());
    return names;
  }

 private:
  // The detaches autograd makes (of each output it saves, of each gradient it hands to
  // AccumulateGrad) make a second TensorImpl of the same storage, version counter and metadata,
  // with no autograd meta: below autograd, where the replay runs, the tensor itself is the same
  // value. The replay reads the detached tensor's source in its place and makes no call for it
  // (the classifier 5-8-4-1 step at batch 1: 12 of its 33 calls). A detach whose tensor or
  // source some call writes to stays a call: an in-place op that changes metadata (t_,
  // resize_) would otherwise change the source too. So does one whose tensor or source the step
  // returns: the caller holds two tensors there, as after the eager step.
  void drop_detaches() {
    std::vector<bool> written(table_.size(), false), returned(table_.size(), false);
    for (const Call& call : calls_)
      for (int64_t s : call.written) written[s] = true;
    for (int64_t s : results_) returned[s] = true;
    std::vector<int64_t> source(table_.size());
    for (size_t s = 0; s < source.size(); ++s) source[s] = static_cast<int64_t>(s);
    auto resolve = [&](int64_t& s) {
      if (s >= 0) s = source[s];
    };
    std::vector<Call> kept;
    for (Call& call : calls_) {
      for (Arg& a : call.args) {
        if (a.kind == Arg::kSlot) resolve(a.slot);
        for (int64_t& s : a.slots) resolve(s);
      }
      const bool detach = call.op.schema().name() == "aten::detach" &&
                          call.op.schema().overload_name().empty() && call.args.size() == 1 &&
                          call.args[0].kind == Arg::kSlot && call.outputs.size() == 1 &&
                          call.outputs[0] >= inputs_;
      if (detach && !written[call.args[0].slot] && !written[call.outputs[0]] &&
          !returned[call.args[0].slot] && !returned[call.outputs[0]]) {
        source[call.outputs[0]] = call.args[0].slot;
        continue;
      }
      kept.push_back(std::move(call));
    }
    calls_ = std::move(kept);
    for (int64_t& s : results_) resolve(s);
    for (auto& [p, g] : grads_) {
      resolve(p);
      resolve(g);
    }
  }

  void check_slot(int64_t s) const {
    TORCH_CHECK(s >= 0 && s < static_cast<int64_t>(table_.size()), "capture_step: slot ", s,
                " outside the program's ", table_.size(), " slots");
  }

  int64_t inputs_;
  std::vector<at::Tensor> table_;
  std::vector<int64_t> persistent_;
  std::vector<Call> calls_;
  std::vector<std::pair<int64_t, int64_t>> grads_;
  std::vector<int64_t> results_;
};

}  // namespace

void bind_capture(py::module& m) {
  py::class_<StepProgram>(m, "StepProgram")
      .def(py::init<int64_t, int64_t>(), py::arg("inputs"), py::arg("slots"))
      .def("set_persistent", &StepProgram::set_persistent)
      .def("add_call", &StepProgram::add_call)
      .def("set_grads", &StepProgram::set_grads)
      .def("finalize", &StepProgram::finalize)
      // The replay needs no Python: other Python threads run meanwhile (an operator with a
      // Python kernel takes the GIL back itself).
      .def("run", &StepProgram::run, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("calls", &StepProgram::calls)
      .def_property_readonly("operators", &StepProgram::operators);
}

}  // namespace pyengine
