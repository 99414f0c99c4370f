"""Handwritten-digit data for the training job: scikit-learn's bundled digits (no download), or
MNIST from IDX files the user already has."""
import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from ._optional import require

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08
NUM_CLASSES = 10  # the digits 0..9; the models' output size
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


class DataError(ValueError):
    """The data files are malformed or do not fit together; the message says which file and how."""


@dataclass
class DigitSplits:
    train_images: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST's format), gzipped or not, into a uint8 array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc})") from exc
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or ndim == 0:
        raise DataError(f"{path}: expected an IDX file of unsigned bytes (magic 0x0000 08 nn), "
                        f"but got magic {data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: the header of {ndim} dimensions needs {header} bytes but the "
                        f"file holds {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count:
        raise DataError(f"{path}: header says shape {shape} ({count} bytes) but the file holds "
                        f"{len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"--data {folder}: no {stem}[.gz] there (MNIST's IDX files: "
                            f"{', '.join(MNIST_FILES)})")


def _images(array: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [0, 1], zero-padded (MNIST 28 -> 32, as
    LeNet-5 was fed) or resized when the sizes differ otherwise."""
    x = torch.from_numpy(array.astype(np.float32) / 255.0).unsqueeze(1)
    h, w = x.shape[-2:]
    if h == w == size:
        return x
    if h == w < size and (size - h) % 2 == 0:
        pad = (size - h) // 2
        return torch.nn.functional.pad(x, [pad, pad, pad, pad])
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                           align_corners=False)


def load_mnist(folder: str, size: int = 32) -> DigitSplits:
    """MNIST from its four IDX files in `folder` (gzipped or not). A missing folder or file raises
    FileNotFoundError (NotADirectoryError for a file), malformed contents DataError."""
    if not os.path.exists(folder):
        raise FileNotFoundError(f"--data {folder}: no such folder")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"--data {folder}: a file, not a folder; give the folder that "
                                 f"holds MNIST's four IDX files ({', '.join(MNIST_FILES)})")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"--data {folder}: {prefix} images {images.shape} and labels "
                            f"{labels.shape} do not pair up (expected (N, H, W) and (N,))")
        if len(labels) == 0 or 0 in images.shape[1:]:
            raise DataError(f"--data {folder}: {images_path} holds no images (shape "
                            f"{images.shape})")
        if labels.max() >= NUM_CLASSES:
            raise DataError(f"{labels_path}: labels must be digits 0..{NUM_CLASSES - 1}, but "
                            f"found {labels.max()}")
        parts[split] = (_images(images, size), torch.from_numpy(labels.astype(np.int64)))
    return DigitSplits(*parts["train"], *parts["test"], source=f"MNIST IDX files in {folder}")


def load_digits(size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> DigitSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16), scaled to [0, 1] and upscaled to
    size x size, with a fixed held-out test split (the same for every run)."""
    datasets = require("sklearn.datasets", "scikit-learn", "the bundled handwritten digits")
    digits = datasets.load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                        align_corners=False)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return DigitSplits(x[train], y[train], x[test], y[test],
                       source=f"scikit-learn digits (8x8 upscaled to {size}x{size})")


def normalize(splits: DigitSplits) -> Tuple[float, float]:
    """Standardises both splits in place with the training set's mean and std; returns them."""
    mean = splits.train_images.mean().item()
    std = splits.train_images.std().item() if splits.train_images.numel() > 1 else 0.0
    if not std > 0:
        raise DataError(f"every pixel of the {len(splits.train_labels)} training images is "
                        f"{mean:g}: there is nothing to learn from")
    for name in ("train_images", "test_images"):
        setattr(splits, name, (getattr(splits, name) - mean) / std)
    return mean, std
