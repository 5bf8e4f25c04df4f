"""Hardening of the data specs, evaluation and calibration (issue 18): every bad input ends in
exit 2 with one sentence naming what is wrong, never an internal error, and writes nothing."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.calibrate import MIN_BATCHNORM_SAMPLES, reestimate_batchnorm
from bscompress.core.errors import BadInput
from bscompress.data import _ArrayUnpickler, evaluate, open_data_spec
from bscompress.io.archive import load_model
from tests.nets import TinyNet

HERE = Path(__file__).resolve()
NETS_SPEC = f"{HERE.parent / 'nets.py'}:TinyNet"
runner = CliRunner()


# --- architectures for --arch (this file is imported by its path) ---------------------------

class TupleNet(TinyNet):
    """Returns ``(logits, aux)``."""

    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.detach() * 0


class DictNet(TinyNet):
    """Returns ``{"logits": …, "features": …}``."""

    def forward(self, x):
        return {"logits": super().forward(x), "features": x.mean()}


class NoTensorNet(TinyNet):
    def forward(self, x):
        super().forward(x)
        return "no logits here"


class SpatialNet(TinyNet):
    """Returns ``[B, K, 1, 1]`` instead of ``[B, K]``."""

    def forward(self, x):
        return super().forward(x)[:, :, None, None]


class OneChannelNet(TinyNet):
    """TinyNet on 1-channel inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)


def _spec(name: str) -> str:
    return f"{HERE}:{name}"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_sentence(result) -> str:
    """The error line; it must be an ``error:`` line (not an internal error) of one sentence."""
    text = " ".join(result.stderr.split())
    assert "internal error" not in text and "Traceback" not in text, text
    assert "error:" in text, text
    return text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(TinyNet().state_dict(), path)
    return path


# --- image folders --------------------------------------------------------------------------

