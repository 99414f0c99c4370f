"""Differential fuzzing: random calls of every operator against torch, forward and gradients.

Each case (drawn by tests/fuzz_configs.py: shapes, options, layouts, magnitudes, NaN / inf) goes
through tests/differential.py's check: pyengine's function of the op and torch's
(pyengine.functional.<op> and torch.nn.functional.<op>, or a pyengine.fused.<op> and the torch
calls it replaces) on the same values, outputs compared, then one random grad_output
back-propagated through both and every gradient compared; for a share of the cases the op's
backward operator (torch.ops.pyengine.*_backward) is also called directly.

A failing case is shrunk (smaller sizes, fewer special values, contiguous layouts, float64, ...)
while it fails the same check, and reported with its seed, a replay command and the shrunk params.

Knobs (environment):
  PYENGINE_FUZZ_OP=conv2d       fuzz this op only (the other ops' tests are skipped)
  PYENGINE_FUZZ_SEED=N          run the one case with seed N (what a failure report prints)
  PYENGINE_FUZZ_CASES=N         cases per op (default: CASES below; no limit with SECONDS)
  PYENGINE_FUZZ_SECONDS=T       per op, draw cases for T seconds (the long run: make fuzz)
  PYENGINE_RANDOM_SEED=1        fresh seeds (conftest.py); by default the seeds are a stable
                                function of the test id, so the default run is deterministic
"""
import copy
import os
import pprint
import random
import time

import pytest
import torch
import torch.nn.functional as F

import fuzz_configs
import helpers
import pyengine.functional as PF
from differential import check, failure
from fuzz_configs import build, draw

# Cases per op in the default suite, by cost (a conv2d case takes ~10 ms, a relu one ~1 ms): the
# whole lane takes ~15 s on the busy 2-core machine.
CASES = dict(conv2d=150, max_pool2d=300, linear=250, softmax=300, log_softmax=300,
             cross_entropy=300, relu=400, leaky_relu=400, sigmoid=400, tanh=400, mse_loss=400,
             binary_cross_entropy=400,
             # smaller convolutions than conv2d's cases (a pooled output): ~1.3 ms a case on
             # the idle machine against conv2d's ~3.4
             conv2d_relu_max_pool2d=300)
# At most this many distinct failures are shrunk and reported per op in one run.
MAX_FAILURES = 3


# ---- shrinking -------------------------------------------------------------------------------

SHAPE_KEYS = ("shape", "lead", "spatial")


