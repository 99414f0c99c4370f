"""The suite's networks in JAX: the `jax` contender of benchmarks/suite.py (CPU only).

LeNet, the MLP and the binary classifier of pyengine/models.py, written with jax.lax and jnp,
taking their weights from the torch model the suite built for the case (same seed, so every
contender starts from the same weights) and the case's batch, each copied once into JAX arrays:

- `Inference`: the jitted forward pass;
- `TrainStep`: one jitted function doing the forward pass, the MSE loss (the suite's), its
  gradient and the plain SGD update; the parameters are donated to it and the updated ones
  replace them, so the step's state advances call after call like the torch contenders'.

Both block until their result is ready: a timed call includes the computation, not only its
dispatch. The first call compiles; the suite makes it before timing anything.

Everything is fp32: the arrays are float32 whatever jax_enable_x64 says, and every convolution
and matrix product asks for lax.Precision.HIGHEST. On a CPU that is what XLA does by default
anyway; naming it pins the contender to plain fp32 (no TF32 or bf16 passes, as some backends
take at the default precision), the arithmetic pyengine's kernels and the suite's torch (TF32
off) do. It is set per operation rather than through jax.config's jax_default_matmul_precision
so that importing this module changes nothing for other JAX code.
"""
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from pyengine.models import MLP, BinaryClassifier, LeNet

Params = Dict[str, jax.Array]
PRECISION = lax.Precision.HIGHEST
# The contender runs on the CPU even where JAX also has a GPU (its default device then): the
# arrays are committed to it, and jit runs where its arguments are.
CPU = jax.devices("cpu")[0]


def to_jax(t: torch.Tensor, name: str) -> jax.Array:
    """A float32 copy of t as a JAX array on the CPU. A copy, never a view: the train step
    donates (reuses) its parameters' buffers, which must not be torch's."""
    if t.dtype != torch.float32:
        raise ValueError(f"the jax contender runs in fp32: expected {name} to be float32, but "
                         f"got {t.dtype}")
    return jax.device_put(np.array(t.detach().cpu().numpy(), copy=True), CPU)


def params_of(model: torch.nn.Module) -> Params:
    """The model's parameters as JAX arrays, under torch's names (conv1.weight, ...)."""
    return {name: to_jax(p, name) for name, p in model.named_parameters()}


# ---- layers -------------------------------------------------------------------------------

def linear(p: Params, name: str, x: jax.Array) -> jax.Array:
    """torch.nn.Linear: x W^T + b, W of shape (out, in)."""
    return jnp.matmul(x, p[f"{name}.weight"].T, precision=PRECISION) + p[f"{name}.bias"]


def conv2d(p: Params, name: str, x: jax.Array) -> jax.Array:
    """torch.nn.Conv2d with stride 1 and no padding (LeNet's), NCHW input, OIHW weight."""
    out = lax.conv_general_dilated(x, p[f"{name}.weight"], window_strides=(1, 1),
                                   padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                   precision=PRECISION)
    return out + p[f"{name}.bias"][None, :, None, None]


def max_pool2d(x: jax.Array, k: int) -> jax.Array:
    """torch.nn.MaxPool2d(k): k x k windows with stride k over NCHW, no padding."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")


# ---- the networks (pyengine/models.py) ----------------------------------------------------

def lenet(p: Params, x: jax.Array) -> jax.Array:
    x = max_pool2d(jax.nn.relu(conv2d(p, "conv1", x)), 2)
    x = max_pool2d(jax.nn.relu(conv2d(p, "conv2", x)), 2)
    x = x.reshape(x.shape[0], -1)  # NCHW flattened like torch.flatten(x, 1)
    x = jax.nn.relu(linear(p, "fc1", x))
    x = jax.nn.relu(linear(p, "fc2", x))
    return linear(p, "fc3", x)


def mlp(p: Params, x: jax.Array) -> jax.Array:
    return linear(p, "fc2", jax.nn.relu(linear(p, "fc1", x.reshape(x.shape[0], -1))))


def binary_classifier(p: Params, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(linear(p, "fc1", x))
    h = jax.nn.relu(linear(p, "fc2", h))
    return jax.nn.sigmoid(linear(p, "fc3", h))


def forward_of(model: torch.nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
    """The JAX forward pass of a model of pyengine/models.py that has one here."""
    if isinstance(model, LeNet):
        return lenet
    if isinstance(model, MLP):
        return mlp
    if isinstance(model, BinaryClassifier) and not model.mixed:
        return binary_classifier
    raise ValueError(f"the jax contender has no JAX version of {model!r}; it has LeNet, MLP and "
                     "BinaryClassifier(mixed=False)")


def mse_loss(out: jax.Array, target: jax.Array) -> jax.Array:
    """torch.nn.MSELoss() (reduction "mean"): the suite's loss."""
    return jnp.mean(jnp.square(out - target))


# ---- the timed calls ----------------------------------------------------------------------

class Inference:
    """The jitted forward pass of `model` (its weights as they are now) on the batch x."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor):
        self.params, self.x = params_of(model), to_jax(x, "x")
        self._forward = jax.jit(forward_of(model))

    def __call__(self) -> jax.Array:
        return self._forward(self.params, self.x).block_until_ready()


class TrainStep:
    """One SGD step of `model` (forward, MSE loss against y, gradient, p -= lr * grad) per call,
    jitted as one function; `params` holds the state after the last call."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float):
        self.params = params_of(model)
        self.x, self.y = to_jax(x, "x"), to_jax(y, "y")
        forward = forward_of(model)

        def step(params: Params, x: jax.Array, y: jax.Array) -> Tuple[Params, jax.Array]:
            loss, grads = jax.value_and_grad(lambda p: mse_loss(forward(p, x), y))(params)
            return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss

        # The old parameters are dead after the step: donating them lets XLA update in place.
        self._step = jax.jit(step, donate_argnums=0)

    def __call__(self) -> jax.Array:
        self.params, loss = self._step(self.params, self.x, self.y)
        jax.block_until_ready(self.params)
        return loss.block_until_ready()