def _rgb(rng, size=16):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _mixed_folder(root: Path) -> Path:
    """Two classes of 16×16 images in every mode PIL writes to PNG."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    _rgb(rng).save(root / "a" / "0_rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(
        root / "a" / "1_gray.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 2), dtype=np.uint8), "LA").save(
        root / "a" / "2_la.png")
    palette = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").convert("P")
    palette.save(root / "b" / "3_palette.png", transparency=0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(
        root / "b" / "4_rgba.png")
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(root / "b" / "5_g16.png")
    _rgb(rng).save(root / "b" / "6_rgb.png")
    return root


def test_imagefolder_mixed_modes_become_rgb(tmp_path, ckpt):
    folder = _mixed_folder(tmp_path / "mixed")
    source = open_data_spec(f"imagefolder:{folder}", mean=[0.0], std=[1.0])
    images = source.images
    assert images.shape == (7, 3, 16, 16) and source.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    gray = np.asarray(Image.open(folder / "a" / "1_gray.png"), dtype=np.float32) / 255
    assert all(torch.allclose(images[1, c], torch.from_numpy(gray)) for c in range(3))
    # 16-bit white is white (scaled from 0..65535, not clipped at 255 as 8 bits)
    assert torch.allclose(images[5], torch.ones(3, 16, 16))
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", f"imagefolder:{folder}")
    assert result.exit_code == 0, result.stderr
    assert "(7 samples)" in " ".join(result.stdout.split())  # the line wraps at long paths


def test_imagefolder_grayscale_only_is_three_channels(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
            tmp_path / "a" / f"{i}.png")
    assert open_data_spec(f"imagefolder:{tmp_path}").images.shape == (2, 3, 8, 8)


def test_imagefolder_is_read_as_grayscale_for_a_model_of_one_channel(tmp_path):
    """A 1-channel CNN (its INPUT_SHAPE, or the shape an archive records) gets its image
    folder as one channel of luma, whatever the files' modes (every command refused the
    folder before: it was always decoded to RGB); a 3-channel model still gets RGB."""
    folder = _mixed_folder(tmp_path / "mixed")
    source = open_data_spec(f"imagefolder:{folder}", mean=[0.0], std=[1.0], channels=1)
    assert source.images.shape == (7, 1, 16, 16)
    luma = np.asarray(Image.open(folder / "a" / "0_rgb.png").convert("L"), np.float32) / 255
    torch.testing.assert_close(source.images[0, 0], torch.from_numpy(luma))
    assert open_data_spec(f"imagefolder:{folder}", channels=3).images.shape == (7, 3, 16, 16)
    net = tmp_path / "gray.py"
    net.write_text("from torch import nn\nINPUT_SHAPE = (1, 1, 16, 16)\n"
                   "def net():\n    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), "
                   "nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), "
                   "nn.Flatten(), nn.Linear(8, 2))\n")
    out = tmp_path / "gray_bsconv.pt"
    result = invoke("decompose", f"{net}:net", "-m", "bsconv-u", "--min-in-channels", "1",
                    "--calib", f"imagefolder:{folder}", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    recorded = load_model(out).metadata["preprocessing"]
    assert (recorded["mean"], recorded["std"]) == ([0.449], [0.226])
    result = invoke("evaluate", out, "--data", f"imagefolder:{folder}", "--json")
    assert result.exit_code == 0, result.stderr
    result = invoke("export", out, "--data", f"imagefolder:{folder}", "-o",
                    tmp_path / "gray.onnx", "-q")
    assert result.exit_code == 0, result.stderr


def test_imagefolder_with_a_symbolic_link_loop_is_refused(tmp_path, ckpt):
    """ImageFolder follows links: a class folder linking to its parent was read some 40
    times over (2 images became 82 samples), without a word."""
    folder = _good_folder(tmp_path / "loop")
    (folder / "a" / "self").symlink_to(folder / "a", target_is_directory=True)
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", f"imagefolder:{folder}")
    assert result.exit_code == 2
    assert "symbolic link loop" in _one_sentence(result)


def _good_folder(root: Path) -> Path:
    """Two classes of two 16×16 RGB images."""
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _rgb(rng).save(root / cls / f"good{i}.png")
    return root


def _truncated_png() -> bytes:
    import io

    buffer = io.BytesIO()
    _rgb(np.random.default_rng(3), 32).save(buffer, format="PNG")
    return buffer.getvalue()[:200]


@pytest.mark.parametrize("content", [_truncated_png(), b"not an image at all" * 10],
                         ids=["truncated", "garbage"])
def test_imagefolder_corrupt_file_when_read(tmp_path, ckpt, content):
    folder = _good_folder(tmp_path / "data")
    (folder / "b" / "zz_broken.png").write_bytes(content)  # read last
    out = tmp_path / "out.pt"
    # the first image is fine: the spec opens, the broken file fails when its batch is read
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", f"imagefolder:{folder}")
    assert result.exit_code == 2
    assert "zz_broken.png" in _one_sentence(result)
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--calib",
                    f"imagefolder:{folder}", "--no-bn-reestimate", "-o", out)
    assert result.exit_code == 2
    assert "zz_broken.png" in _one_sentence(result)
    assert not out.exists()


def test_imagefolder_corrupt_first_file_fails_on_open(tmp_path):
    folder = _good_folder(tmp_path / "data")
    (folder / "a" / "0_first.png").write_bytes(_truncated_png())  # read first
    with pytest.raises(BadInput, match="0_first.png"):
        open_data_spec(f"imagefolder:{folder}")


def test_imagefolder_bad_normalisation(tmp_path):
    folder = _good_folder(tmp_path / "data")
    with pytest.raises(BadInput, match="--std values must be positive"):
        open_data_spec(f"imagefolder:{folder}", std=[0.0])
    with pytest.raises(BadInput, match="--mean gives 2 values"):
        open_data_spec(f"imagefolder:{folder}", mean=[0.1, 0.2])
    with pytest.raises(BadInput, match="within float32's range"):
        open_data_spec(f"imagefolder:{folder}", std=[1e300])


def test_a_crop_larger_than_the_resize_is_refused(tmp_path):
    """torchvision's CenterCrop pads a crop larger than the image with black: 100 → 224
    scored images framed in black without a word."""
    folder = _good_folder(tmp_path / "data")
    with pytest.raises(BadInput, match="--crop 224 is larger than --resize 100"):
        open_data_spec(f"imagefolder:{folder}", resize=100, crop=224)
    open_data_spec(f"imagefolder:{folder}", resize=16, crop=16)


def test_a_fifo_in_an_imagefolder_is_refused_instead_of_blocking(tmp_path):
    """Reading a named pipe blocks until something writes to it: every command hung."""
    folder = _good_folder(tmp_path / "data")
    os.mkfifo(folder / "a" / "pipe.png")
    with pytest.raises(BadInput, match="pipe.png is not a regular file"):
        open_data_spec(f"imagefolder:{folder}")


# --- synthetic data -------------------------------------------------------------------------

def test_synthetic_for_evaluate_and_calib(tmp_path, ckpt):
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", "synthetic:3x16x16:10",
                    "--limit", "32")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "calib.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--calib",
                    "synthetic:3x16x16:10", "--calib-samples", "32", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    # the archive records no preprocessing for random data, and evaluates on real-like data
    from bscompress.io.archive import load_model

    assert not load_model(out).metadata.get("preprocessing")
    result = invoke("evaluate", out, "--data", "synthetic:3x16x16:10", "--limit", "16")
    assert result.exit_code == 0, result.stderr


def test_synthetic_describes_1d_inputs_for_conv1d_models(tmp_path):
    """``synthetic:CxL:CLASSES`` gives [N, C, L] samples (normalised per channel), so a
    Conv1d model is evaluated and calibrated without data of its own; a third shape stays
    refused in a sentence."""
    source = tmp_path / "seq.py"
    source.write_text("from torch import nn\nINPUT_SHAPE = (1, 4, 32)\n"
                      "def net():\n    return nn.Sequential(nn.Conv1d(4, 16, 5, padding=2), "
                      "nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1), nn.AdaptiveAvgPool1d(1), "
                      "nn.Flatten(), nn.Linear(16, 3))\n")
    source_data = open_data_spec("synthetic:4x32:3", limit=8, mean=[1.0], std=[2.0])
    x, _ = next(iter(source_data.loader(batch_size=8)))
    raw = open_data_spec("synthetic:4x32:3", limit=8)
    assert x.shape == (8, 4, 32)
    torch.testing.assert_close(x, (next(iter(raw.loader(batch_size=8)))[0] - 1.0) / 2.0)
    out = tmp_path / "seq_svd.pt"
    result = invoke("decompose", f"{source}:net", "-m", "bsconv-u", "--calib",
                    "synthetic:4x32:3", "--calib-samples", "16", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    result = invoke("evaluate", out, "--data", "synthetic:4x32:3", "--limit", "16")
    assert result.exit_code == 0, result.stderr
    result = invoke("evaluate", out, "--data", "synthetic:32:3", "--limit", "16")
    assert result.exit_code == 2 and "synthetic:CxL:CLASSES" in _one_sentence(result)


@pytest.mark.parametrize(("spec", "extra", "word"), [
    ("synthetic:1x16x16:10", [], "does not run on --data synthetic:1x16x16:10"),
    ("synthetic:3x16x16:10", ["--mean", "0.1,0.2"], "--mean gives 2 values"),
    ("synthetic:3x16x16:10", ["--std", "0"], "standard deviations must be positive"),
    ("synthetic:3x16x16:10", ["--mean", "nan"], "finite"),
    ("synthetic:3x16x16:100", [], "label"),
    ("synthetic:3x100000x100000:10", [], "memory"),
    ("synthetic:3x16x16x16:10", [], "synthetic:CxHxW:CLASSES"),
    ("synthetic:3x16:10", [], "does not run on --data synthetic:3x16:10"),
])
def test_synthetic_bad(ckpt, spec, extra, word):
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", spec, "--limit", "16",
                    *extra)
    assert result.exit_code == 2
    assert word in _one_sentence(result)


def test_calibrating_a_model_whose_activations_overflow_is_refused_in_a_sentence(tmp_path):
    """Finite weights far from a trained scale overflow float32 on the way through the
    network: the command names that before any statistics (which would be NaN), and writes
    nothing."""
    torch.manual_seed(0)
    state = {k: v * 1e15 if k.endswith("weight") and v.dim() == 4 else v
             for k, v in TinyNet().state_dict().items()}
    path, out = tmp_path / "huge.pt", tmp_path / "out.pt"
    torch.save(state, path)
    result = invoke("decompose", path, "--arch", NETS_SPEC, "-m", "svd", "--calib",
                    "synthetic:3x16x16:10", "--calib-samples", "16", "-o", out, "-q")
    assert result.exit_code == 2
    assert "NaN or infinite values: its activations overflow" in _one_sentence(result)
    assert not out.exists()


def test_recorded_empty_preprocessing_is_ignored():
    from bscompress.data import recorded_preprocessing

    assert recorded_preprocessing("demo", {"mean": [], "std": []}) == {}
    with pytest.raises(BadInput, match="--mean"):
        open_data_spec("demo", mean={"a": 1}, limit=4)


# --- CIFAR-10 folders -----------------------------------------------------------------------

def _cifar_batch(n=4, **changes) -> dict:
    rng = np.random.default_rng(4)
    batch = {b"batch_label": b"test", b"labels": [i % 10 for i in range(n)],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": []}
    batch.update({key.encode(): value for key, value in changes.items()})
    return batch


def _write(path: Path, obj) -> bytes:
    data = pickle.dumps(obj, protocol=2)
    path.write_bytes(data)
    return data


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["missing", "not_pickle", "truncated", "not_dict", "keys",
                                  "shape", "dtype", "label_count", "label_range", "code"])
def test_cifar_malformed(tmp_path, ckpt, case):
    data = tmp_path / "data"
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = folder / "test_batch"
    marker = tmp_path / "PWNED"
    if case == "not_pickle":
        batch.write_bytes(b"\x89PNG not a pickle")
    elif case == "truncated":
        batch.write_bytes(_write(batch, _cifar_batch())[:500])
    elif case == "not_dict":
        _write(batch, [1, 2, 3])
    elif case == "keys":
        _write(batch, {b"fine_labels": [1], b"data": _cifar_batch()[b"data"]})
    elif case == "shape":
        _write(batch, _cifar_batch(data=np.zeros((4, 100), dtype=np.uint8)))
    elif case == "dtype":
        _write(batch, _cifar_batch(data=np.zeros((4, 3072), dtype=np.float64)))
    elif case == "label_count":
        _write(batch, _cifar_batch(labels=[1, 2]))
    elif case == "label_range":
        _write(batch, _cifar_batch(labels=[1, 2, 3, 12]))
    elif case == "code":
        evil = _Evil()
        evil.marker = marker
        _write(batch, _cifar_batch(labels=evil))
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", f"cifar10:{data}")
    assert result.exit_code == 2
    assert "test_batch" in _one_sentence(result)
    assert not marker.exists()
    out = tmp_path / "o.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--calib",
                    f"cifar10:{data}", "--calib-split", "test", "-o", out)
    assert result.exit_code == 2 and "test_batch" in _one_sentence(result)
    assert not out.exists()


def test_cifar_good_batch_and_numpy_names(tmp_path, ckpt):
    _write(tmp_path / "test_batch", _cifar_batch(n=8))
    result = invoke("evaluate", ckpt, "--arch", NETS_SPEC, "--data", f"cifar10:{tmp_path}")
    assert result.exit_code == 0, result.stderr
    assert "(8 samples)" in result.stdout
    import io

    unpickler = _ArrayUnpickler(io.BytesIO(b""))
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # NumPy 1 and 2 files
        assert callable(unpickler.find_class(module, "_reconstruct"))
    for module, name in (("builtins", "eval"), ("numpy", "load"), ("os", "system")):
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            unpickler.find_class(module, name)


# --- model outputs --------------------------------------------------------------------------

def test_evaluate_tuple_and_dict_outputs(ckpt):
    data = ["--data", "synthetic:3x16x16:10", "--limit", "32", "--json"]
    plain = invoke("evaluate", ckpt, "--arch", NETS_SPEC, *data)
    assert plain.exit_code == 0, plain.stderr
    for name in ("TupleNet", "DictNet"):
        result = invoke("evaluate", ckpt, "--arch", _spec(name), *data)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.replace(_spec(name), "") == plain.stdout.replace(NETS_SPEC, "")


@pytest.mark.parametrize(("name", "word"), [("NoTensorNet", "without a tensor"),
                                            ("SpatialNet", "[batch, classes]")])
def test_evaluate_bad_outputs(ckpt, name, word):
    result = invoke("evaluate", ckpt, "--arch", _spec(name), "--data", "synthetic:3x16x16:10",
                    "--limit", "8")
    assert result.exit_code == 2
    assert word in _one_sentence(result)


def test_evaluate_library_messages():
    model = TinyNet().train()
    loader = [(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.int64))]
    with pytest.raises(BadInput, match=r"the data, batches of shape \[2, 1, 16, 16\]"):
        evaluate(model, loader)
    assert model.training  # the mode is restored
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, -1]))]
    with pytest.raises(BadInput, match="label -1"):
        evaluate(model, loader)


# --- data that do not fit the model ---------------------------------------------------------

def test_data_that_does_not_fit_the_model(tmp_path, ckpt):
    folder = _good_folder(tmp_path / "rgb")
    one = tmp_path / "one.pt"  # a 3-channel folder for a 1-channel model
    torch.save(OneChannelNet().state_dict(), one)
    result = invoke("evaluate", one, "--arch", _spec("OneChannelNet"), "--data",
                    f"imagefolder:{folder}")
    assert result.exit_code == 2
    text = _one_sentence(result)
    assert f"imagefolder:{folder}" in text and "[4, 3, 16, 16]" in text
    out = tmp_path / "o.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--calib",
                    "synthetic:1x16x16:10", "--calib-samples", "16", "-o", out)
    assert result.exit_code == 2
    text = _one_sentence(result)
    assert "--calib" in text and "[16, 1, 16, 16]" in text
    assert not out.exists()


# --- BatchNorm re-estimation on too few samples ---------------------------------------------

def test_calib_samples_below_the_batchnorm_minimum(tmp_path, ckpt):
    out = tmp_path / "o.pt"
    base = ["decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--calib",
            "synthetic:3x16x16:10", "-o", out]
    result = invoke(*base, "--calib-samples", "1")
    assert result.exit_code == 2
    text = _one_sentence(result)
    assert "--calib-samples" in text and str(MIN_BATCHNORM_SAMPLES) in text
    assert not out.exists()
    result = invoke(*base, "--calib-samples", "1", "--no-bn-reestimate", "-q")
    assert result.exit_code == 0, result.stderr
    assert out.exists()


def test_reestimate_batchnorm_refuses_before_touching_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = (torch.randn(1, 3, 8, 8) for _ in range(MIN_BATCHNORM_SAMPLES - 1))
    with pytest.raises(BadInput, match="--calib-samples"):
        reestimate_batchnorm(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # enough samples in small batches from a one-shot iterator: every batch is used
    batches = (torch.randn(2, 3, 8, 8) for _ in range(MIN_BATCHNORM_SAMPLES))
    assert reestimate_batchnorm(model, batches) == 2
    assert int(model[1].num_batches_tracked) == MIN_BATCHNORM_SAMPLES
    assert reestimate_batchnorm(nn.Conv2d(3, 4, 3), [torch.randn(1, 3, 8, 8)]) == 0


@pytest.mark.parametrize(("record", "words"), [
    (["mean", "std"], "records its preprocessing as a list"),
    ({"mean": ["a", "b", "c"]}, "mean = ['a', 'b', 'c'], which is not a list of finite"),
    ({"std": [0, 0, 0]}, "std = [0, 0, 0], which is not a list of positive numbers"),
    ({"crop": -5}, "crop = -5, which is not a whole number of pixels"),
    ({"resize": True}, "resize = True, which is not a whole number of pixels"),
    ({"resize": 10**12}, "resize = 1000000000000, which is not a whole number of pixels"),
])
def test_an_edited_preprocessing_record_is_named_as_the_archives(record, words):
    """The preprocessing an archive records is checked as the archive's (not blamed on an
    option the user never gave, nor an internal error for a record that is no object)."""
    from bscompress.data import recorded_preprocessing

    with pytest.raises(BadInput, match=re.escape(words)):
        recorded_preprocessing("imagefolder:x", record)
    good = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "resize": 36, "crop": 32}
    assert recorded_preprocessing("imagefolder:x", good) == good
    assert recorded_preprocessing("demo", good) == {"mean": good["mean"], "std": good["std"]}


def test_a_resize_or_crop_beyond_the_memory_is_refused_before_reading(tmp_path):
    folder = _good_folder(tmp_path / "data")
    with pytest.raises(BadInput, match="--crop 100000 makes 16 images"):
        open_data_spec(f"imagefolder:{folder}", crop=100000, limit=16)
    with pytest.raises(BadInput, match="--resize 100000 makes 1 image"):
        open_data_spec(f"imagefolder:{folder}", resize=100000)


def test_a_float64_model_takes_float32_data_as_its_own():
    """A float64 (or half) model was refused on float32 data as if its shape were wrong
    ("use data with the channels and image size …"); the batches are now cast to the
    model's dtype, in evaluation and in calibration."""
    from torch.utils.data import DataLoader, TensorDataset

    from bscompress.compress.decomposition import decompose
    from bscompress.data import evaluate
    from bscompress.methods import RankOptions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4)).double().eval()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8))
    with torch.no_grad():
        expected = (model(x.double()).argmax(1) == y).float().mean().item()
    assert result["top1"] == pytest.approx(expected)
    _, plan = decompose(model, "dsc", (1, 3, 8, 8), RankOptions(rank=1),
                        calibration=[x[:16], x[16:]])
    assert plan.replaced() and plan.summary.calibration is not None


