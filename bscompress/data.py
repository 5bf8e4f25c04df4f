"""Dataset loading and evaluation helpers (pure library code, no CLI).

Reads the IDX format used by MNIST / Fashion-MNIST, builds normalising data loaders and
computes top-1 / top-5 accuracy of a classifier.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import numbers
import os
import pickle
import stat
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from bscompress.core.errors import BadInput, BSCompressError
from bscompress.core.stats import check_input_size, first_tensor, memory_bytes, module_dtype

__all__ = [
    "DEMO_DATA_DIR",
    "DataSource",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "evaluate",
    "load_cifar10",
    "load_fashion_mnist",
    "make_loader",
    "normalize_uint8",
    "open_data_spec",
    "read_idx",
    "write_idx",
]

#: Per-pixel mean of the Fashion-MNIST training set (60k images), pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
#: Per-pixel standard deviation of the Fashion-MNIST training set, pixels scaled to [0, 1].
FASHION_MNIST_STD = 0.3530

#: Directory holding the bundled held-out Fashion-MNIST test subset (idx ``.gz`` files).
DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo" / "data"

_SYSTEM_DATA_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type code -> (torch dtype, big-endian struct format of one element, element size in bytes)
_IDX_DTYPES: dict[int, tuple[torch.dtype, str, int]] = {
    0x08: (torch.uint8, "B", 1),
    0x09: (torch.int8, "b", 1),
    0x0B: (torch.int16, ">h", 2),
    0x0C: (torch.int32, ">i", 4),
    0x0D: (torch.float32, ">f", 4),
    0x0E: (torch.float64, ">d", 8),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Parse an IDX file (gzip-compressed if the name ends in ``.gz``, else plain).

    The IDX header is two zero bytes, a type code byte, a byte giving the number of
    dimensions ``D``, then ``D`` big-endian uint32 sizes, followed by the data in C order.

    Args:
        path: file to read.

    Returns:
        A tensor of shape ``[d0, d1, ..., d{D-1}]`` with the file's dtype (``uint8`` for
        image and label files).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not valid IDX (bad magic number, unknown type code,
            truncated header or data, trailing bytes, or not valid gzip).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"Could not read IDX file {path}: {exc}.") from exc

    if len(raw) < 4:
        raise ValueError(
            f"IDX file {path} is truncated: {len(raw)} bytes, too short for the 4-byte "
            "magic number."
        )
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"File {path} is not a valid IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000 followed by a known type code and a non-zero number of dimensions)."
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"IDX file {path} is truncated: the header declares {ndim} dimensions but the file "
            f"has only {len(raw)} bytes."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype, fmt, itemsize = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    expected = header_len + count * itemsize
    if len(raw) < expected:
        raise ValueError(
            f"IDX file {path} is truncated: shape {tuple(dims)} needs {expected} bytes but the "
            f"file has {len(raw)}."
        )
    if len(raw) > expected:
        raise ValueError(
            f"IDX file {path} is malformed: shape {tuple(dims)} needs {expected} bytes but the "
            f"file has {len(raw) - expected} extra trailing bytes."
        )
    payload = bytearray(raw[header_len:expected])
    if itemsize == 1:
        flat = torch.frombuffer(payload, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    else:
        # Multi-byte elements are big-endian; unpack them portably.
        flat = torch.tensor(struct.unpack(f">{count}{fmt[-1]}", payload), dtype=dtype)
    return flat.reshape(dims).clone()


def write_idx(path: str | Path, tensor: torch.Tensor) -> Path:
    """Write ``tensor`` (any shape ``[d0, ..., d{D-1}]``, ``D >= 1``) as an IDX file.

    The file is gzip-compressed (with a zero timestamp, so the bytes are reproducible) when
    ``path`` ends in ``.gz``. Supported dtypes: ``uint8``, ``int8``, ``int16``, ``int32``,
    ``float32``, ``float64``. Returns the path written.
    """
    path = Path(path)
    codes = {dt: (code, fmt) for code, (dt, fmt, _) in _IDX_DTYPES.items()}
    if tensor.dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {tensor.dtype}.")
    if tensor.dim() == 0 or tensor.dim() > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {tensor.dim()}.")
    code, fmt = codes[tensor.dtype]
    t = tensor.detach().cpu().contiguous()
    header = bytes([0, 0, code, t.dim()]) + struct.pack(f">{t.dim()}I", *t.shape)
    if t.element_size() == 1:
        body = t.numpy().tobytes()
    else:
        body = struct.pack(f">{t.numel()}{fmt[-1]}", *t.flatten().tolist())
    data = header + body
    if path.suffix == ".gz":
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh,
        ):
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _find_idx(root: Path, stem: str) -> Path:
    """Return ``root/stem.gz`` or ``root/stem``, raising a helpful error if neither exists."""
    for name in (f"{stem}.gz", stem):
        candidate = root / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} (or uncompressed {root / stem}) not found. "
        f"`apt-get install dataset-fashion-mnist` puts the files in {_SYSTEM_DATA_DIR}; "
        f"a 2000-image test subset ships in {DEMO_DATA_DIR}."
    )


def load_fashion_mnist(root: str | Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split from IDX files in ``root``.

    Looks for ``{train,t10k}-images-idx3-ubyte(.gz)`` and ``{train,t10k}-labels-idx1-ubyte(.gz)``.

    Args:
        root: directory holding the IDX files.
        split: ``"train"`` or ``"test"`` (``"t10k"`` is accepted as an alias of ``"test"``).

    Returns:
        ``(images, labels)``: ``uint8`` images of shape ``[N, 28, 28]`` and ``int64`` labels of
        shape ``[N]`` with values in ``0..9``.

    Raises:
        FileNotFoundError: if an image or label file is missing.
        ValueError: if ``split`` is unknown or the files are malformed or inconsistent.
    """
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'.")
    root = Path(root)
    prefix = prefixes[split]
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"IDX file {images_path} should hold uint8 images of shape [N, H, W], "
            f"got {images.dtype} {tuple(images.shape)}."
        )
    if labels.dim() != 1:
        raise ValueError(
            f"IDX file {labels_path} should hold labels of shape [N], got {tuple(labels.shape)}."
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels."
        )
    return images, labels.to(torch.int64)


