"""VGNet (bscompress.models): the paper's parameter count, shapes of every factory, fixed
kernels as buffers, state_dict round trip, ONNX parity, the half identity, and training one
from scratch with a recipe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import bscompress.models as models
from bscompress.app.cli import app
from bscompress.app.pipeline import run
from bscompress.core.errors import BadInput
from bscompress.core.recipe import parse_recipe
from bscompress.core.stats import count_params
from bscompress.deploy.export import export_onnx
from bscompress.factorize.kernel_bank import gaussian_kernel
from bscompress.models.vgnet import (
    DownsamplingBlock,
    FixedDepthwiseConv2d,
    HalfIdentityBlock,
    SharedDepthwiseConv2d,
    VGNet,
)
from bscompress.train.finetune import World

FACTORIES = ["vgnetc_1_0mp", "vgnetc_1_5mp", "vgnetg_1_0mp", "vgnetg_1_5mp", "vgnetg_2_0mp",
             "vgnetg_2_5mp", "vgnetg_5_0mp", "vgnetf_1_5mp", "vgnete_1_5mp"]
SPEC = "bscompress.models:vgnetg_1_0mp"


def _tiny(kernels: str = "edge_gaussian", **kw) -> VGNet:
    """A small VGNet with every kind of depthwise layer, for fast checks."""
    return VGNet((8, 16, 32, 32, 48), (2, 2, 2, 2), "blur", kernels, **kw)


def test_vgnetg_1_0mp_has_the_papers_parameter_count():
    params = count_params(models.vgnetg_1_0mp())
    assert abs(params - 0.99e6) / 0.99e6 < 0.01, params
    # VGNetC learns the four downsampling depthwise kernels the Gaussians replace
    assert count_params(models.vgnetc_1_0mp()) - params == 9 * (28 + 56 + 112 + 224)


@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_maps_images_to_logits(name):
    factory = getattr(models, name)
    torch.manual_seed(0)
    for classes in (1000, 10):
        model = factory(num_classes=classes).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
    small = factory(num_classes=10, in_channels=1, small_input=True).eval()
    with torch.no_grad():
        out = small.features(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, small.head.pw.conv.out_channels, 4, 4)  # 28 → 28, 28, 14, 7, 4


def test_fixed_kernels_are_buffers_without_gradients():
    model = models.vgnetf_1_5mp(num_classes=10, in_channels=1, small_input=True).train()
    fixed = [m for m in model.modules() if isinstance(m, FixedDepthwiseConv2d)]
    # VGNetF: no learned depthwise conv left but the stride-1 first downsampling (reference)
    learned_dw = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert learned_dw == ["stage1.downsample.dw"]
    assert len(fixed) == 3 + (2 + 6 + 13 + 1) + 1  # downsampling ×3, half identities, head
    param_ids = {id(p) for p in model.parameters()}
    state = model.state_dict()
    names = {id(b): n for n, b in model.named_buffers()}
    for module in fixed:
        assert id(module.weight) not in param_ids and not module.weight.requires_grad
        assert names[id(module.weight)] in state
    model(torch.randn(4, 1, 28, 28)).logsumexp(1).sum().backward()
    assert all(m.weight.grad is None for m in fixed)
    assert all(p.grad is not None for p in model.parameters())
    # VGNetG: the strided downsampling blocks blur with the σ = 1 Gaussian, one per channel
    down = models.vgnetg_1_0mp().stage2.downsample.dw
    assert isinstance(down, FixedDepthwiseConv2d) and down.stride == 2
    assert torch.allclose(down.weight[5, 0].double(), gaussian_kernel((3, 3), 1.0))
    assert isinstance(models.vgnetg_1_0mp().head.dw, SharedDepthwiseConv2d)


def test_state_dict_round_trip_restores_fixed_kernels(tmp_path):
    torch.manual_seed(0)
    model = _tiny(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():  # make the BN statistics and a fixed kernel non-default
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        model.stage2.blocks[0].dw.weight.mul_(3)
    path = tmp_path / "vgnet.pt"
    torch.save(model.state_dict(), path)
    again = _tiny(num_classes=10).eval()
    again.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert torch.equal(again.stage2.blocks[0].dw.weight, model.stage2.blocks[0].dw.weight)


def test_onnx_export_passes_parity(tmp_path):
    torch.manual_seed(0)
    model = _tiny(num_classes=10, in_channels=1, small_input=True).eval()
    model.head.dw = SharedDepthwiseConv2d(48, t=8)  # the learned families' shared head too
    report = export_onnx(model, (1, 1, 28, 28), tmp_path / "vgnet.onnx")
    assert report.passed and report.dynamic_batch
    assert {c.inputs for c in report.checks} == {"random batch 1", "random batch 3"}


def test_half_identity_block_passes_half_its_channels_unchanged():
    torch.manual_seed(0)
    for kernels in ("learned", "edge", "edge_gaussian"):
        block = HalfIdentityBlock(16, kernels).eval()
        x = torch.randn(2, 16, 7, 7)
        with torch.no_grad():
            y = block(x)
        assert y.shape == x.shape
        assert torch.equal(y[:, :8], x[:, 8:])  # the identity half
        assert not torch.allclose(y[:, 8:], x[:, :8])
    # the downsampling block passes its blurred input channels on the same way
    down = DownsamplingBlock(8, 16, stride=2).eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(down(x)[:, :8], down.dw(x))
        assert down(x).shape == (1, 16, 4, 4)


def test_shared_depthwise_equals_chunked_reference():
    conv = SharedDepthwiseConv2d(16, t=4)
    x = torch.randn(1, 16, 5, 5)
    chunks = [torch.nn.functional.conv2d(c, conv.weight, None, 1, 1, 1, 4)
              for c in x.chunk(4, 1)]
    with torch.no_grad():
        assert torch.allclose(conv(x), torch.cat(chunks, 1), atol=1e-6)


# -- training from scratch with a recipe ---------------------------------------------------
def _recipe(tmp_path, **extra) -> dict:
    return {"model": SPEC, "input_shape": [1, 1, 16, 16],
            "arch_kwargs": {"num_classes": 10, "in_channels": 1, "small_input": True},
            "data": {"train": "synthetic:1x16x16:10", "limit_train": 32, "limit_val": 16},
            "epochs": 1, "batch_size": 16, "output": str(tmp_path / "run"),
            "export": {"enabled": False}, "bench": {"enabled": False}, **extra}


def test_recipe_trains_an_architecture_spec_from_scratch(tmp_path):
    recipe = parse_recipe(_recipe(tmp_path, distillation=None))
    summary = run(recipe, tmp_path / "run", World())
    step = summary["steps"]["finetune"]
    assert step["best_top1"] >= step["initial_top1"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert [x["epoch"] for x in lines] == [0, 1] and lines[1]["train_loss"] > 0
    from bscompress.io.archive import load_model

    out = load_model(tmp_path / "run" / "model.pt")
    assert out.arch.spec == SPEC and isinstance(out.model, VGNet)
    assert out.model.stem.conv.in_channels == 1


def test_recipe_refuses_a_random_teacher(tmp_path):
    recipe = parse_recipe(_recipe(tmp_path))  # the default distillation, no teacher
    with pytest.raises(BadInput, match="distillation: null"):
        run(recipe, tmp_path / "run", World())
    assert not (tmp_path / "run").exists()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path)))
    result = CliRunner().invoke(app, ["finetune", SPEC, "-r", str(path), "--arch-kwargs",
                                      '{"num_classes": 10, "in_channels": 1}'])
    assert result.exit_code == 2 and "distillation: null" in result.stderr