def test_calibrating_on_too_few_samples_to_hold_any_out_is_said(tmp_path, ckpt):
    """Under 8 samples nothing is held out to check the data-aware fits, which one image
    made far worse than data-free: the command says so (and the plan records it)."""
    out = tmp_path / "out.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--rank", "1",
                    "--calib", "synthetic:3x16x16:10", "--calib-samples", "4",
                    "--no-bn-reestimate", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "too few to hold any out" in " ".join(result.stderr.split())
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--rank", "1",
                    "--calib", "synthetic:3x16x16:10", "--calib-samples", "16",
                    "--no-bn-reestimate", "-o", out, "--force")
    assert result.exit_code == 0 and "too few to hold any out" not in result.stderr
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, "-m", "bsconv-u", "--rank", "1",
                    "--calib", "synthetic:3x16x16:10", "--calib-samples", "16", "--holdout",
                    "0", "--no-bn-reestimate", "-o", out, "--force")  # none asked for
    assert result.exit_code == 0 and "too few to hold any out" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-m", "bsconv-u", "--include", "featurs.*"],
     "--include 'featurs.*' matches no layer of the model"),
    (["-m", "auto", "--budget", "macs=0.3", "--exclude", "*"],
     "-m auto can rewrite none of the model's"),
    (["-m", "bsconv-u", "--min-in-channels", "1000"],
     "-m bsconv-u can rewrite none of the model's"),
])
def test_a_decompose_that_can_rewrite_nothing_exits_2(tmp_path, ckpt, args, message):
    """A typo in --include wrote a copy of the original with exit 0, and a budget over no
    eligible layer said "even the smallest ranks of  keep 100%"."""
    out = tmp_path / "out.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, *args, "-o", out)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["-m", "bsconv-u", "--rank", "1", "--match", "0.8"],
     "--match is used only with --fixed-kernels"),
    (["-m", "bsconv-u", "--rank", "1", "--guard-share", "0.7"],
     "--guard-share is used only with the latency guard"),
    (["-m", "bsconv-u", "--budget", "macs=0.6", "--no-latency-guard", "--serving-batch", "8"],
     "--serving-batch is used only with the latency guard"),
    (["-m", "bsconv-u", "--rank", "1", "--latency-runtime", "eager"],
     "--latency-runtime is used only with the latency guard or a latency --budget"),
    (["-m", "bsconv-u", "--rank", "1", "--p", "0.5"], "--p is used only with --method bsconv-s"),
    (["-m", "svd", "--rank", "1", "--cp-rank", "4"], "--cp-rank is used only with --method cp"),
    (["-m", "bsconv-u", "--rank", "1", "--holdout", "0.3"], "--holdout sets the calibration"),
    (["-m", "bsconv-u", "--rank", "1", "--calib-samples", "32"],
     "--calib-samples sets the calibration"),
    (["-m", "bsconv-u", "--rank", "1", "--calib", "synthetic:3x16x16:10", "--calib-samples",
      "16", "--reconstruct-steps", "5"], "--reconstruct-steps is used only with --reconstruct"),
])
def test_an_option_that_would_be_ignored_exits_2(tmp_path, ckpt, args, message):
    """Options used only with another one (--match without --fixed-kernels, --holdout without
    --calib, --p with bsconv-u ...) were silently ignored."""
    out = tmp_path / "out.pt"
    result = invoke("decompose", ckpt, "--arch", NETS_SPEC, *args, "-o", out)
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()