def smaller_ints(v):
    if v > 0:
        cands = [0, 1, v // 2, v - 1]
    else:
        cands = [0, -((-v) // 2), v + 1]
    return [c for c in dict.fromkeys(cands) if abs(c) < abs(v)]


def variants(params):
    """Simpler variants of params, simplest moves first."""
    def at(obj, path, value):
        obj = copy.deepcopy(obj)
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, tuple):
            raise AssertionError("tuples are replaced whole")
        parent[path[-1]] = value
        return obj

    out = []
    if params["dtype"] == "float32" and not params.get("as_float64"):
        out.append(dict(params, dtype="float64"))
    # per tensor: no special values, contiguous, plain values
    for key, value in params.items():
        if isinstance(value, dict) and "layout" in value:
            if value["specials"]:
                out.append(at(params, (key, "specials"), ()))
                if len(value["specials"]) > 1:
                    for s in value["specials"]:
                        out.append(at(params, (key, "specials"),
                                      tuple(x for x in value["specials"] if x != s)))
            if value["layout"] != "contiguous":
                out.append(at(params, (key, "layout"), "contiguous"))
            if value["values"] not in ("normal", "probability", "classes"):
                out.append(at(params, (key, "values"), "normal"))
    # sizes and options: fewer dims, smaller ints, False flags, no broadcast
    for key, value in params.items():
        if key in SHAPE_KEYS and isinstance(value, tuple):
            for i in range(len(value)):
                out.append(dict(params, **{key: value[:i] + value[i + 1:]}))
        if isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in value):
            for i, v in enumerate(value):
                for c in smaller_ints(v):
                    out.append(dict(params, **{key: value[:i] + (c,) + value[i + 1:]}))
        elif isinstance(value, bool):
            if value:
                out.append(dict(params, **{key: False}))
        elif isinstance(value, int):
            for c in smaller_ints(value):
                out.append(dict(params, **{key: c}))
        elif key == "broadcast" and value is not None:
            out.append(dict(params, broadcast=None))
    return out


def shrink(op, params, seed, signature, budget=400):
    """The simplest params found (within `budget` checks) that fail with the same signature."""
    best, checks, steps = params, 0, 0
    progress = True
    while progress and checks < budget:
        progress = False
        for cand in variants(best):
            try:
                case = build(op, cand, seed)
            except fuzz_configs.Illegal:
                continue
            checks += 1
            f = failure(case)
            if f is not None and f.signature == signature:
                best, steps, progress = cand, steps + 1, True
                break
            if checks >= budget:
                break
    return best, steps


def report(op, seed, params, f, shrunk, steps):
    case = build(op, shrunk, seed)
    f2 = failure(case) or f
    tensors = "\n".join(f"      {k}: {v}" for k, v in fuzz_configs.describe(case).items())
    kwargs = {k: v for k, v in case.kwargs.items()
              if not isinstance(v, fuzz_configs.TensorSpec)}
    message = str(f2)
    if len(message) > 1500:
        message = message[:1500] + " ..."
    return (
        f"fuzz failure: {op}, case seed {seed}\n"
        f"  check: {f2.stage}\n"
        f"  replay: PYENGINE_FUZZ_SEED={seed} PYENGINE_FUZZ_OP={op} "
        f"python -m pytest -q tests/test_fuzz.py\n"
        f"  shrunk in {steps} steps to: {case.op}({case.params['dtype']}) {kwargs}\n{tensors}\n"
        f"  regression test: check(build({op!r}, {pprint.pformat(shrunk, width=90)}, "
        f"seed={seed}))\n"
        f"  error: {message}\n")


# ---- known bugs -------------------------------------------------------------------------------
# pyengine bugs the fuzz lane still meets. A failure of one of `stages` in a case `applies` picks
# out is counted (the summary line shows it), not reported: each has a regression test marked
# xfail(strict=True) below, which fails as soon as the bug is fixed; then delete the entry here.

KNOWN_BUGS = []  # dict(op=, applies=case -> bool, stages=(...), test=regression test name)


def known_bug(case, f):
    return any(b["op"] == case.op and f.stage in b["stages"] and b["applies"](case)
               for b in KNOWN_BUGS)


# ---- the runs ----------------------------------------------------------------------------------

def env_int(name):
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def case_seeds(base_seed):
    rng = random.Random(base_seed)
    while True:
        yield rng.getrandbits(31)


@pytest.mark.parametrize("op", list(fuzz_configs.OPS))
def test_fuzz(op):
    only = os.environ.get("PYENGINE_FUZZ_OP", "").strip()
    if only and op != only:
        pytest.skip(f"PYENGINE_FUZZ_OP={only}")
    replay, seconds = env_int("PYENGINE_FUZZ_SEED"), env_int("PYENGINE_FUZZ_SECONDS")
    cases = env_int("PYENGINE_FUZZ_CASES") or (None if seconds else CASES[op])
    base_seed = torch.initial_seed()  # conftest.py: a function of the test id, or fresh
    seeds = iter([replay]) if replay is not None else case_seeds(base_seed)
    start, ran, known, failures = time.perf_counter(), 0, 0, []
    for seed in seeds:
        if cases is not None and ran >= cases:
            break
        if seconds is not None and time.perf_counter() - start > seconds:
            break
        params = draw(op, random.Random(seed))
        ran += 1
        case = build(op, params, seed)
        f = failure(case)
        if f is not None and known_bug(case, f):
            known += 1
        elif f is not None:
            shrunk, steps = shrink(op, params, seed, f.signature)
            failures.append(report(op, seed, params, f, shrunk, steps))
            if len(failures) >= MAX_FAILURES or seconds is None:
                break
    elapsed = time.perf_counter() - start
    if seconds is not None or replay is not None:
        print(f"\nfuzz {op:>20}: {ran} cases in {elapsed:.1f} s, {len(failures)} failed, "
              f"{known} met a known bug (base seed {base_seed})")
    assert not failures, "\n" + "\n".join(failures)


# ---- regression tests: cases the fuzz lane found -----------------------------------------------

def test_regression_pool_window_without_input_gets_no_gradient():
    # width 2, kernel 2 dilated by 3 with padding 1: taps at columns -1 and 2, neither inside;
    # torch's index of row 0's window is 0 * 2 + 2, input[0, 0, 1, 0]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    out, idx = PF.max_pool2d(x, (1, 2), stride=1, padding=(0, 1), dilation=(1, 3),
                             return_indices=True)
    assert torch.equal(out, torch.full((1, 1, 2, 1), float("-inf")))
    assert idx.flatten().tolist() == [2, 4]  # torch's indices
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_regression_pool_window_without_input_gets_no_gradient_wide_padding():
    # fuzz seed 486819077, shrunk: every window of a width-1 input has its 4 taps in the padding
    check(build("max_pool2d", {
        "batch": 1, "channels": 1, "height": 2, "width": 1, "kernel": (1, 4), "stride": (1, 1),
        "padding": (0, 5), "dilation": (1, 3), "ceil_mode": False, "return_indices": False,
        "scalar_args": False, "scale": 0, "dtype": "float64", "direct_backward": False,
        "input": {"layout": "contiguous", "values": "normal", "specials": ()}}, seed=486819077))


