"""Loading paths and formats, archives, and the bad inputs of every kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from bscompress.core.errors import BadInput
from bscompress.core.files import atomic_output
from bscompress.core.plan import LayerPlan, Plan
from bscompress.core.surgery import apply_plan, register_structure
from bscompress.io.arch import ArchSpec, build_arch
from bscompress.io.archive import load, load_model, save_archive
from bscompress.io.checkpoint import file_sha256

NETS = Path(__file__).parent / "nets.py"
SPEC = f"{NETS}:TinyNet"


def _trained_tiny(seed: int = 1) -> nn.Module:
    """A TinyNet whose weights differ from the seeded random init (as a trained one would),
    with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = build_arch(ArchSpec(SPEC))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net.eval()


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 3, 16, 16)) -> bool:
    x = torch.randn(shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def net() -> nn.Module:
    return _trained_tiny()


# --- loading paths ------------------------------------------------------------------------


def _pruned(state: dict) -> dict:
    """A state dict as saved from a model pruned by ``torch.nn.utils.prune`` and never
    ``prune.remove``d: ``weight_orig`` and ``weight_mask`` instead of ``weight``."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 4:
            mask = (value.abs() > value.abs().median()).float()
            out[key + "_orig"] = torch.where(mask.bool(), value, torch.full_like(value, 7.0))
            out[key + "_mask"] = mask
            value.mul_(mask)  # (the net's own weight) what the pruned model convolves with
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}},
        lambda sd: {"model": sd, "args": {"lr": 0.1}},
        lambda sd: {"net": sd},
        lambda sd: {"ema": {"module." + k: v for k, v in sd.items()}},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
        lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},
        lambda sd: _pruned(sd),
        lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    ],
    ids=["plain", "state_dict", "model_state_dict", "model", "net", "ema+module", "module",
         "orig_mod", "ddp+compile", "lightning", "pruned", "before-torch-0.4.1"],
)
def test_checkpoint_wrappers_load_the_same_weights(tmp_path, net, wrap):
    """Wrappers, key prefixes (DataParallel, torch.compile, Lightning), pruning's
    weight_orig × weight_mask pairs and checkpoints without BatchNorm's batch counter
    (PyTorch before 0.4.1) all load as the model's weights."""
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(net.state_dict()), path)
    loaded = load_model(path, arch=SPEC)
    assert _same_outputs(loaded.model, net)
    assert loaded.sha256 == file_sha256(path)


def test_checkpoint_key_picks_the_entry(tmp_path, net):
    other = _trained_tiny(seed=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": other.state_dict(), "ema": net.state_dict()}, path)
    assert _same_outputs(load_model(path, arch=SPEC).model, other)
    loaded = load_model(path, arch=SPEC, checkpoint_key="ema")
    assert _same_outputs(loaded.model, net)
    assert loaded.checkpoint_key == "ema"
    with pytest.raises(BadInput, match="no entry 'nope'"):
        load_model(path, arch=SPEC, checkpoint_key="nope")


def test_safetensors_checkpoint(tmp_path, net):
    path = tmp_path / "ckpt.safetensors"
    save_file(net.state_dict(), str(path))
    assert _same_outputs(load_model(path, arch=SPEC).model, net)


def test_torchvision_and_module_specs_with_kwargs(tmp_path):
    ref = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    for spec in ("torchvision:resnet18", "torchvision.models:resnet18"):
        loaded = load_model(path, arch=spec, arch_kwargs='{"num_classes": 10}')
        assert _same_outputs(loaded.model, ref, (1, 3, 32, 32))
        assert loaded.arch == ArchSpec(spec, {"num_classes": 10})


def test_bare_spec_is_seeded_random_init():
    a = load_model(SPEC).model
    b = load_model(SPEC, arch_kwargs={"num_classes": 10}).model
    assert _same_outputs(a, b)
    assert load_model("torchvision:resnet18").model.fc.out_features == 1000


def test_factory_function_spec(tmp_path, net):
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    assert _same_outputs(load_model(path, arch=f"{NETS}:tiny_net").model, net)


def test_pickled_module_needs_trust(tmp_path):
    ref = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path / "whole.pt"
    torch.save(ref, path)
    with pytest.raises(BadInput, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert _same_outputs(loaded.model, ref, (1, 3, 32, 32))
    # a wrapper holding a pickled module is refused the same way
    torch.save({"model": ref, "epoch": 1}, path)
    with pytest.raises(BadInput, match="--trust-pickle"):
        load_model(path, arch="torchvision:resnet18", arch_kwargs={"num_classes": 4})


# --- bad inputs -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still in use
def test_torchscript_is_refused(tmp_path, net):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 16, 16)), path)
    with pytest.raises(BadInput, match="TorchScript"):
        load_model(path, arch=SPEC)


