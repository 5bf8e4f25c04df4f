"""Tests for bscompress.data and the bundled Fashion-MNIST demo model/subset."""

from __future__ import annotations

import gzip
import importlib
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from bscompress import demo
from bscompress.core.errors import BadInput
from bscompress.data import (
    DEMO_DATA_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    evaluate,
    load_fashion_mnist,
    make_loader,
    read_idx,
    write_idx,
)


def _idx_bytes(type_code: int, dims: tuple[int, ...], body: bytes) -> bytes:
    """IDX file bytes written by hand: magic 0x0000, type code, ndim, big-endian dims, body."""
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


# A 2x3x4 uint8 array with distinct values, as nested lists (the oracle).
_U8 = [[[(i * 12 + j * 4 + k) * 7 % 256 for k in range(4)] for j in range(3)] for i in range(2)]
_U8_BODY = bytes(v for plane in _U8 for row in plane for v in row)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_round_trip(tmp_path: Path, gz: bool) -> None:
    data = _idx_bytes(0x08, (2, 3, 4), _U8_BODY)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    t = read_idx(path)
    assert t.dtype == torch.uint8
    assert t.shape == (2, 3, 4)
    assert t.tolist() == _U8


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = [1, -2, 70000, -(2**31)]
    path = tmp_path / "b.idx"
    path.write_bytes(_idx_bytes(0x0C, (4,), struct.pack(">4i", *values)))
    t = read_idx(path)
    assert t.dtype == torch.int32
    assert t.tolist() == values


def test_write_idx_matches_hand_written_bytes(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "c.idx.gz", torch.tensor(_U8, dtype=torch.uint8))
    assert gzip.decompress(path.read_bytes()) == _idx_bytes(0x08, (2, 3, 4), _U8_BODY)
    labels = torch.tensor([3, 1, 4], dtype=torch.int32)
    path = write_idx(tmp_path / "d.idx", labels)
    assert path.read_bytes() == _idx_bytes(0x0C, (3,), struct.pack(">3i", 3, 1, 4))


def test_read_idx_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "trunc-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(0x08, (2, 3, 4), _U8_BODY[:-5])))
    with pytest.raises(ValueError, match="truncated") as info:
        read_idx(path)
    assert "trunc-idx3-ubyte.gz" in str(info.value)


def test_read_idx_truncated_header_and_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))  # declares 3 dims, holds 1
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path = tmp_path / "magic.idx"
    path.write_bytes(b"\x1f\x8b\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path = tmp_path / "extra.idx"
    path.write_bytes(_idx_bytes(0x08, (2,), b"\x01\x02\x03"))
    with pytest.raises(ValueError, match="extra"):
        read_idx(path)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "fake.gz"
    path.write_bytes(_idx_bytes(0x08, (2,), b"\x01\x02"))
    with pytest.raises(ValueError, match="fake.gz"):
        read_idx(path)


def test_load_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path, "train")
    assert "train-images-idx3-ubyte" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, "validation")


def test_load_fashion_mnist_plain_files(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(0x08, (2, 3, 4), _U8_BODY))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(0x08, (2,), b"\x07\x02"))
    images, labels = load_fashion_mnist(tmp_path)
    assert images.tolist() == _U8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [7, 2]


def test_bundled_subset_loads() -> None:
    images, labels = load_fashion_mnist(DEMO_DATA_DIR, "test")
    assert images.dtype == torch.uint8
    assert images.shape == (2000, 28, 28)
    assert labels.dtype == torch.int64
    assert labels.shape == (2000,)
    assert int(labels.min()) == 0
    assert int(labels.max()) == 9
    assert len(labels.unique()) == 10
    # First labels of the official t10k split: ankle boot, pullover, trouser, trouser, shirt.
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert (DEMO_DATA_DIR / "LICENSE").read_text().count("Zalando SE") >= 1


def test_make_loader_normalises_and_batches() -> None:
    images = torch.tensor([[[0, 255], [51, 102]]] * 5, dtype=torch.uint8)  # [5, 2, 2]
    labels = torch.arange(5)
    loader = make_loader(images, labels, 2, mean=0.5, std=0.25)
    batches = list(loader)
    assert [x.shape for x, _ in batches] == [(2, 1, 2, 2), (2, 1, 2, 2), (1, 1, 2, 2)]
    x0 = batches[0][0][0, 0]
    expected = torch.tensor([[-2.0, 2.0], [-1.2, -0.4]])
    torch.testing.assert_close(x0, expected)
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2, 3, 4]

    rgb = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    x, _ = next(iter(make_loader(rgb, torch.zeros(4), 4, mean=(0.0, 0.5, 1.0), std=(1, 1, 2))))
    assert x.shape == (4, 3, 2, 2)
    assert x[:, :, 0, 0][0].tolist() == [0.0, -0.5, -0.5]
    with pytest.raises(ValueError, match="channels"):
        make_loader(rgb, torch.zeros(4), 4, mean=(0.1, 0.2), std=1.0)

    a = [y.tolist() for _, y in make_loader(images, labels, 5, 0.5, 0.25, shuffle=True, seed=3)]
    b = [y.tolist() for _, y in make_loader(images, labels, 5, 0.5, 0.25, shuffle=True, seed=3)]
    assert a == b