def test_regression_fused_near_tie_follows_pyengines_choice():
    # fuzz seed 16434: integer input and weight plus a float32 bias make two elements of a pool
    # window equal up to rounding, which pyengine's convolution and torch's round differently:
    # pyengine pools the other one, and its gradient goes there (differential.FusedReference)
    check(build("conv2d_relu_max_pool2d", {
        "dtype": "float32", "batch": None, "groups": 1, "in_per_group": 3, "out_per_group": 2,
        "height": 5, "width": 6, "kernel": (3, 2), "stride": (1, 3), "padding": (2, 1),
        "dilation": (1, 1), "bias": True, "scale": 0, "scalar_args": True,
        "input": {"layout": "contiguous", "values": "ties", "specials": ()},
        "weight": {"layout": "contiguous", "values": "ties", "specials": ()},
        "bias_tensor": {"layout": "contiguous", "values": "normal", "specials": ()},
        "frozen": (), "pool_kernel": (3, 3), "pool_stride": None, "pool_padding": (1, 1),
        "pool_dilation": (1, 1), "pool_ceil_mode": True, "direct_backward": True}, seed=16434))


def test_regression_fused_exact_tie_in_torch_broken_by_pyengines_rounding():
    # fuzz seed 1283376314 (fresh seeds, shrunk): tied weights make two elements of a window
    # exactly equal in torch's convolution and not in pyengine's, which pools its larger one
    # (differential.FusedReference follows pyengine there); exact ties of pyengine's own still
    # follow torch's first index
    check(build("conv2d_relu_max_pool2d", {
        "batch": None, "bias": True, "dilation": (1, 1), "direct_backward": False,
        "dtype": "float32", "frozen": (), "groups": 2, "height": 6, "in_per_group": 2,
        "kernel": (1, 2), "out_per_group": 1, "padding": "same", "pool_ceil_mode": False,
        "pool_dilation": (1, 1), "pool_kernel": (1, 2), "pool_padding": (0, 0),
        "pool_stride": (1, 1), "scalar_args": False, "scale": 0, "stride": (1, 1), "width": 5,
        "input": {"layout": "expanded", "specials": (), "values": "normal"},
        "weight": {"layout": "contiguous", "specials": (), "values": "ties"},
        "bias_tensor": {"layout": "contiguous", "specials": (), "values": "normal"}},
        seed=1283376314))


def test_regression_conv_padding_times_infinite_weight_is_nan():
    # fuzz seeds 596370933 and 1297712047 shrunk to this: every tap of the border pixels is padding
    w = torch.full((1, 1, 1, 1), float("inf"))
    for batch in (15, 16):  # the im2col path, then the batch-innermost one
        x = torch.ones(batch, 1, 1, 1)
        out = PF.conv2d(x, w, padding=1)
        helpers.assert_close(out, F.conv2d(x, w, padding=1))
