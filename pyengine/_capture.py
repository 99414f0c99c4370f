"""pyengine.capture_step: a whole training step (forward, loss, backward, optimizer) run as one
C++ call, with the eager step's results.

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    step = pyengine.capture_step(train_step, x, y)   # runs a few real steps to record
    for x, y in batches:
        loss = step(x, y)                            # one call: no Python, no autograd graph

What it does: the step runs eagerly `warmup` times (optimizers create their state on the first
step), then twice under a recording TorchDispatchMode, which sees every operator call below
autograd: pyengine's forward and backward operators, the detaches and views autograd makes, the
optimizer's in-place ATen ops. The two recordings must match call for call (else the step is not
the same every time and cannot be captured); the second becomes a program that csrc/capture.cpp
replays through the dispatcher, less autograd's detaches (below autograd a detached tensor is
its source: the replay passes the source). The replay runs the same kernels in the same order on
the same values as the eager step: parameters, gradients (param.grad is set as after backward)
and optimizer state come out bitwise the same.

What is frozen at capture (as in a CUDA graph): every Python value the step passes to an
operator, such as the learning rate (capture again after changing it), and the shapes (inputs
of other shapes raise). Python code between operators does not run in a replay, so a step that
reads a tensor's value (loss.item(), a data-dependent branch) cannot be captured and raises.
"""
import weakref
from typing import Callable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _C

# Operators that only mark a region for the profiler (the optimizer's record_function): no data.
_SKIPPED_NAMESPACES = ("profiler",)


class CaptureError(RuntimeError):
    """The step cannot be captured; the message says why."""


class _Recording:
    """The calls of one step. Tensors are known by their TensorImpl's address, checked against a
    weak reference: holding the step's tensors would change what it does (autograd's
    AccumulateGrad copies a gradient that something else still references instead of taking
    it), and an address reused by a tensor no recorded call made must not pass for the old one."""

    def __init__(self, inputs):
        self.slots = 0
        self.slot_of = {}          # TensorImpl address -> (slot, weakref to the tensor)
        self.persistent = []       # (slot, tensor) read but not created by the step
        self.calls = []            # (name, overload, args, output slots)
        for t in inputs:
            self._new_slot(t)

    def _new_slot(self, t):
        s = self.slots
        self.slots += 1
        self.slot_of[t._cdata] = (s, weakref.ref(t))
        return s

    def lookup(self, t):
        entry = self.slot_of.get(t._cdata)
        if entry is None or entry[1]() is not t:
            return None
        return entry[0]

    def slot(self, t):
        s = self.lookup(t)
        if s is None:
            s = self._new_slot(t)
            self.persistent.append((s, t))
        return s

    def record(self, func, args, kwargs, out):
        schema = func._schema
        encoded = []
        for i, formal in enumerate(schema.arguments):
            if i < len(args):
                value = args[i]
            elif formal.name in kwargs:
                value = kwargs[formal.name]
            elif formal.has_default_value():
                value = formal.default_value
            else:
                raise CaptureError(f"{func} was called without its argument {formal.name}")
            encoded.append(self._encode(func, formal, value))
        outputs = []
        for r in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(r, torch.Tensor):
                outputs.append(self._new_slot(r))
            elif isinstance(r, (tuple, list)) and all(isinstance(e, torch.Tensor) for e in r):
                outputs.extend(self._new_slot(e) for e in r)
            elif r is None:
                outputs.append(-1)
            else:
                raise CaptureError(
                    f"the step calls {func}, which returns a Python value ({type(r).__name__}), "
                    "so what follows depends on values read in Python (e.g. loss.item()): a "
                    "captured step replays operators only")
        name, _, overload = str(func).rpartition(".")
        ns, _, op = name.partition(".")
        self.calls.append((f"{ns}::{op}", "" if overload == "default" else overload,
                           encoded, outputs))

    def _encode(self, func, formal, value):
        if isinstance(value, torch.Tensor):
            return ("slot", self.slot(value))
        if isinstance(value, (list, tuple)) and value and any(
                isinstance(v, torch.Tensor) for v in value):
            if not all(v is None or isinstance(v, torch.Tensor) for v in value):
                raise CaptureError(f"{func}: argument {formal.name} mixes tensors and values")
            return ("slots", [-1 if v is None else self.slot(v) for v in value])
        return ("const", value)

    def signature(self):
        """What two recordings of the same step share: the calls, with the persistent tensors
        by identity."""
        return ([(n, o, a, out) for n, o, a, out in self.calls],
                [(s, id(t)) for s, t in self.persistent])


