"""The command line: the main training job (digits and MNIST IDX files) and the examples."""
import gzip
import json
import re
import struct

import numpy as np
import pytest
import torch

from pyengine import cli
from pyengine.data import load_mnist, read_idx


def test_train_default_recipe_reaches_96_percent_within_a_point_of_torch(tmp_path, capsys):
    assert cli.main(["train", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ours, theirs = metrics["pyengine"]["test_accuracy"], metrics["torch"]["test_accuracy"]
    assert ours >= 0.96, out
    assert abs(ours - theirs) <= 0.01, out
    assert len(metrics["pyengine"]["epoch_losses"]) == 15
    assert metrics["largest_step_loss_difference"] < 0.05
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert "test accuracy" in out and "seconds per epoch" in out and "epoch 15/15" in out


def test_train_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--device", "--epochs", "--batch-size", "--lr", "--out"):
        assert option in text


def _write_idx(path, array, compress=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(folder, n_train=64, n_test=16):
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):  # a learnable pattern: a bar whose row is the label
            images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return folder


def test_idx_reader_and_mnist_loader(tmp_path):
    folder = _write_mnist(tmp_path)
    images = read_idx(str(folder / "t10k-images-idx3-ubyte"))
    assert images.shape == (16, 28, 28) and images.dtype == np.uint8
    splits = load_mnist(str(folder), size=32)
    assert splits.train_images.shape == (64, 1, 32, 32)
    assert splits.test_labels.shape == (16,) and splits.test_labels.dtype == torch.int64
    assert splits.train_images.max() == 1.0 and splits.train_images[:, :, :2].abs().sum() == 0
    assert load_mnist(str(folder), size=28).train_images.shape == (64, 1, 28, 28)


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned bytes"):
        read_idx(str(bad))
    short = tmp_path / "short"
    _write_idx(short, np.zeros((4, 2, 2)))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"shape \(4, 2, 2\).*13 bytes"):
        read_idx(str(short))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(str(tmp_path))


def test_train_on_idx_files(tmp_path, capsys):
    (tmp_path / "mnist").mkdir()
    folder = _write_mnist(tmp_path / "mnist")
    out_dir = tmp_path / "out"
    assert cli.main(["train", "--data", str(folder), "--epochs", "2", "--batch-size", "16",
                     "--quiet", "--out", str(out_dir), "--no-compare"]) == 0
    out = capsys.readouterr().out
    assert "MNIST IDX files" in out and "64 training and 16 held-out" in out
    assert set(json.loads((out_dir / "metrics.json").read_text())) == {"pyengine"}


def test_train_mlp_model(tmp_path, capsys):
    assert cli.main(["train", "--model", "mlp", "--epochs", "3", "--quiet", "--out",
                     str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pyengine"]["test_accuracy"] > 0.9


def test_regression_learns_the_line(capsys):
    assert cli.main(["regression", "--slope", "3", "--intercept", "-2"]) == 0
    found = re.findall(r"learned y = ([-\d.]+) x \+ ([-\d.]+)", capsys.readouterr().out)
    assert len(found) == 2  # pyengine and torch.nn
    for slope, intercept in found:
        assert abs(float(slope) - 3) < 0.05 and abs(float(intercept) + 2) < 0.1


@pytest.mark.parametrize("extra", [[], ["--mixed"], ["--loss", "quartic"]])
def test_binary_classifier_learns(extra, capsys):
    # The default 50 epochs: the quartic loss's gradient, 4 (p - y)^3, learns slowest.
    assert cli.main(["classify"] + extra) == 0
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)%",
                                               capsys.readouterr().out)]
    assert len(accuracies) == 2 and min(accuracies) > 80


def test_sharpen_writes_the_filtered_image(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    image = rng.random((12, 10, 3)).astype(np.float32)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    mpimg.imsave(src, image)
    assert cli.main(["sharpen", str(src), str(dst)]) == 0
    stored = mpimg.imread(src)[..., :3]
    result = mpimg.imread(dst)[..., :3]
    x = torch.from_numpy(np.ascontiguousarray(stored.transpose(2, 0, 1))).unsqueeze(0)
    expected = torch.nn.functional.conv2d(x, cli.sharpen_kernel(3), padding=1, groups=3)
    expected = expected.squeeze(0).clamp(0, 1).numpy().transpose(1, 2, 0)
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= 1 / 255 + 1e-6  # PNG stores 8 bits