def test_a_recipe_option_that_would_be_ignored_is_refused():
    from bscompress.core.recipe import parse_recipe

    with pytest.raises(BadInput, match="'decompose.match' is used only with "
                                       "'decompose.fixed_kernels'"):
        parse_recipe({"data": {"train": "demo"},
                      "decompose": {"method": "bsconv-u", "rank": 1, "match": 0.8}})
    parse_recipe({"data": {"train": "demo"},  # the default value, not given: no rule
                  "decompose": {"method": "bsconv-u", "rank": 1}})


def test_a_packed_archive_decomposes_with_its_preprocessing(tmp_path, ckpt):
    """``pack`` writes the model as it is, with its preprocessing: ``decompose`` refused it as
    "already a bscompress archive" although its help lists archives."""
    from bscompress.io.archive import load_model

    packed, out = tmp_path / "packed.pt", tmp_path / "out.pt"
    result = invoke("pack", ckpt, "--arch", NETS_SPEC, "--mean", "0.5", "--std", "0.25",
                    "-o", packed)
    assert result.exit_code == 0, result.stderr
    result = invoke("decompose", packed, "-m", "bsconv-u", "--rank", "1", "--resize", "16",
                    "-o", out)
    assert result.exit_code == 0, result.stderr
    loaded = load_model(out)
    assert loaded.plan.replaced()
    assert loaded.metadata["preprocessing"] == {"mean": [0.5], "std": [0.25], "resize": 16}
    result = invoke("decompose", out, "-m", "bsconv-u", "--rank", "1", "-o",
                    tmp_path / "twice.pt")
    assert result.exit_code == 2 and "already a compressed bscompress archive" in result.stderr


def test_the_command_defaults_are_the_schema_defaults():
    """The command passes the calibration's options only where they were given, so the
    section's defaults must be the command's."""
    import inspect

    from bscompress.app.cli import decompose as command
    from bscompress.core.recipe import Calibration

    parameters = inspect.signature(command.decompose).parameters
    assert len(command.CALIBRATION_OPTIONS) == 9
    for _, name, key in command.CALIBRATION_OPTIONS:
        assert parameters[name].default == Calibration.model_fields[key].default, key


def test_calibration_options_method_none_would_ignore_exit_2(tmp_path, ckpt):
    out = tmp_path / "out.pt"
    base = ("decompose", ckpt, "--arch", NETS_SPEC, "-m", "none", "--fixed-kernels", "bank",
            "--calib", "synthetic:3x16x16:10", "--calib-samples", "16", "-o", out)
    result = invoke(*base, "--holdout", "0.5")
    assert result.exit_code == 2 and "--holdout would be ignored" in " ".join(
        result.stderr.split()), result.stderr
    assert invoke(*base).exit_code == 0  # the calibration's own options are fine