def test_torch_export_archive_is_refused(tmp_path, net):
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net.eval(), (torch.randn(1, 3, 16, 16),)), path)
    with pytest.raises(BadInput, match=r"torch\.export archive .*state_dict\(\)"):
        load_model(path, arch=SPEC)


def test_an_onnx_model_is_refused_by_name(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first fields
    with pytest.raises(BadInput, match="is an ONNX model: .* PyTorch checkpoint"):
        load_model(path, arch=SPEC)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_model(tmp_path / "nope.pt", arch=SPEC)
    with pytest.raises(BadInput, match="directory"):
        load_model(tmp_path, arch=SPEC)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tmp_path, net, legacy):
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="truncated or corrupt"):
        load_model(path, arch=SPEC)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BadInput, match="not a checkpoint"):
        load_model(path, arch=SPEC)
    path = tmp_path / "tensor.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(BadInput, match="no state_dict found"):
        load_model(path, arch=SPEC)


def test_weights_without_arch(tmp_path, net):
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(BadInput, match="pass --arch"):
        load_model(path)


def test_wrong_architecture_names_the_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(BadInput) as err:
        load_model(path, arch="torchvision:resnet34")
    message = str(err.value)
    assert "missing keys: layer1.2.conv1.weight" in message
    assert "--arch" in message
    shapes = r"fc.weight \(checkpoint \[1000, 512\] vs model \[10, 512\]\)"
    with pytest.raises(BadInput, match=shapes):
        load_model(path, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("torchvision:resnet181", None, "did you mean resnet18"),
        ("no_such_pkg.models:Net", None, "cannot import module"),
        ("torchvision.models:NoNet", None, "has no attribute 'NoNet'"),
        ("missing_file.py:Net", None, "does not exist"),
        (SPEC, '{"num_classes": ', "not valid JSON"),
        (SPEC, "[1, 2]", "must be a JSON object"),
        (SPEC, '{"depth": 3}', "cannot be built"),
        ("torchvision:resnet18", '{"weights": "DEFAULT"}', "never downloads"),
    ],
)
def test_bad_arch_specs(spec, kwargs, message):
    with pytest.raises(BadInput, match=message):
        load_model(spec, arch_kwargs=kwargs)


# --- archives -------------------------------------------------------------------------------


def _split_conv(conv: nn.Module, entry: LayerPlan) -> nn.Module:
    """A toy two-stage block standing in for a factorized layer: 1×1 then the original conv."""
    block = nn.Sequential()
    block.add_module("pw", nn.Conv2d(conv.in_channels, conv.in_channels, 1, bias=False))
    block.add_module("dw", nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                     conv.stride, conv.padding, groups=conv.groups))
    return block


register_structure("test-split", _split_conv)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_archive_round_trip_is_exact(tmp_path, net, suffix):
    source = tmp_path / "src.pt"
    torch.save(net.state_dict(), source)
    loaded = load_model(source, arch=SPEC)
    plan = Plan(
        layers=[LayerPlan("features.0", "Conv2d", method="test-split"),
                LayerPlan("stem", "Conv2d", skip_reason="first layer")],
        input_shape=[1, 3, 16, 16],
    )
    compressed = apply_plan(loaded.model, plan)
    with torch.no_grad():
        for p in compressed.features[0].parameters():
            p.normal_()
    out = tmp_path / f"archive{suffix}"
    save_archive(out, compressed, loaded.arch, plan, source_sha256=loaded.sha256)
    again = load(out)
    assert isinstance(again.features[0], nn.Sequential)
    assert _same_outputs(again, compressed)
    reloaded = load_model(out)
    assert reloaded.plan == plan
    assert reloaded.metadata["source_sha256"] == file_sha256(source)
    assert reloaded.metadata["bscompress_version"]
    assert reloaded.metadata["created"]
    if suffix == ".pt":
        raw = torch.load(out, weights_only=True)  # no pickle needed
        assert raw["format"] == "bscompress-archive"
        json.dumps({k: v for k, v in raw.items() if k != "state_dict"})


