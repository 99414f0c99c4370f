"""The CPU block cache (csrc/cpu/allocator.h): a large output's memory is reused by the next
output of its size instead of being faulted in again; PYENGINE_CPU_CACHE_MB bounds it (0 turns
it off, a bad value fails the import with the variable named); pyengine.empty_cache() gives the
blocks back. Results never depend on it."""
import os
import subprocess
import sys

import torch

import pyengine

LARGE = (64, 6, 28, 28)  # 1.2 MB of float32: above the 256 KB the cache starts at


def test_a_freed_output_is_reused_by_the_next_of_its_size():
    # From an empty cache: blocks of this size that earlier tests in the process left there
    # could otherwise serve the second call instead of y's.
    pyengine.empty_cache()
    x = torch.randn(LARGE)
    y = pyengine.functional.relu(x)
    address = y.data_ptr()
    del y
    before = pyengine.cache_stats()
    assert before["cached_bytes"] >= x.numel() * 4
    z = pyengine.functional.relu(x)
    after = pyengine.cache_stats()
    assert z.data_ptr() == address and after["hits"] == before["hits"] + 1
    assert torch.equal(z, torch.relu(x))


def test_outputs_of_every_kind_of_kernel_come_from_it_and_are_right():
    x = torch.randn(8, 16, 30, 30, requires_grad=True)
    w = torch.randn(32, 16, 3, 3, requires_grad=True)
    for _ in range(3):  # later rounds run on reused, dirty blocks
        y = pyengine.functional.max_pool2d(pyengine.functional.conv2d(x, w, padding=1), 2)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        ref = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, w, padding=1), 2)
        rx, rw = torch.autograd.grad(ref, (x, w), g)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=2e-3)


def test_16_bit_calls_convert_into_it():
    """A bfloat16 / float16 call of a kernel that computes in float32 (common/low_precision.h)
    takes its float32 copy of the input and its 16-bit result from the cache too: from torch's
    allocator they faulted their pages in on every call (~550 faults a LeNet bf16 step)."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(LARGE).to(dtype)  # 2.4 MB in float32, 1.2 MB in 16 bits: both cached
        # softmax: on float32 copies on every CPU (the activations read bfloat16 themselves)
        y = pyengine.functional.softmax(x, dim=0)
        del y
        before = pyengine.cache_stats()
        y = pyengine.functional.softmax(x, dim=0)
        after = pyengine.cache_stats()
        # the float32 copy of x, the float32 result, the 16-bit result
        assert after["hits"] - before["hits"] == 3, (dtype, before, after)
        assert y.dtype == dtype
        assert torch.equal(y, pyengine.functional.softmax(x.float(), dim=0).to(dtype))


def test_empty_cache_gives_the_blocks_back():
    y = pyengine.functional.relu(torch.randn(LARGE))
    del y
    assert pyengine.cache_stats()["cached_bytes"] > 0
    pyengine.empty_cache()
    assert pyengine.cache_stats()["cached_bytes"] == 0


def _run(env_value, code):
    env = dict(os.environ, PYENGINE_CPU_CACHE_MB=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_limit_comes_from_the_environment():
    code = ("import torch, pyengine\n"
            "y = pyengine.functional.relu(torch.randn(64, 6, 28, 28)); del y\n"
            "s = pyengine.cache_stats(); print(s['limit_bytes'], s['cached_bytes'])\n")
    off = _run("0", code)
    assert off.returncode == 0, off.stderr[-2000:]
    assert off.stdout.split() == ["0", "0"]
    small = _run("3", code)
    assert small.stdout.split()[0] == str(3 << 20)
    bad = _run("lots", code)
    assert bad.returncode != 0 and "PYENGINE_CPU_CACHE_MB" in bad.stderr \
        and "'lots'" in bad.stderr


def test_a_full_cache_gives_back_its_oldest_blocks_for_new_ones():
    """A working set the process has left must not keep the current one out of the cache: under
    a 4 MB limit, blocks of 1, 1.5 and 2 MB are freed in that order; the 2 MB one is cached by
    giving the 1 MB one back (the oldest), so a 1 MB request misses and a 2 MB one hits."""
    code = ("import torch, pyengine\n"
            "relu = pyengine.functional.relu\n"
            "inputs = {mb: torch.randn(int(mb * 2**18)) for mb in (1, 1.5, 2)}\n"
            "for mb in (1, 1.5, 2):\n"
            "    y = relu(inputs[mb]); del y\n"
            "s = pyengine.cache_stats(); print(s['cached_bytes'])\n"
            "for mb in (1, 2):\n"
            "    before = pyengine.cache_stats()\n"
            "    y = relu(inputs[mb])\n"
            "    after = pyengine.cache_stats()\n"
            "    print(after['hits'] - before['hits'], after['misses'] - before['misses'])\n")
    out = _run("4", code)
    assert out.returncode == 0, out.stderr[-2000:]
    cached, one_mb, two_mb = out.stdout.strip().splitlines()
    assert int(cached) == int(3.5 * 2**20)   # the 1.5 and 2 MB blocks
    assert one_mb.split() == ["0", "1"]      # given back: a miss
    assert two_mb.split() == ["1", "0"]      # kept: a hit


def test_bfloat16_activations_read_and_write_bfloat16_in_place():
    """The activations convert as they load and store (cpu/loops.h): a bfloat16 call allocates
    its bfloat16 result and nothing else (no float32 copy of the input or of the result)."""
    x = torch.randn(LARGE).to(torch.bfloat16)
    for fn in (pyengine.functional.sigmoid, pyengine.functional.relu):
        y = fn(x)
        del y
        before = pyengine.cache_stats()
        y = fn(x)
        after = pyengine.cache_stats()
        assert after["hits"] - before["hits"] == 1 and after["misses"] == before["misses"], (
            fn, before, after)
        assert y.dtype == torch.bfloat16