class _FixedLogits(nn.Module):
    """Returns the same logits ``[B, 10]`` for every sample; records its train flag."""

    def __init__(self) -> None:
        super().__init__()
        # Descending preference: class 9 first, then 8, 7, 6, 5 (the top 5), ..., 0 last.
        self.register_buffer("logits", torch.arange(10, dtype=torch.float32))
        self.modes: list[bool] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.logits.expand(x.shape[0], 10)


def test_evaluate_fixed_logits_oracle() -> None:
    # top1 hits: labels equal to 9 -> 2 of 8. top5 hits: labels in {5..9} -> 9, 9, 8, 5, 7 = 5.
    labels = torch.tensor([9, 9, 8, 5, 4, 0, 3, 7])
    images = torch.zeros(8, 4, 4, dtype=torch.uint8)
    model = _FixedLogits()
    model.train()
    result = evaluate(model, make_loader(images, labels, 3, 0.0, 1.0))
    assert result["n"] == 8
    assert result["top1"] == pytest.approx(2 / 8)
    assert result["top5"] == pytest.approx(5 / 8)
    assert model.modes == [False, False, False]  # 3 batches, all in eval mode
    assert model.grad_enabled == [False, False, False]
    assert model.training  # mode restored


def test_demo_constants_and_arch_spec() -> None:
    module_name, _, attr = demo.ARCH.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    model = factory()
    assert isinstance(model, demo.FMNISTResNet)
    out = model.eval()(torch.zeros(demo.INPUT_SHAPE))
    assert out.shape == (1, 10)
    convs3 = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels >= 16
    ]
    assert len(convs3) >= 10
    assert FASHION_MNIST_MEAN == 0.2860
    assert FASHION_MNIST_STD == 0.3530


def test_bundled_checkpoint_accuracy() -> None:
    state = torch.load(demo.CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model = demo.fmnist_resnet()
    model.load_state_dict(state, strict=True)
    images, labels = load_fashion_mnist(DEMO_DATA_DIR, "test")
    loader = make_loader(images, labels, 500, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    result = evaluate(model, loader)
    assert result["n"] == 2000
    assert result["top1"] >= 0.90


def _write_cifar_batch(path, images, labels) -> None:
    """A batch in the layout of the official CIFAR-10 python files (protocol 2, bytes keys)."""
    import pickle

    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"test", b"labels": list(labels),
                     b"data": images.reshape(len(images), -1), b"filenames": []}, fh, protocol=2)


def test_cifar10_batches_and_spec(tmp_path):
    import numpy as np

    from bscompress.data import CIFAR10_MEAN, load_cifar10, open_data_spec

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    _write_cifar_batch(folder / "test_batch", images, [3, 1, 4, 1, 5])
    x, y = load_cifar10(tmp_path, "test")
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.tolist() == [3, 1, 4, 1, 5]
    source = open_data_spec(f"cifar10:{folder}", limit=4)
    assert source.images.shape == (4, 3, 32, 32) and source.preprocessing["mean"] == list(
        CIFAR10_MEAN)
    with pytest.raises(BadInput, match="data_batch_1 is missing"):
        open_data_spec(f"cifar10:{folder}", split="train")


def test_cifar10_refuses_pickled_code(tmp_path):
    import os
    import pickle

    from bscompress.data import load_cifar10

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh, protocol=2)
    with pytest.raises(ValueError, match="is not allowed"):
        load_cifar10(tmp_path, "test")


def test_imagefolder_resize_crop_limit(tmp_path):
    from PIL import Image

    from bscompress.data import open_data_spec

    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i, size in enumerate(((40, 30), (50, 60))):
            Image.new("RGB", size, colour).save(tmp_path / cls / f"{i}.png")
    source = open_data_spec(f"imagefolder:{tmp_path}", resize=32, crop=24, mean=[0, 0, 0],
                            std=[1, 1, 1])
    assert source.images.shape == (4, 3, 24, 24)
    assert source.labels.tolist() == [0, 0, 1, 1]
    assert torch.allclose(source.images[0, 0], torch.ones(24, 24))  # red cat, unnormalised
    assert source.preprocessing["crop"] == 24
    assert len(open_data_spec(f"imagefolder:{tmp_path}", limit=3, crop=24).dataset) == 3
    with pytest.raises(BadInput, match="differ in size"):
        _ = open_data_spec(f"imagefolder:{tmp_path}").images
    with pytest.raises(BadInput, match="not a directory"):
        open_data_spec(f"imagefolder:{tmp_path / 'none'}")
    with pytest.raises(BadInput, match="apply to imagefolder"):
        open_data_spec("demo", crop=24)