def test_archive_with_unknown_method_is_refused(tmp_path, net):
    plan = Plan(layers=[LayerPlan("features.0", "Conv2d", method="from-the-future")])
    out = tmp_path / "a.pt"
    save_archive(out, net, ArchSpec(SPEC), plan)
    with pytest.raises(BadInput, match="from-the-future"):
        load(out)


def test_archive_refuses_arch_and_plain_checkpoint_is_not_archive(tmp_path, net):
    out = tmp_path / "a.pt"
    save_archive(out, net, ArchSpec(SPEC), Plan())
    with pytest.raises(BadInput, match="needs no --arch"):
        load_model(out, arch=SPEC)
    plain = tmp_path / "plain.pt"
    torch.save(net.state_dict(), plain)
    with pytest.raises(BadInput, match="not a bscompress archive"):
        load(plain)


# --- output files ---------------------------------------------------------------------------


def test_outputs_are_atomic_and_never_overwrite(tmp_path, net, monkeypatch):
    out = tmp_path / "a.pt"
    out.write_text("keep me")
    with pytest.raises(BadInput, match="--force"):
        save_archive(out, net, ArchSpec(SPEC), Plan())
    assert out.read_text() == "keep me"
    with pytest.raises(BadInput, match="also an input"):
        save_archive(out, net, ArchSpec(SPEC), Plan(), force=True, inputs=(out,))
    save_archive(out, net, ArchSpec(SPEC), Plan(), force=True)
    assert load_model(out).is_archive

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    fresh = tmp_path / "fresh.pt"
    with pytest.raises(OSError):
        save_archive(fresh, net, ArchSpec(SPEC), Plan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_atomic_output_needs_existing_directory(tmp_path):
    with pytest.raises(BadInput, match="does not exist"), atomic_output(tmp_path / "no" / "x"):
        pass


def test_module_versions_reach_modules_that_need_them(tmp_path):
    """torchvision's MNASNet reads its version from the state dict's ``_metadata``: a plain
    checkpoint, a renamed one and an archive all load (they ended in exit 3)."""
    import torchvision

    from bscompress.compress.decomposition import decompose
    from bscompress.io.arch import ArchSpec
    from bscompress.io.archive import load, load_model, save_archive
    from bscompress.methods import RankOptions

    torch.manual_seed(0)
    net = torchvision.models.mnasnet0_5().eval()
    plain, renamed = tmp_path / "m.pt", tmp_path / "ddp.pt"
    torch.save(net.state_dict(), plain)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, renamed)
    x = torch.randn(1, 3, 64, 64)
    for path in (plain, renamed):
        loaded = load_model(path, arch="torchvision:mnasnet0_5").model.eval()
        assert torch.equal(loaded(x), net(x))
    model, plan = decompose(net, "svd", (1, 3, 64, 64), RankOptions(rank=4))
    save_archive(tmp_path / "a.pt", model, ArchSpec("torchvision:mnasnet0_5"), plan)
    assert torch.equal(load(tmp_path / "a.pt").eval()(x), model(x))


def test_timm_spec_builds_through_its_registry(tmp_path):
    """``timm:NAME`` is timm.create_model(NAME, pretrained=False): a checkpoint loads into it,
    its input shape comes from timm's configuration, and nothing that downloads or reads
    weights is accepted."""
    timm = pytest.importorskip("timm")
    from bscompress.io.arch import default_input_shape
    from bscompress.io.trust import is_builtin_arch

    ref = timm.create_model("resnet10t", num_classes=4).eval()
    path = tmp_path / "r10t.pt"
    torch.save(ref.state_dict(), path)
    loaded = load_model(path, arch="timm:resnet10t", arch_kwargs={"num_classes": 4})
    assert _same_outputs(loaded.model, ref, (1, 3, 32, 32))
    assert default_input_shape(ArchSpec("timm:resnet10t")) == [1, 3, 224, 224]
    assert default_input_shape(ArchSpec("timm:nosuchnet")) is None
    assert is_builtin_arch("timm:resnet10t")
    with pytest.raises(BadInput, match="never downloads weights"):
        build_arch(ArchSpec("timm:resnet10t", {"pretrained": True}))
    with pytest.raises(BadInput, match=r"timm has no model .resnet10. \(did you mean"):
        load_model("timm:resnet10")


