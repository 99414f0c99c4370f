"""The networks of the classic PyTorch tutorials, assembled from pyengine's layers.

Every model takes backend="pyengine" (default) or backend="torch": the same architecture built
from pyengine.nn or from torch.nn. pyengine.nn modules subclass their torch.nn twins, so both
variants have the same parameter names and, from the same seed, the same initial weights: that is
how the tests and the training job compare pyengine with torch.
"""
import torch

from . import functional as F
from . import nn as pnn
from ._nn import conv_relu_pool

BACKENDS = ("pyengine", "torch")


def layers(backend: str):
    """The module namespace of a backend: pyengine.nn or torch.nn."""
    if backend == "pyengine":
        return pnn
    if backend == "torch":
        return torch.nn
    raise ValueError(f"expected backend to be one of {BACKENDS}, but got backend={backend!r}")


class LeNet(torch.nn.Module):
    """LeNet-5 of the "Neural Networks" tutorial: 1x32x32 input, conv 1->6 5x5, max-pool 2,
    conv 6->16 5x5, max-pool 2, fully connected 400->120->84->num_classes, relu between."""

    def __init__(self, num_classes: int = 10, backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pool(relu(conv(x))): with pyengine's layers, one fused operator per block
        x = conv_relu_pool(self.conv1, self.relu, self.pool, x)
        x = conv_relu_pool(self.conv2, self.relu, self.pool, x)
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class HandmadeLinear(torch.nn.Module):
    """The tutorial's hand-made linear layer: weight w of shape (in, out), bias b, y = x.mm(w) + b.
    The pyengine backend computes the same product with pyengine's linear (w.t() is a view)."""

    def __init__(self, in_features: int, out_features: int, backend: str = "pyengine"):
        super().__init__()
        layers(backend)  # validates the name
        self.backend = backend
        self.w = torch.nn.Parameter(torch.randn(in_features, out_features))
        self.b = torch.nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return x.mm(self.w) + self.b
        return F.linear(x, self.w.t(), self.b)


class Perceptron(torch.nn.Module):
    """Two hand-made linear layers with a sigmoid between, e.g. Perceptron(3, 4, 1)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int,
                 backend: str = "pyengine"):
        super().__init__()
        self.layer1 = HandmadeLinear(in_features, hidden_features, backend)
        self.layer2 = HandmadeLinear(hidden_features, out_features, backend)
        self.sigmoid = layers(backend).Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.sigmoid(self.layer1(x)))


def mlp_sequential(backend: str = "pyengine") -> torch.nn.Sequential:
    """The tutorial's Sequential MLP: Linear 10->20, ReLU, Linear 20->30, Tanh."""
    nn = layers(backend)
    return torch.nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.Tanh())


class MLPModuleList(torch.nn.Module):
    """The same MLP held in a ModuleList and applied in a loop."""

    def __init__(self, backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.layers = torch.nn.ModuleList(
            [nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.Tanh()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MLP(torch.nn.Module):
    """784 -> 256 -> 10 with relu, on flattened 28x28 images."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10,
                 backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class SubNet(torch.nn.Module):
    """One branch of the two-branch net: conv 3->16 3x3 padding 1, relu, max-pool 2."""

    def __init__(self, backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


class TwoBranchNet(torch.nn.Module):
    """Two SubNets on the same 3xHxW input, concatenated on channels, then a Linear classifier."""

    def __init__(self, image_size: int = 32, num_classes: int = 10, backend: str = "pyengine"):
        super().__init__()
        self.branch1 = SubNet(backend)
        self.branch2 = SubNet(backend)
        self.classifier = layers(backend).Linear(32 * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return self.classifier(torch.flatten(features, 1))


class RNNClassifier(torch.nn.Module):
    """An Elman RNN (tanh, batch_first) whose last hidden state feeds a Linear head. The pyengine
    backend's RNN is pyengine.nn.RNN: torch.nn.RNN's parameters, pyengine's linear and tanh."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.rnn = nn.RNN(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1, :])


class LinearRegression(torch.nn.Module):
    """y = w x + b: Linear(1, 1)."""

    def __init__(self, backend: str = "pyengine"):
        super().__init__()
        self.linear = layers(backend).Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class BinaryClassifier(torch.nn.Module):
    """Linear(5,8) -> ReLU -> Linear(8,4) -> ReLU -> Linear(4,1) -> Sigmoid, trained with BCE.
    mixed=True is the tutorial's variant whose first hidden layer goes through relu and tanh
    and adds the two."""

    def __init__(self, in_features: int = 5, mixed: bool = False, backend: str = "pyengine"):
        super().__init__()
        nn = layers(backend)
        self.mixed = mixed
        self.fc1 = nn.Linear(in_features, 8)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(4, 1)
        self.relu = nn.ReLU()
        self.tanh = nn.Tanh()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.relu(h) + self.tanh(h) if self.mixed else self.relu(h)
        h = self.relu(self.fc2(h))
        return self.sigmoid(self.fc3(h))