def _per_channel(value: float | Sequence[float], channels: int, name: str) -> torch.Tensor:
    """Broadcastable ``[1, C, 1, 1]`` float32 tensor from a scalar or a per-channel sequence."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    elif t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the images have {channels} channels.")
    return t.reshape(1, channels, 1, 1).clone()


def normalize_uint8(
    images_uint8: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
) -> torch.Tensor:
    """Scale ``uint8`` images to ``[0, 1]`` and standardise them per channel.

    Args:
        images_uint8: ``[N, H, W]`` (single channel) or ``[N, C, H, W]`` ``uint8`` tensor.
        mean: scalar or ``C`` per-channel means (of pixels scaled to ``[0, 1]``).
        std: scalar or ``C`` per-channel standard deviations.

    Returns:
        ``float32`` tensor ``[N, C, H, W]`` equal to ``(x / 255 - mean) / std``.
    """
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    if images_uint8.dim() != 4:
        raise ValueError(
            f"images must have shape [N, H, W] or [N, C, H, W], got {tuple(images_uint8.shape)}."
        )
    channels = images_uint8.shape[1]
    m = _per_channel(mean, channels, "mean")
    s = _per_channel(std, channels, "std")
    if bool((s <= 0).any()):
        raise ValueError("std values must be positive.")
    return (images_uint8.to(torch.float32) / 255.0 - m) / s


def make_loader(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Build an in-memory loader of normalised float images.

    Args:
        images_uint8: ``[N, H, W]`` or ``[N, C, H, W]`` ``uint8`` images.
        labels: ``[N]`` integer class labels.
        batch_size: samples per batch.
        mean: scalar or per-channel mean used for normalisation.
        std: scalar or per-channel standard deviation used for normalisation.
        shuffle: reshuffle every epoch, with a generator seeded by ``seed``.
        seed: seed of the shuffling generator.

    Returns:
        A ``DataLoader`` yielding ``(x, y)`` with ``x`` ``float32`` ``[B, C, H, W]`` equal to
        ``(pixel / 255 - mean) / std`` (``C = 1`` for ``[N, H, W]`` input) and ``y`` ``int64``
        ``[B]``.
    """
    x = normalize_uint8(images_uint8, mean, std)
    y = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels.")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def evaluate(
    model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu"
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy of a classifier.

    The model is put in eval mode (its previous train/eval mode is restored afterwards) and run
    under ``torch.inference_mode()``.

    Args:
        model: maps ``[B, C, H, W]`` inputs to ``[B, K]`` logits (or to a tuple, list or dict
            whose first entry is the logits, e.g. ``(logits, aux)``); it must already be on
            ``device``.
        loader: yields ``(x, y)`` with ``x`` ``[B, C, H, W]`` and ``y`` ``[B]`` class indices
            (a ``DataSource.loader`` names its spec in the errors).
        device: device the batches are moved to.

    Returns:
        ``{"top1": float, "top5": float, "n": int}``; accuracies are fractions in ``[0, 1]``.
        With fewer than 5 classes, top-5 counts every sample as correct.

    Raises:
        BadInput: the model does not run on the first batch (the data do not fit it: channels,
            image size), returns no tensor, returns outputs that are not ``[B, K]`` logits, or
            the data hold a label outside ``0..K-1``.
    """
    spec = getattr(loader, "spec", None)
    where = f"--data {spec}" if spec else "the data"
    was_training = model.training
    model.eval()
    correct1 = 0
    correct5 = 0
    n = 0
    try:
        dtype = module_dtype(model)
        with torch.inference_mode():
            for x, y in loader:
                x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
                y = y.to(device)
                if n == 0:  # the first batch: do the data fit the model at all?
                    try:
                        out = model(x)
                    except BSCompressError:
                        raise
                    except Exception as err:
                        raise BadInput(
                            f"the model does not run on {where}, batches of shape "
                            f"{list(x.shape)} ({_first_line(err)}): use data with the "
                            "channels and image size the model was trained on (--resize/--crop "
                            "for image folders)"
                        ) from None
                else:
                    out = model(x)
                logits = _logits(out, x, where)
                k = logits.shape[1]
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
                    bad = int(y.max()) if int(y.max()) >= k else int(y.min())
                    raise BadInput(
                        f"{where} holds label {bad} but the model returns {k} logits (classes "
                        f"0..{k - 1}): use data labelled for this model's classes"
                    )
                topk = logits.topk(min(5, k), dim=1).indices  # [B, k]
                hits = topk == y.unsqueeze(1)  # [B, k]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        return {"top1": 0.0, "top5": 0.0, "n": 0}
    return {"top1": correct1 / n, "top5": correct5 / n, "n": n}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _logits(out: object, x: torch.Tensor, where: str) -> torch.Tensor:
    """The ``[B, K]`` logits in a model's output (``first_tensor``), or ``BadInput``."""
    logits = first_tensor(out)
    if logits is None:
        raise BadInput(
            f"the model returns a {type(out).__name__} without a tensor on {where}: evaluate "
            "needs a model that returns its logits (or a tuple whose first entry is the logits)"
        )
    if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] == 0:
        raise BadInput(
            f"the model returns outputs of shape {list(logits.shape)} for a batch of "
            f"{x.shape[0]} inputs of {where}: evaluate needs a classifier that returns logits "
            f"of shape [batch, classes], here [{x.shape[0]}, K]"
        )
    return logits


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches, read without running code from the pickles