def test_tensor_kinds_the_loader_cannot_check_are_named(tmp_path, net):
    """Weights stored sparse or as meta tensors are refused in a sentence; float8 weights
    are checked and converted like half precision (their isfinite is not implemented)."""
    state = net.state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)
    path = tmp_path / "w.pt"
    for tensor, words in ((state[key].to_sparse(), "stored sparse_coo"),
                          (torch.empty(state[key].shape, device="meta"), "meta tensor")):
        torch.save({**state, key: tensor}, path)
        with pytest.raises(BadInput, match=words):
            load_model(path, arch=SPEC)
    torch.save({k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
                for k, v in state.items()}, path)
    loaded = load_model(path, arch=SPEC)
    assert loaded.model.state_dict()[key].dtype == torch.float32
    assert any("float8_e4m3fn" in note for note in loaded.notes)


def test_a_negative_batchnorm_variance_is_refused(tmp_path, net):
    """No training gives a negative running variance, and it makes the outputs NaN: refused
    on load, unless BSCOMPRESS_ALLOW_NONFINITE (to inspect a broken checkpoint)."""
    state = net.state_dict()
    key = next(k for k in state if k.endswith("running_var"))
    state[key][0] = -1.0
    path = tmp_path / "negvar.pt"
    torch.save(state, path)
    with pytest.raises(BadInput, match="running variance of .* holds negative values"):
        load_model(path, arch=SPEC)
    assert load_model(path, arch=SPEC, allow_nonfinite=True).model is not None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_archive_whose_weights_changed_after_writing_is_refused(tmp_path, net, suffix):
    """The archive records the SHA-256 of its weights: one value changed afterwards (a
    flipped bit, an edit) is refused as a damaged archive instead of loading as a silently
    different model; an archive without the record (written before it) still loads."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"a{suffix}"
    save_archive(out, net, ArchSpec(SPEC), Plan(layers=[]))
    assert _same_outputs(load(out), net)
    key = next(k for k, v in net.state_dict().items() if v.dim() == 4)
    if suffix == ".pt":
        raw = torch.load(out, weights_only=True)
        raw["state_dict"][key].view(-1)[0] += 1e-3
        torch.save(raw, out)
    else:
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        state = load_file(str(out))
        state[key].view(-1)[0] += 1e-3
        save_file(state, str(out), metadata=meta)
    with pytest.raises(BadInput, match="damaged bscompress archive: its weights are not"):
        load(out)
    if suffix == ".pt":  # an archive from before the record
        del raw["weights_sha256"]
        torch.save(raw, out)
        assert load(out) is not None


def test_input_shape_is_read_from_the_class_then_its_module(tmp_path):
    """A class's own INPUT_SHAPE, else its module's; a declared shape that is none is named
    (it was an internal error)."""
    from bscompress.io.arch import default_input_shape

    source = tmp_path / "shaped.py"
    source.write_text(
        "import torch\nINPUT_SHAPE = (1, 3, 32, 32)\n"
        "class Own(torch.nn.Conv2d):\n    INPUT_SHAPE = [1, 3, 8, 8]\n"
        "    def __init__(self):\n        super().__init__(3, 4, 3)\n"
        "class Plain(Own):\n    INPUT_SHAPE = None\n"
        "class Bad(Own):\n    INPUT_SHAPE = 'abc'\n")
    assert default_input_shape(ArchSpec(f"{source}:Own")) == [1, 3, 8, 8]
    assert default_input_shape(ArchSpec(f"{source}:Plain")) == [1, 3, 32, 32]
    with pytest.raises(BadInput, match="declares INPUT_SHAPE = 'abc'"):
        default_input_shape(ArchSpec(f"{source}:Bad"))


def test_lazy_modules_take_their_shapes_from_the_declared_input(tmp_path):
    """nn.LazyConv2d and friends get their weights' shapes from a first input: built with
    the architecture's INPUT_SHAPE (seeded, the same every time), so that inspecting,
    loading a checkpoint into them and rewriting them work; without a declared shape the
    spec is refused in a sentence (every command ended in an internal error)."""
    source = tmp_path / "lazy.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "class Lazy(nn.Module):\n    INPUT_SHAPE = (1, 3, 16, 16)\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.c1 = nn.LazyConv2d(8, 3, padding=1)\n        self.fc = nn.LazyLinear(4)\n"
        "    def forward(self, x):\n        return self.fc(self.c1(x).mean((2, 3)))\n"
        "class Unsized(Lazy):\n    INPUT_SHAPE = None\n")
    model = build_arch(ArchSpec(f"{source}:Lazy"))
    assert type(model.c1) is nn.Conv2d and model.c1.weight.shape == (8, 3, 3, 3)
    again = build_arch(ArchSpec(f"{source}:Lazy"))
    assert torch.equal(model.c1.weight, again.c1.weight)
    ckpt = tmp_path / "lazy.pt"
    torch.save(model.state_dict(), ckpt)
    assert _same_outputs(load_model(ckpt, arch=f"{source}:Lazy").model, model, (1, 3, 16, 16))
    with pytest.raises(BadInput, match="holds lazy modules .* declares no INPUT_SHAPE: pass "
                       "--input-shape"):
        build_arch(ArchSpec(f"{source}:Unsized"))
    # --input-shape sizes them where the architecture declares nothing, and an archive of
    # such a model rebuilds them from the shape it records
    unsized = load_model(ckpt, arch=f"{source}:Unsized", input_shape=[1, 3, 16, 16]).model
    assert _same_outputs(unsized, model, (1, 3, 16, 16))
    archive = tmp_path / "unsized.pt"
    save_archive(archive, unsized, ArchSpec(f"{source}:Unsized"),
                 Plan(input_shape=[1, 3, 16, 16]))
    assert _same_outputs(load(archive), model, (1, 3, 16, 16))


def test_a_write_that_fills_the_file_system_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC, or torch.save's "unexpected pos" with the disk (nearly) full, ended in exit 3;
    any other error passes unchanged."""
    import errno
    import shutil


    with pytest.raises(BadInput, match="file system is full"), atomic_output(tmp_path / "x.pt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=2**20))
    with pytest.raises(BadInput, match="file system is full"), atomic_output(tmp_path / "x.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_output(tmp_path / "x.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    assert list(tmp_path.iterdir()) == []


def test_a_float64_value_past_float32s_range_is_refused(tmp_path, net):
    """Checked as the model will hold it: 1e39 in a float64 checkpoint is finite there and
    infinite in the float32 model, which evaluate scored without a word."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key][0, 0, 0, 0] = 1e39
    path = tmp_path / "f64.pt"
    torch.save(state, path)
    with pytest.raises(BadInput, match=f"{key}' holds 1 value beyond the range of the "
                       "model's float32"):
        load_model(path, arch=SPEC)


def test_torchvision_segmentation_and_detection_models_download_no_backbone(monkeypatch):
    """torchvision's segmentation and detection builders load an ImageNet backbone unless
    told ``weights_backbone=None``: 15 of them tried to download one (and a null
    ``weights_backbone`` in --arch-kwargs was refused). The builder's arguments are checked
    on a stand-in, so that nothing is built or fetched."""
    import torchvision

    asked = []

    def builder(name, **kwargs):
        asked.append(kwargs)
        return nn.Conv2d(3, 3, 1)

    monkeypatch.setattr(torchvision.models, "get_model", builder)
    build_arch(ArchSpec("torchvision:lraspp_mobilenet_v3_large"))
    build_arch(ArchSpec("torchvision:lraspp_mobilenet_v3_large", {"weights_backbone": None}))
    build_arch(ArchSpec("torchvision:resnet18"))  # a classifier has no backbone argument
    assert asked == [{"weights": None, "weights_backbone": None}] * 2 + [{"weights": None}]
    with pytest.raises(BadInput, match="must not set 'weights_backbone'"):
        build_arch(ArchSpec("torchvision:lraspp_mobilenet_v3_large",
                            {"weights_backbone": "DEFAULT"}))