class _Recorder(TorchDispatchMode):
    def __init__(self, recording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace not in _SKIPPED_NAMESPACES:
            self.recording.record(func, args, kwargs, out)
        return out


def _flatten_results(result) -> Tuple[List[torch.Tensor], Callable]:
    if isinstance(result, torch.Tensor):
        return [result], lambda ts: ts[0]
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        kind = type(result)
        return list(result), lambda ts: kind(ts)
    if result is None:
        return [], lambda ts: None
    raise CaptureError("capture_step: the step must return a tensor, a tuple or list of tensors, "
                       f"or None; it returned {type(result).__name__}")


def _record(step, inputs):
    recording = _Recording(inputs)
    with _Recorder(recording):
        result = step(*inputs)
    for _, t in recording.persistent:
        if t.device.type != "cpu":
            raise CaptureError(
                f"capture_step: the step uses a tensor on {t.device}; it captures CPU steps (on "
                "a GPU, capture the step in a CUDA graph: torch.cuda.graph)")
    tensors, rebuild = _flatten_results(result)
    results = [recording.lookup(t) for t in tensors]
    if any(s is None for s in results):
        raise CaptureError("capture_step: the step returned a tensor no operator of the step "
                           "produced")
    grads = []
    for slot, t in recording.persistent:
        g = t.grad if t.requires_grad and t.is_leaf else None
        if g is None:
            continue
        g_slot = recording.lookup(g)
        if g_slot is None:
            raise CaptureError(
                "capture_step: a parameter's .grad after the step was not produced by the step "
                "(gradients accumulated from before it cannot be replayed)")
        grads.append((slot, g_slot))
    return recording, results, grads, rebuild


class CapturedStep:
    """The replay of a captured step: call it with tensors of the captured shapes and dtypes."""

    def __init__(self, program, specs, rebuild):
        self._program = program
        self._specs = specs
        self._rebuild = rebuild

    def __call__(self, *inputs):
        if len(inputs) != len(self._specs):
            raise TypeError(f"the captured step takes {len(self._specs)} tensors, got "
                            f"{len(inputs)}")
        for i, (t, (shape, dtype, device)) in enumerate(zip(inputs, self._specs)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"captured step: input {i} must be a tensor, got "
                                f"{type(t).__name__}")
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"captured step: input {i} was captured as {tuple(shape)} {dtype} on "
                    f"{device}, got {tuple(t.shape)} {t.dtype} on {t.device}; capture the step "
                    "again for other shapes")
        return self._rebuild(self._program.run(list(inputs)))

    @property
    def calls(self) -> int:
        """Operator calls one replay makes."""
        return self._program.calls

    @property
    def operators(self) -> List[str]:
        """The replayed calls' operator names, in order."""
        return self._program.operators


def capture_step(step: Callable, *example_inputs: torch.Tensor, warmup: int = 1) -> CapturedStep:
    """Records `step(*example_inputs)` (a whole training step: see the module's docstring) and
    returns a callable that replays it as one C++ call. Runs the step warmup + 2 times on the
    example inputs, for real (they are training steps)."""
    if not callable(step):
        raise TypeError(f"capture_step: expected a callable step, got {type(step).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"capture_step: example input {i} must be a tensor, got "
                            f"{type(t).__name__}")
        if t.device.type != "cpu":
            raise CaptureError(
                f"capture_step: example input {i} is on {t.device}; it captures CPU steps (on "
                "a GPU, capture the step in a CUDA graph: torch.cuda.graph)")
    if warmup < 0:
        raise ValueError(f"capture_step: expected warmup >= 0, got {warmup}")
    for _ in range(warmup):
        step(*example_inputs)
    first = _record(step, example_inputs)
    second = _record(step, example_inputs)
    if first[0].signature() != second[0].signature() or first[1:3] != second[1:3]:
        raise CaptureError(
            "capture_step: two runs of the step made different operator calls (a step that "
            "creates new persistent tensors every time, or branches on values, cannot be "
            "replayed); if its optimizer creates state on its first step, capture after it "
            "(warmup >= 1)")
    recording, results, grads, rebuild = second
    program = _C.StepProgram(len(example_inputs), recording.slots)
    for slot, t in recording.persistent:
        program.set_persistent(slot, t)
    for name, overload, args, outputs in recording.calls:
        program.add_call(name, overload, args, outputs)
    program.set_grads(grads)
    program.finalize(results)
    specs = [(t.shape, t.dtype, t.device) for t in example_inputs]
    return CapturedStep(program, specs, rebuild)