#: Per-channel mean and std of the CIFAR-10 training set, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: The globals the official CIFAR-10 python batches (and NumPy arrays pickled by Python 3 at
#: protocol 2) need: the array reconstructor, the array and dtype types, and ``_codecs.encode``
#: for bytes. Nothing else can be named by a batch file, so unpickling one runs no other code.
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def _numpy_reconstruct():
    """``numpy._core.multiarray._reconstruct`` (NumPy 2), ``numpy.core…`` before."""
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except (ImportError, AttributeError):  # NumPy 1.x
        return importlib.import_module("numpy.core.multiarray")._reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: any other global is refused, so a
    tampered batch file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR batch")


def _batch_entry(batch: dict, key: str) -> Any:
    """``batch[b"key"]`` (the official files) or ``batch["key"]`` (re-pickled by Python 3)."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"it has no {key!r} entry (keys: {', '.join(map(repr, batch))})")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch: uint8 images ``[N, 3, 32, 32]``, int64 labels ``[N]``.

    Raises:
        ValueError: naming ``path``, when it cannot be read, is not a pickle (or a truncated
            one), names a global other than NumPy's array types, or is not a dict holding
            ``data`` (uint8 ``[N, 3072]``) and ``labels`` (``N`` integers in ``0..9``).
    """
    import numpy as np

    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types on bad bytes
        raise ValueError(f"{path} is not a CIFAR-10 python batch (it does not unpickle: "
                         f"{_first_line(err)})") from None
    try:
        if not isinstance(batch, dict):
            raise ValueError(f"it holds a {type(batch).__name__}, not a dict")
        data = _batch_entry(batch, "data")
        labels = _batch_entry(batch, "labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            what = (f"a {data.dtype} array of shape {list(data.shape)}"
                    if isinstance(data, np.ndarray) else f"a {type(data).__name__}")
            raise ValueError(f"its data is {what}, not uint8 images of shape [N, 3072]")
        if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != len(data) or \
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                        and 0 <= v <= 9 for v in labels):
            count = len(labels) if isinstance(labels, (list, tuple, np.ndarray)) else "no"
            raise ValueError(f"its labels are not {len(data)} integers in 0..9 (got {count} "
                             "entries)")
    except ValueError as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {err}") from None
    images = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(-1, 3, 32, 32)
    return images, torch.tensor([int(v) for v in labels], dtype=torch.int64)


