"""The implementation of pyengine.nn (the public module re-exports __all__ from here, so its
namespace holds only the API)."""
import torch
from torch import Tensor

from . import _functional as F
from . import _fused as fused
from ._errors import ValueAndRuntimeError

__all__ = [
    "Conv2d", "MaxPool2d", "Linear", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax",
    "LogSoftmax", "MSELoss", "BCELoss", "CrossEntropyLoss", "RNN", "Sequential", "TWINS",
]


class Conv2d(torch.nn.Conv2d):
    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            # reflect / replicate / circular: pad the input (a copy, no arithmetic), then a
            # convolution without padding, as torch.nn.Conv2d does.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            return F.conv2d(input, self.weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input: Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class Linear(torch.nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class ReLU(torch.nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class Softmax(torch.nn.Softmax):
    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class MSELoss(torch.nn.MSELoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class BCELoss(torch.nn.BCELoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight,
                                      reduction=self.reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


# torch.nn class -> its pyengine twin; convert() and the tests read this one table.
TWINS = {
    torch.nn.Conv2d: Conv2d,
    torch.nn.MaxPool2d: MaxPool2d,
    torch.nn.Linear: Linear,
    torch.nn.ReLU: ReLU,
    torch.nn.LeakyReLU: LeakyReLU,
    torch.nn.Sigmoid: Sigmoid,
    torch.nn.Tanh: Tanh,
    torch.nn.Softmax: Softmax,
    torch.nn.LogSoftmax: LogSoftmax,
    torch.nn.MSELoss: MSELoss,
    torch.nn.BCELoss: BCELoss,
    torch.nn.CrossEntropyLoss: CrossEntropyLoss,
}


class RNN(torch.nn.RNN):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act tanh or relu, with
    torch.nn.RNN's arguments, parameters and outputs. The input projection of all time steps is
    one pyengine linear; each step is one more linear and the activation.
    Not supported (raises): bidirectional, dropout between layers, packed sequences."""

    def forward(self, input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence):
            raise NotImplementedError("pyengine.nn.RNN: packed sequences are not supported; "
                                      "pass a padded tensor")
        if self.bidirectional:
            raise NotImplementedError("pyengine.nn.RNN: bidirectional=True is not supported")
        if self.dropout and self.training and self.num_layers > 1:
            raise NotImplementedError("pyengine.nn.RNN: dropout between layers is not supported "
                                      f"(dropout={self.dropout}); use dropout=0 or eval mode")
        # By name, so that under torch.fx tracing they are the parameters' Proxies.
        weights = [getattr(self, name) for name in self._flat_weights_names]
        return _elman_rnn(input, hx, weights, self.num_layers, self.hidden_size,
                          self.nonlinearity, self.batch_first)


@torch.fx.wrap
def _elman_rnn(input, hx, weights, num_layers, hidden_size, nonlinearity, batch_first):
    """RNN.forward's computation; `weights` per layer: w_ih, w_hh and, with bias, b_ih, b_hh.
    A torch.fx leaf, as torch.nn.RNN is a leaf module: its loop runs once per time step and its
    layout depends on the input's dims, which symbolic tracing does not know."""
    batched = input.dim() == 3
    if input.dim() not in (2, 3):
        raise ValueError(f"pyengine.nn.RNN: expected input to be 2-D (L, H_in) or 3-D, but "
                         f"got input of shape {list(input.shape)}")
    x = input if batched else input.unsqueeze(1 if not batch_first else 0)
    if not batch_first:
        x = x.transpose(0, 1)  # (N, L, H_in): a view; the kernels accept any strides
    n = x.shape[0]
    if hx is None:
        hx = torch.zeros(num_layers, n, hidden_size, dtype=x.dtype, device=x.device)
    elif not batched:
        hx = hx.unsqueeze(1)
    expected = (num_layers, n, hidden_size)
    if tuple(hx.shape) != expected:
        raise ValueAndRuntimeError(f"pyengine.nn.RNN: expected hx of shape "
                                   f"{list(expected)}, but got hx of shape {list(hx.shape)}")
    act = F.tanh if nonlinearity == "tanh" else F.relu
    per_layer = len(weights) // num_layers
    last_hidden = []
    for layer in range(num_layers):
        layer_weights = weights[layer * per_layer:(layer + 1) * per_layer]
        w_ih, w_hh = layer_weights[:2]
        b_ih, b_hh = layer_weights[2:] or (None, None)
        projected = F.linear(x, w_ih, b_ih)  # (N, L, H) for every step at once
        h = hx[layer]
        steps = []
        for t in range(x.shape[1]):
            h = act(projected[:, t] + F.linear(h, w_hh, b_hh))
            steps.append(h)
        x = torch.stack(steps, dim=1)
        last_hidden.append(h)
    h_n = torch.stack(last_hidden, dim=0)
    out = x if batch_first else x.transpose(0, 1)
    if not batched:
        out = out.squeeze(0 if batch_first else 1)
        h_n = h_n.squeeze(1)
    return out, h_n


TWINS[torch.nn.RNN] = RNN


# ---- Fused layers ------------------------------------------------------------------------------

def _without_hooks(*modules) -> bool:
    """Whether no hook would run around these modules' calls (a fused call makes none)."""
    from torch.nn.modules import module as torch_module
    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   or m._backward_pre_hooks for m in modules)


def _fuses_conv_relu_pool(conv, relu, pool) -> bool:
    """conv -> relu -> pool is exactly pyengine.fused.conv2d_relu_max_pool2d: pyengine's twins
    (exact classes: a subclass may override forward), zero padding, no indices returned, no
    hooks. ReLU(inplace=True) fuses too: it would overwrite only the convolution's output."""
    return (type(conv) is Conv2d and conv.padding_mode == "zeros" and type(relu) is ReLU
            and type(pool) is MaxPool2d and not pool.return_indices
            and _without_hooks(conv, relu, pool))


def _fused_conv_relu_pool(conv, pool, input: Tensor) -> Tensor:
    return fused.conv2d_relu_max_pool2d(
        input, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
        pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


def conv_relu_pool(conv, relu, pool, input: Tensor) -> Tensor:
    """pool(relu(conv(input))): one fused operator where the modules make the exact pattern, the
    three module calls otherwise (torch.nn modules, other padding modes, hooks)."""
    if not _fuses_conv_relu_pool(conv, relu, pool):
        return pool(relu(conv(input)))
    return _fused_conv_relu_pool(conv, pool, input)


class Sequential(torch.nn.Sequential):
    """torch.nn.Sequential whose runs of Conv2d, ReLU, MaxPool2d (pyengine's twins, as
    convert() makes them) run as one fused operator (conv_relu_pool); every other module is
    called as torch.nn.Sequential calls it. Its modules, state_dict and repr are torch's."""

    def forward(self, input):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            if i + 2 < len(modules) and _fuses_conv_relu_pool(*modules[i:i + 3]):
                input = _fused_conv_relu_pool(modules[i], modules[i + 2], input)
                i += 3
            else:
                input = modules[i](input)
                i += 1
        return input


TWINS[torch.nn.Sequential] = Sequential


# The modules' public home, for reprs and pickling by reference.
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = "pyengine.nn"
del _name
