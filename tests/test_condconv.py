"""CondConv: the layer against a per-example loop of plain convs, upcycling that leaves the
output unchanged, archives, ONNX parity, MAC counts and the ``upcycle`` command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.decomposition import decompose
from bscompress.core.errors import BadInput
from bscompress.core.stats import module_macs
from bscompress.deploy.export import export_onnx
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load_model, save_archive
from bscompress.layers.condconv import ROUTINGS, CondConv2d
from bscompress.methods import RankOptions
from bscompress.transforms.upcycle import UpcycleOptions, select_targets, upcycle
from tests.nets import INPUT_SHAPE, TinyNet

NETS_SPEC = f"{Path(__file__).parent / 'nets.py'}:TinyNet"


def _loop_oracle(cc: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    """One plain ``nn.Conv2d`` per example, holding that example's mixed kernel."""
    weight, bias = cc.to_dense(x)
    outputs = []
    for i in range(x.shape[0]):
        conv = nn.Conv2d(cc.in_channels, cc.out_channels, cc.kernel_size, cc.stride,
                         cc.padding, cc.dilation, cc.groups, bias is not None, cc.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(weight[i])
            if bias is not None:
                conv.bias.copy_(bias[i])
        outputs.append(conv(x[i:i + 1]))
    return torch.cat(outputs)


GEOMETRIES = {  # in, out, kernel, stride, padding, dilation, groups, padding_mode
    "3x3": (8, 6, 3, 1, 1, 1, 1, "zeros"),
    "strided grouped reflect": (8, 6, 3, 2, 1, 1, 2, "reflect"),
    "depthwise": (8, 8, 3, 2, 1, 1, 8, "zeros"),
    "dilated 5x3 circular": (4, 4, (5, 3), 1, (4, 2), 2, 1, "circular"),
    "pointwise": (8, 16, 1, 1, 0, 1, 1, "zeros"),
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_condconv_equals_a_per_example_loop(geometry, routing, batch):
    torch.manual_seed(0)
    cin, cout, k, s, p, d, g, mode = geometry
    cc = CondConv2d(cin, cout, k, s, p, d, g, True, mode, experts=3, routing=routing)
    with torch.no_grad():  # a non-trivial router
        cc.router.fc.weight.normal_()
    x = torch.randn(batch, cin, 11, 9)
    expected = _loop_oracle(cc, x)
    assert torch.allclose(cc(x), expected, atol=1e-5)
    # channels_last input, and the export form (im2col + batched matmul)
    assert torch.allclose(cc(x.to(memory_format=torch.channels_last)), expected, atol=1e-5)
    weight, bias = cc.kernels(cc.gates(x))
    padded, padding = cc._pad(x)
    unfolded = cc._unfold_forward(padded, weight, padding) + bias[:, :, None, None]
    assert torch.allclose(unfolded, expected, atol=1e-5)


def test_gates_follow_their_routing():
    torch.manual_seed(0)
    cc = CondConv2d(4, 4, 3, padding=1, experts=5, routing="softmax")
    x = torch.randn(6, 4, 5, 5)
    assert torch.allclose(cc.gates(x).sum(1), torch.ones(6))
    cc.router.routing = "normalized-sigmoid"
    assert torch.allclose(cc.gates(x).sum(1), torch.ones(6))
    cc.router.routing = "sigmoid"
    gates = cc.gates(x)
    assert torch.allclose(gates, torch.sigmoid(cc.router.fc(x.mean((2, 3)))))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_from_conv_is_exact(routing):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2)
    cc = CondConv2d.from_conv(conv, experts=4, routing=routing)
    x = torch.randn(3, 6, 9, 9)
    assert torch.allclose(cc(x), conv(x), atol=1e-5)
    noisy = CondConv2d.from_conv(conv, experts=4, routing=routing, noise=0.1)
    assert not torch.allclose(noisy(x), conv(x), atol=1e-3)


def test_random_routing_breaks_the_experts_symmetry():
    """Equal experts with different gates per example get different gradients."""
    torch.manual_seed(0)
    cc = CondConv2d.from_conv(nn.Conv2d(4, 4, 1), experts=3)
    loss = cc(torch.randn(8, 4, 5, 5)).square().sum()
    loss.backward()
    grads = cc.weight.grad
    assert not torch.allclose(grads[0], grads[1]) and cc.router.fc.weight.grad is not None


def test_macs_count_the_conv_the_router_and_the_mix():
    cc = CondConv2d(8, 16, 3, padding=1, groups=2, experts=4)
    conv = 16 * 4 * 9 * 10 * 10
    router, mix = 8 * 4, 4 * (16 * 4 * 9) + 4 * 16  # FC; kernels and biases mixed
    assert module_macs(cc, (1, 8, 10, 10)).macs == conv + router + mix


# -- upcycling -----------------------------------------------------------------------------
def _factorized(method: str = "tucker2"):
    torch.manual_seed(0)
    return decompose(TinyNet(width=16), method, INPUT_SHAPE, RankOptions())


def test_default_targets_are_the_pointwise_convs_of_the_blocks():
    model, plan = _factorized("bsconv-s")
    targets = select_targets(model, plan, UpcycleOptions())
    assert targets and all(t.rsplit(".", 1)[1] in ("pw1", "pw2") for t in targets)
    assert "features.5" not in targets  # a plain 1×1 outside the blocks
    plain = TinyNet()
    assert select_targets(plain, None, UpcycleOptions()) == ["features.5"]
    chosen = select_targets(plain, None, UpcycleOptions(include=("features.0", "stem")))
    assert chosen == ["stem", "features.0"]
    assert select_targets(plain, None, UpcycleOptions(include=("features.*",),
                                                       exclude=("features.4",))) == [
        "features.0", "features.2", "features.5"]


@pytest.mark.parametrize("method", ["tucker2", "bsconv-s", "cp", "dsc"])
@pytest.mark.parametrize("routing,shared", [("normalized-sigmoid", False), ("softmax", True),
                                            ("sigmoid", False)])
def test_upcycling_leaves_the_output_unchanged_and_reloads(tmp_path, method, routing, shared):
    model, plan = _factorized(method)
    reference = copy.deepcopy(model).eval()
    options = UpcycleOptions(experts=3, routing=routing, share_routing=shared)
    model, plan = upcycle(model, INPUT_SHAPE, options, plan)
    model.eval()
    x = torch.randn(4, *INPUT_SHAPE[1:])
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    blocks = [e for e in plan.replaced() if e.modifiers]
    assert blocks and all(e.modifiers[0]["kind"] == "condconv" for e in blocks)
    assert all(e.params_after > 0 and e.macs_after > 0 for e in blocks)
    if shared:  # one router per block
        routers = [n for n, _ in model.named_modules() if n.endswith(".router")]
        assert len(routers) == len(blocks)
    path = tmp_path / "up.pt"
    save_archive(path, model, ArchSpec(NETS_SPEC), plan)
    again = load_model(path)
    assert torch.allclose(again.model(x), model(x), atol=1e-6)


def test_upcycling_a_plain_model_adds_condconv_entries(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    reference = copy.deepcopy(model)
    model, plan = upcycle(model, INPUT_SHAPE, UpcycleOptions(include=("features.0",
                                                                       "features.5")))
    entries = {e.name: e for e in plan.replaced()}
    assert set(entries) == {"features.0", "features.5"}
    assert entries["features.0"].method == "condconv"
    assert entries["features.0"].params_after > 4 * entries["features.0"].params_before
    assert plan.summary.macs_after > plan.summary.macs_before
    x = torch.randn(2, *INPUT_SHAPE[1:])
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    path = tmp_path / "plain.pt"
    save_archive(path, model, ArchSpec(NETS_SPEC), plan)
    assert torch.allclose(load_model(path).model(x), model(x), atol=1e-6)


def test_bad_upcycle_options_are_one_sentence():
    with pytest.raises(BadInput, match="--experts must be at least 2"):
        UpcycleOptions(experts=1)
    with pytest.raises(BadInput, match="--routing 'gumbel' is unknown"):
        UpcycleOptions(routing="gumbel")
    with pytest.raises(BadInput, match="no Conv2d matching --include"):
        upcycle(TinyNet(), INPUT_SHAPE, UpcycleOptions(include=("nothing*",)))


def test_upcycled_archive_exports_with_parity(tmp_path):
    model, plan = _factorized("bsconv-s")
    model, plan = upcycle(model, INPUT_SHAPE, UpcycleOptions(experts=2, share_routing=True),
                          plan)
    with torch.no_grad():  # experts that differ, so the mixture is really per example
        for module in model.modules():
            if isinstance(module, CondConv2d):
                module.weight.mul_(torch.rand_like(module.weight) + 0.5)
    report = export_onnx(model.eval(), INPUT_SHAPE, tmp_path / "up.onnx")
    assert report.passed and {c.inputs for c in report.checks} >= {"random batch 1"}
    assert any("batch 3" in c.inputs for c in report.checks)  # dynamic batch


# -- the command ---------------------------------------------------------------------------
def test_cli_upcycle_writes_an_exact_archive(tmp_path):
    model, plan = _factorized("tucker2")
    archive = tmp_path / "tucker.pt"
    save_archive(archive, model, ArchSpec(NETS_SPEC), plan)
    out = tmp_path / "up.pt"
    runner = CliRunner()
    result = runner.invoke(app, ["upcycle", str(archive), "-o", str(out), "--experts", "3",
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["meta"]["upcycle"]["max_relative_change"] < 1e-5
    assert load_model(out).plan.summary.upcycle.experts == 3
    table = runner.invoke(app, ["upcycle", str(archive), "-o", str(out), "--force"])
    assert table.exit_code == 0 and "condconv×4(pw1, pw2)" in table.stdout
    again = runner.invoke(app, ["upcycle", str(out), "-o", str(tmp_path / "twice.pt")])
    assert again.exit_code == 2 and "already upcycled" in again.stderr
    none = runner.invoke(app, ["upcycle", str(archive), "-o", str(tmp_path / "none.pt"),
                               "--include", "nope"])
    assert none.exit_code == 2 and "--include" in none.stderr
    for bad in (["--routing", "gumbel"], ["--experts", "1"]):
        res = runner.invoke(app, ["upcycle", str(archive), "-o", str(tmp_path / "b.pt"), *bad])
        assert res.exit_code == 2
    assert not any((tmp_path / n).exists() for n in ("twice.pt", "none.pt", "b.pt"))


def test_unfold_form_matches_f_conv2d_on_a_real_conv():
    """The export path alone, against ``F.conv2d`` with a single expert (no routing effect)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False)
    cc = CondConv2d.from_conv(conv, experts=2)
    x = torch.randn(2, 6, 8, 8)
    weight, _ = cc.kernels(cc.gates(x))
    assert torch.allclose(cc._unfold_forward(x, weight, cc.padding),
                          F.conv2d(x, conv.weight, None, 2, 1), atol=1e-5)


def test_a_recipe_runs_decompose_fixed_kernels_upcycle_and_finetune(tmp_path):
    import yaml

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), ckpt)
    recipe = tmp_path / "up.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(ckpt), "arch": NETS_SPEC, "input_shape": list(INPUT_SHAPE),
        "data": {"train": "synthetic:3x16x16:10", "limit_train": 48, "limit_val": 16},
        "decompose": {"method": "bsconv-s", "fixed_kernels": "bank", "match": 0.5},
        "upcycle": {"experts": 2, "share_routing": True},
        "epochs": 1, "batch_size": 16, "bench": {"enabled": False}}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--trust-code",
                                      str(recipe), "--output-dir", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"]["upcycle"]["convs"] > 0 and summary["steps"]["export"]["passed"]
    model = load_model(out / "model.pt")
    assert model.plan.summary.upcycle.experts == 2 and model.plan.summary.fixed_kernels
    assert any(isinstance(m, CondConv2d) for m in model.model.modules())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"train": "demo"}, "upcycle": {"experts": 1}}))
    refused = CliRunner().invoke(app, ["run", "--trust-code", str(bad)])
    assert refused.exit_code == 2 and "upcycle.experts" in refused.stderr


def test_a_trained_upcycled_model_holds_no_graph_between_passes():
    """Shared gates are dropped once read, so a model can be deep-copied after a backward."""
    model, plan = _factorized("bsconv-s")
    model, _ = upcycle(model, INPUT_SHAPE, UpcycleOptions(share_routing=True), plan)
    model.train()
    model(torch.randn(2, *INPUT_SHAPE[1:])).sum().backward()
    assert all(m._last_gates is None for m in model.modules() if isinstance(m, CondConv2d))
    copy.deepcopy(model)


def test_experts_learn_at_a_rate_that_compensates_their_gates():
    from bscompress.core.recipe import Optimizer
    from bscompress.train.finetune import param_groups

    model, plan = _factorized("tucker2")
    model, plan = upcycle(model, INPUT_SHAPE, UpcycleOptions(experts=4), plan)

    def expert_scale(config):
        groups = param_groups(model, plan, config)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        return {g["lr_scale"] for g in groups if g["name"] == "factor experts"}

    assert expert_scale(Optimizer(lr=0.1)) == {4.0}  # SGD: gates summing to 1 share it
    assert expert_scale(Optimizer(name="adamw", lr=0.1)) == {1.0}
    assert expert_scale(Optimizer(lr=0.1, expert_lr=2.0, factor_lr=0.5)) == {1.0}