def load_cifar10(root: str | Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the standard python batches (``data_batch_1..5``, ``test_batch``).

    The batches are pickles: they are read with an unpickler that admits plain containers
    and NumPy arrays only, so a tampered file cannot run code.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent.
    Returns:
        uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.
    Raises:
        FileNotFoundError / ValueError naming the file.
    """
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected the CIFAR-10 python batches)")
        x, y = _read_cifar_batch(path)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# dataset specs (the --data option)


class _SpecLoader(DataLoader):
    """A ``DataLoader`` that knows the ``--data`` spec it reads, for the messages."""

    def __init__(self, spec: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec


@dataclass
class DataSource:
    """A labelled dataset opened from a ``--data`` spec, preprocessed.

    Attributes:
        spec: the spec as given.
        dataset: yields ``(x [C, H, W] float32 normalised, y int64)``; in memory for the idx,
            CIFAR and synthetic specs, read from disk lazily for ``imagefolder``.
        preprocessing: what is applied (``mean``, ``std``, and ``resize``/``crop`` when set).
    """

    spec: str
    dataset: Dataset
    preprocessing: dict[str, Any]
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def in_memory(cls, spec: str, images: torch.Tensor, labels: torch.Tensor,
                  preprocessing: dict[str, Any]) -> DataSource:
        return cls(spec, TensorDataset(images, labels), preprocessing, (images, labels))

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches ``(x [B, C, H, W] float32, y [B] int64)``; the loader's ``spec`` names
        the data in errors (``evaluate``)."""
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return _SpecLoader(self.spec, self.dataset, batch_size=batch_size, shuffle=shuffle,
                           generator=generator, collate_fn=self._collate)

    def _collate(self, batch):
        try:
            return default_collate(batch)
        except RuntimeError as err:
            raise BadInput(f"--data {self.spec}: samples differ in size ({err}); pass --resize "
                           "and --crop") from None

    def _materialise(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            xs, ys = zip(*[(x, y) for x, y in self.loader(256)], strict=True)
            self._tensors = (torch.cat(xs), torch.cat(ys))
        return self._tensors

    @property
    def images(self) -> torch.Tensor:
        """All inputs ``[N, C, H, W]`` in memory (use ``limit`` for large folders)."""
        return self._materialise()[0]

    @property
    def labels(self) -> torch.Tensor:
        """All labels ``[N]``."""
        return self._materialise()[1]

    @property
    def classes(self) -> list[str] | None:
        """The class names of label 0, 1 … where the data names them (an image folder's
        class folders), else ``None``."""
        dataset = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        classes = getattr(dataset, "classes", None)
        return list(classes) if classes is not None else None


def _normalisation(spec: str, channels: int, mean: Sequence[float], std: Sequence[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, C, 1, 1]`` mean and std for ``channels``-channel data, or ``BadInput``: one
    value or one per channel, finite, std positive."""
    for option, values in (("--mean", mean), ("--std", std)):
        count = torch.as_tensor(values, dtype=torch.float32).numel()
        if count not in (1, channels):
            raise BadInput(f"--data {spec} has {channels}-channel images but {option} gives "
                           f"{count} values: give one value"
                           + (f" or {channels}" if channels > 1 else ""))
    m = _per_channel(mean, channels, "--mean")
    s = _per_channel(std, channels, "--std")
    if not bool(torch.isfinite(m).all() and torch.isfinite(s).all()):
        raise BadInput(f"--data {spec}: --mean/--std must be finite numbers within float32's "
                       "range (|x| < 3.4e38)")
    if bool((s <= 0).any()):
        raise BadInput(f"--data {spec}: --std values must be positive")
    return m, s


def _as_floats(value: Any, option: str) -> list[float] | None:
    """``--mean``/``--std`` as given (text, a number or a list of numbers, e.g. recorded in
    an archive) → a list of floats; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_floats(value, option)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise BadInput(f"{option} {value!r} is not a number or a list of numbers: write e.g. "
                   "0.5 or 0.485,0.456,0.406")


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` → ``[0.485, 0.456, 0.406]``; ``None`` stays ``None``. Values
    must be finite, and a standard deviation (``option`` ending in ``std``) positive."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInput(f"{option} {text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise BadInput(f"{option} {text!r} holds a value that is not a finite number")
    if option.endswith("std") and any(v <= 0 for v in values):
        raise BadInput(f"{option} {text!r}: standard deviations must be positive")
    return values


#: what an archive's preprocessing record holds, per key
_RECORDED = {"mean": "a list of finite numbers", "std": "a list of positive numbers",
             "resize": "a whole number of pixels that fits in memory",
             "crop": "a whole number of pixels that fits in memory"}


def recorded_preprocessing(spec: str, record: Any) -> dict[str, Any]:
    """``open_data_spec`` keyword arguments from preprocessing recorded in an archive
    (``mean``, ``std``, ``resize``, ``crop``); resize and crop apply to image folders only.

    Raises:
        BadInput: naming the archive's record (not an option the user gave) when it is not an
            object, or a value is not what bscompress writes there: lists of finite numbers
            (positive for ``std``), whole numbers of pixels from 1.
    """
    fix = "the archive was edited or is broken; pass --mean/--std (and --resize/--crop) yourself"
    if not isinstance(record, dict):
        raise BadInput(f"the archive records its preprocessing as a {type(record).__name__}, "
                       f"not an object of mean, std, resize and crop: {fix}")
    keys = ("mean", "std", "resize", "crop") if spec.startswith("imagefolder:") else (
        "mean", "std")
    out = {k: record[k] for k in keys if record.get(k) not in (None, [])}
    for key, value in out.items():
        if key in ("mean", "std"):
            good = (isinstance(value, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                and (key == "mean" or v > 0) for v in value))
        else:  # pixels, and one image of that side within a quarter of the memory
            good = (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                    and 3 * value * value * 4 <= memory_bytes() // 4)
        if not good:
            raise BadInput(f"the archive records preprocessing {key} = {value!r}, which is not "
                           f"{_RECORDED[key]}: {fix}")
    return out


#: Datasets held as uint8 images in memory: loader, default mean and std, an example DIR.
_UINT8_DATASETS = {
    "fashion-mnist": (load_fashion_mnist, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,),
                      _SYSTEM_DATA_DIR),
    "cifar10": (load_cifar10, CIFAR10_MEAN, CIFAR10_STD, "data/cifar-10-batches-py"),
}


def open_data_spec(
    spec: str,
    split: str = "test",
    mean: str | list[float] | None = None,
    std: str | list[float] | None = None,
    limit: int | None = None,
    seed: int = 0,
    resize: int | None = None,
    crop: int | None = None,
    channels: int | None = None,
) -> DataSource:
    """Open a dataset spec.

    Specs: ``demo`` (the bundled Fashion-MNIST subsets: 2000 test, 1024 training images),
    ``fashion-mnist:DIR`` (idx .gz files), ``cifar10:DIR`` (python batches),
    ``imagefolder:DIR`` (one sub-folder of images per class, read lazily; ``resize`` then
    centre ``crop``; ``limit`` picks a seeded random subset), ``synthetic:CxHxW:CLASSES``
    (seeded Gaussian images, random labels; ``limit`` samples, 256 by default;
    ``synthetic:CxL:CLASSES`` gives 1-D samples ``[C, L]`` for Conv1d models). Other specs
    take the first ``limit`` samples. ``mean``/``std`` default to the dataset's own
    statistics (Fashion-MNIST: 0.2860 / 0.3530; CIFAR-10 and image folders: the CIFAR-10 and
    ImageNet values; synthetic: none). ``channels``: the model's input channels, where
    known; 1 decodes an image folder to grayscale (8-bit luma, mean/std by default the
    average of ImageNet's, 0.449 / 0.226), anything else to RGB.

    The first sample is read (decoded and preprocessed) before the source is returned, so a
    broken spec fails here, before any expensive work.

    Raises:
        BadInput: unknown spec kind, missing, corrupt or empty files, bad numbers.
    """
    source = _open_spec(spec, split, mean, std, limit, seed, resize, crop, channels)
    if len(source.dataset) == 0:
        raise BadInput(f"--data {spec} holds no samples: point it at a non-empty dataset")
    try:
        source.dataset[0]
    except BSCompressError:
        raise
    except Exception as err:  # noqa: BLE001 - a transform failing on the user's data
        raise BadInput(f"--data {spec}: its first sample cannot be read and preprocessed "
                       f"({_first_line(err)})") from None
    return source


def _open_spec(spec: str, split: str, mean: str | list[float] | None,
               std: str | list[float] | None, limit: int | None, seed: int,
               resize: int | None, crop: int | None, channels: int | None) -> DataSource:
    mean_v = _as_floats(mean, "--mean")
    std_v = _as_floats(std, "--std")
    if split not in ("train", "test"):
        raise BadInput(f"--split {split!r}: use train or test")
    kind, _, arg = spec.partition(":")
    if kind == "demo" and not arg:
        kind, arg = "fashion-mnist", str(DEMO_DATA_DIR)
    if kind == "imagefolder":
        return _image_folder(spec, arg, split, mean_v, std_v, limit, seed, resize, crop,
                             gray=channels == 1)
    if resize is not None or crop is not None:
        raise BadInput(f"--resize/--crop apply to imagefolder data, not to {kind!r}")
    if kind in _UINT8_DATASETS:
        loader, default_mean, default_std, example = _UINT8_DATASETS[kind]
        if not arg:
            raise BadInput(f"--data {spec}: write {kind}:DIR, e.g. {kind}:{example}")
        try:
            images, labels = loader(arg, split)
        except (FileNotFoundError, ValueError) as err:
            raise BadInput(f"--data {spec}: {err}") from None
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        mean_v = mean_v if mean_v is not None else list(default_mean)
        std_v = std_v if std_v is not None else list(default_std)
        channels = images.shape[1] if images.dim() == 4 else 1
        _normalisation(spec, channels, mean_v, std_v)
        x = normalize_uint8(images, mean_v, std_v)
        return DataSource.in_memory(spec, x, labels, {"mean": mean_v, "std": std_v})
    if kind == "synthetic":
        shape_text, _, classes_text = arg.partition(":")
        try:
            shape = [int(s) for s in shape_text.split("x")]
            classes = int(classes_text)
        except ValueError:
            shape, classes = [], 0
        if len(shape) not in (2, 3) or min(shape) <= 0 or classes <= 0:
            raise BadInput(f"--data {spec}: write synthetic:CxHxW:CLASSES, e.g. "
                           "synthetic:3x32x32:10 (synthetic:CxL:CLASSES for 1-D inputs)")
        n = limit or 256
        try:
            check_input_size([n, *shape])
        except BadInput:
            raise BadInput(f"--data {spec}: {n} samples of {'x'.join(map(str, shape))} take "
                           f"{n * math.prod(shape) * 4 / 2**30:.1f} GiB, more than a quarter of "
                           "this machine's memory: use a smaller shape or fewer samples "
                           "(--limit, --calib-samples)") from None
        generator = torch.Generator().manual_seed(seed + (split == "train"))
        x = torch.randn((n, *shape), generator=generator)
        y = torch.randint(0, classes, (n,), generator=generator)
        given = {key: value for key, value in (("mean", mean_v), ("std", std_v))
                 if value is not None}
        if given:
            m, s = _normalisation(spec, shape[0], mean_v or [0.0], std_v or [1.0])
            per_channel = (1, shape[0], *[1] * (len(shape) - 1))  # [1, C, 1(, 1)]
            x = (x - m.view(per_channel)) / s.view(per_channel)
        return DataSource.in_memory(spec, x, y, given)
    raise BadInput(
        f"--data {spec!r}: unknown dataset kind {kind!r}; use demo, fashion-mnist:DIR, "
        "cifar10:DIR, imagefolder:DIR or synthetic:CxHxW:CLASSES"
    )


#: ImageNet statistics, the convention for image folders of natural RGB images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: their average, for image folders read as grayscale (a model of one input channel)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)


def _load_image(path: str, gray: bool = False):
    """Decode one image of an image folder to 8-bit RGB (see ``_to_rgb``), or to 8-bit
    grayscale (``L``, from that RGB: ITU-R 601 luma) with ``gray``.

    Raises:
        BadInput: naming the file, when it cannot be decoded (truncated, corrupt, not an image,
            a decompression bomb: PIL raises ``OSError``, ``SyntaxError``, ``ValueError``,
            ``struct.error``, ``zlib.error`` … depending on the format).
    """
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            image.load()
            rgb = _to_rgb(image, path)
            return rgb.convert("L") if gray else rgb
    except BSCompressError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many exception types
        raise BadInput(f"image {path} cannot be read ({_first_line(err)}): replace or "
                       "remove the file") from None


def _to_rgb(image, path: str):
    """Any PIL image as 8-bit RGB: grayscale (``1``, ``L``, ``LA``) replicated to three
    channels, palettes expanded (through RGBA when they declare transparency, to keep PIL
    quiet), alpha dropped (as torchvision does), 16-bit and 32-bit integer grayscale
    (``I;16*``, ``I``) scaled from 0..65535 to 0..255 instead of clipped."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # 16-bit PNGs open as I;16 (or I): keep their full range
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode == "F":
        raise BadInput(f"image {path} is a 32-bit floating-point image, which has no standard "
                       "pixel range: convert it to an 8-bit or 16-bit PNG or JPEG")
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _check_no_link_loop(spec: str, root: Path) -> None:
    """Refuse a folder in which a symbolic link leads back to a folder above it:
    ``ImageFolder`` follows links, and went round such a loop some 40 times, counting each
    image once per turn (2 images became 82 samples).

    Raises:
        BadInput: naming the link.
    """
    seen = set()
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise BadInput(f"--data {spec}: {folder} leads back to a folder already read (a "
                           "symbolic link loop): remove the link")
        seen.add(real)
        subfolders.sort()


def _image_folder(spec, root, split, mean, std, limit, seed, resize, crop,
                  gray: bool = False) -> DataSource:
    """An image folder (``ImageFolder`` layout), read lazily.

    Every image is decoded to 8-bit RGB whatever its mode (``_to_rgb``), so a folder mixing
    RGB, grayscale, palette, RGBA and 16-bit files yields 3-channel tensors throughout, the
    majority convention of colour data; a grayscale-only folder gives 3 equal channels too
    (as torchvision's ``ImageFolder`` always did). With ``gray`` (a model of one input
    channel) every image is decoded to one channel of luma instead. A file
    that cannot be decoded raises ``BadInput`` naming it when its batch is read (and the first
    image is decoded when the spec is opened).
    """
    from torchvision import datasets, transforms

    path = Path(root)
    if not root or not path.is_dir():
        raise BadInput(f"--data {spec}: {root or 'DIR'} is not a directory of class folders")
    if (path / split).is_dir():
        path = path / split
    for option, side in (("--resize", resize), ("--crop", crop)):
        # one image of that side (the short one, for --resize) must fit, and every sample
        # of a limited read at a centre crop: the data are held in memory for calibration
        n = limit if option == "--crop" and limit else 1
        if side is not None and 3 * side * side * 4 * n > memory_bytes() // 4:
            raise BadInput(f"--data {spec}: {option} {side} makes {n} image"
                           f"{'s' * (n != 1)} of {3 * side * side * 4 * n / 2**30:.1f} GiB of "
                           "float32, more than a quarter of this machine's memory: give the "
                           "side the model was trained at (e.g. --resize 256 --crop 224)")
    if resize is not None and crop is not None and crop > resize:
        raise BadInput(f"--data {spec}: --crop {crop} is larger than --resize {resize}, so the "
                       "crop would be padded with black: give a crop no larger than the "
                       "resized short side (e.g. --resize 256 --crop 224)")
    steps = []
    if resize is not None:
        steps.append(transforms.Resize(resize))
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    channels = 1 if gray else 3
    default_mean, default_std = ((GRAY_MEAN, GRAY_STD) if gray else (IMAGENET_MEAN, IMAGENET_STD))
    mean = list(mean) if mean is not None else list(default_mean)
    std = list(std) if std is not None else list(default_std)
    _normalisation(spec, channels, mean, std)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    _check_no_link_loop(spec, path)
    try:
        dataset = datasets.ImageFolder(str(path), transform=transforms.Compose(steps),
                                       loader=functools.partial(_load_image, gray=gray))
    except (FileNotFoundError, OSError) as err:
        raise BadInput(f"--data {spec}: {err}") from None
    used = range(len(dataset))
    if limit is not None and limit < len(dataset):
        generator = torch.Generator().manual_seed(seed)
        used = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
    for i in used:  # a FIFO or device would block its read forever (only the files read)
        file = dataset.samples[i][0]
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise BadInput(f"--data {spec}: {file} is not a regular file (a pipe, socket or "
                           "device): remove it from the folder")
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, used)
    return DataSource(spec, dataset, {"mean": mean, "std": std, "resize": resize, "crop": crop})
