"""Recipes and fine-tuning: validation messages, the distillation loss, learning, exact
resume after a signal, DistributedDataParallel with gloo, and the CLI commands."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.compress.decomposition import decompose
from bscompress.core.errors import BadInput
from bscompress.core.plan import Plan
from bscompress.core.recipe import Optimizer, Schedule, parse_recipe
from bscompress.core.records import ReconstructionRecord, Summary
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load_model, save_archive
from bscompress.methods import RankOptions
from bscompress.train.finetune import (
    Interrupted,
    Trainer,
    distillation_loss,
    ema_update,
    feature_loss,
    joined_world,
    lr_factor,
    param_groups,
    training_outputs,
)
from tests.nets import INPUT_SHAPE, TinyNet

NETS = Path(__file__).parent / "nets.py"
NETS_SPEC = f"{NETS}:TinyNet"
SYNTHETIC = "synthetic:3x16x16:10"


# -- recipes -------------------------------------------------------------------------------
@pytest.mark.parametrize("data,message", [
    ({"data": {"train": "demo"}, "epocs": 1},
     "unknown key 'epocs' in the top level; valid keys are: name, model"),
    ({"data": {"train": "demo"}, "optimizer": {"nmae": "sgd"}},
     "unknown key 'nmae' in optimizer; valid keys are: name, lr, momentum"),
    ({"data": {"train": "demo"}, "decompose": {"calibration": {"sampels": 3}}},
     "unknown key 'sampels' in decompose.calibration"),
    ({"data": {"train": "demo"},
      "decompose": {"calibration": {"reconstruct": {"step": 10}}}},
     "unknown key 'step' in decompose.calibration.reconstruct; valid keys are: steps, lr"),
    ({"data": {"train": "demo"}, "epochs": "three"}, "'epochs' must be an integer, got 'three'"),
    ({"data": {"train": "demo"}, "channels_last": "maybe"},
     "'channels_last' must be true or false"),
    ({"data": {"train": "demo"}, "optimizer": {"name": "adam"}},
     "'optimizer.name' must be 'sgd' or 'adamw'"),
    ({"epochs": 1}, "'data' is required"),
    ([1, 2], "a recipe is a YAML mapping"),
])
def test_recipe_errors_name_the_key_and_the_fix(data, message):
    with pytest.raises(BadInput) as err:
        parse_recipe(data)
    assert message in str(err.value)


def test_shipped_recipes_validate():
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert {p.name for p in recipes} >= {"fmnist-bsconvu-kd.yaml",
                                          "cifar10-resnet18-bsconvs.yaml",
                                          "imagenet-resnet50-bsconvu.yaml"}
    for path in recipes:
        parse_recipe(yaml.safe_load(path.read_text()), str(path))


# -- the math ------------------------------------------------------------------------------
def test_distillation_loss_is_its_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, alpha = 3.0, 0.7
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean()
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * T * T * kl
    assert torch.allclose(distillation_loss(s, t, y, T, alpha), expected, atol=1e-6)
    assert torch.allclose(distillation_loss(s, None, y, T, alpha), F.cross_entropy(s, y))
    assert torch.allclose(distillation_loss(s, s, y, T, 1.0), torch.zeros(()), atol=1e-6)


def test_feature_loss_is_the_mean_relative_error():
    torch.manual_seed(0)
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5)]
    s = [t[0] + 0.1, t[1] * 0.5]
    expected = ((0.1 ** 2 * t[0].numel()) / t[0].square().sum()
                + 0.25 * t[1].square().sum() / t[1].square().sum()) / 2
    assert torch.allclose(feature_loss(s, t), expected, atol=1e-6)
    assert float(feature_loss(t, t)) == 0.0


def test_schedule_warms_up_then_decays():
    cosine = Schedule(name="cosine", warmup_epochs=1)
    factors = [lr_factor(cosine, step, 10, 3) for step in range(30)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.01
    step = Schedule(name="step", warmup_epochs=0, step_epochs=1, gamma=0.5)
    assert [lr_factor(step, s, 10, 3) for s in (0, 10, 25)] == [1.0, 0.5, 0.25]


def test_factor_layers_get_their_own_learning_rates():
    torch.manual_seed(0)
    config = Optimizer(lr=0.1, factor_lr=0.5, cp_lr=0.01)
    for method, kind, lr in (("cp", "cp", 0.001), ("bsconv-u", "factor", 0.05)):
        model, plan = decompose(TinyNet(width=16), method, INPUT_SHAPE, RankOptions())
        groups = {g["name"]: g for g in param_groups(model, plan, config)}
        assert groups[kind]["lr"] == pytest.approx(lr)
        assert groups["base"]["lr"] == pytest.approx(0.1)
        assert groups["base (no decay)"]["weight_decay"] == 0.0
        assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


# -- training ------------------------------------------------------------------------------
class DropNet(nn.Module):
    """Conv, BN, dropout: every stateful piece a resume must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop(self.bn(self.conv(x)).relu())
        return self.fc(x.mean((2, 3)))


def _data(n=96):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def _recipe(**extra):
    return parse_recipe({"data": {"train": SYNTHETIC}, "epochs": 2, "batch_size": 16,
                         "optimizer": {"lr": 0.05}, "distillation": None,
                         "transforms": {"flip": True, "pad": 1}, **extra})


def _trainer(tmp_path, recipe, saved):
    torch.manual_seed(1)
    return Trainer(DropNet(), None, recipe, _data(), _data(32), tmp_path,
                   lambda model, top1: saved.append(top1))


def test_a_short_run_lowers_the_loss(tmp_path):
    saved: list = []
    trainer = _trainer(tmp_path, _recipe(epochs=3), saved)
    x, y = _data().tensors
    with torch.no_grad():
        before = float(F.cross_entropy(trainer.model.eval()(x), y))
    result = trainer.fit()
    with torch.no_grad():
        after = float(F.cross_entropy(trainer.model.eval()(x), y))
    assert after < before
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    assert result.best_top1 == max(line["val_top1"] for line in lines) and saved


@pytest.mark.parametrize("extra", [{}, {"ema": 0.9, "freeze_bn": True}],
                         ids=["plain", "ema+frozen-bn"])
def test_resume_after_a_signal_gives_the_same_weights(tmp_path, extra):
    recipe = _recipe(epochs=2, **extra)
    whole = _trainer(tmp_path / "a", recipe, [])
    whole.fit()
    stopped = _trainer(tmp_path / "b", recipe, [])
    with pytest.raises(Interrupted):
        stopped.fit(interrupt_after=8)  # mid second epoch (6 steps per epoch)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    torch.manual_seed(123)  # a resumed process starts from another global RNG state
    resumed = _trainer(tmp_path / "b", recipe, [])
    result = resumed.fit(resume=True)
    assert len(result.seconds_per_epoch) == 2  # the first epoch's time, from the first run
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if "ema" in extra:
        for (name, a), b in zip(whole.ema.state_dict().items(),
                                resumed.ema.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    history = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]


class AuxNet(DropNet):
    """GoogLeNet's and Inception v3's contract: in training mode a namedtuple (logits, aux
    logits), in eval mode the logits."""

    Outputs = collections.namedtuple("Outputs", ["logits", "aux"])

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 4)

    def forward(self, x):
        features = self.drop(self.bn(self.conv(x)).relu()).mean((2, 3))
        if self.training:
            return self.Outputs(self.fc(features), self.aux(features))
        return self.fc(features)


def test_the_training_outputs_are_the_logits_and_the_auxiliary_classifiers():
    logits, aux, other = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 7)
    assert training_outputs(logits) == (logits, [])
    found = training_outputs(AuxNet.Outputs(logits, aux))
    assert found[0] is logits and found[1] == [aux]
    found = training_outputs({"out": logits, "aux": aux, "features": other})
    assert found[0] is logits and found[1] == [aux]
    with pytest.raises(BadInput, match="no tensor in it"):
        training_outputs(("text",))


def test_a_model_with_auxiliary_classifiers_fine_tunes_them_too(tmp_path):
    """torchvision's GoogLeNet with aux_logits ended fine-tuning in an internal error: its
    training-mode output is a namedtuple. The aux heads now train on the labels."""
    torch.manual_seed(1)
    model = AuxNet()
    head = model.aux.weight.detach().clone()
    trainer = Trainer(model, None, _recipe(epochs=1), _data(), _data(32), tmp_path,
                      lambda model, top1: None)
    trainer.fit()
    assert not torch.equal(head, trainer.model.aux.weight)  # its loss reached the aux head


def test_ema_update_is_the_warmed_up_moving_average():
    model = nn.Linear(3, 2)
    average = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(0.5),
                                                  use_buffers=True)
    expected = None
    for n in range(5):
        with torch.no_grad():
            model.weight.add_(float(n + 1))
        average.update_parameters(model)
        if expected is None:  # the first update copies
            expected = model.weight.detach().clone()
        else:  # decay min(0.5, (1 + k)/(10 + k)) after k averages
            d = min(0.5, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * model.weight.detach()
        assert torch.allclose(average.module.weight, expected)


def test_ema_is_the_model_evaluated_and_kept(tmp_path):
    saved: list = []
    trainer = Trainer(DropNet(), None, _recipe(epochs=1, ema=0.9), _data(), _data(32),
                      tmp_path, lambda model, top1: saved.append(model))
    trainer.fit()
    assert saved[-1] is trainer.ema.module
    assert not torch.equal(trainer.ema.module.conv.weight, trainer.model.conv.weight)


def test_frozen_batchnorm_keeps_its_statistics_and_trains_its_affine(tmp_path):
    trainer = _trainer(tmp_path, _recipe(epochs=1, freeze_bn=True, bn_reestimate=False), [])
    bn = trainer.model.bn
    mean, var, weight = (t.detach().clone() for t in (bn.running_mean, bn.running_var,
                                                      bn.weight))
    trainer.fit()
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not torch.equal(bn.weight, weight)


@pytest.mark.parametrize("reconstructed,setting,moved", [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)])
def test_batchnorm_is_re_estimated_unless_the_blocks_were_reconstructed(
        tmp_path, reconstructed, setting, moved):
    plan = Plan(layers=[], input_shape=[1, 3, 16, 16],
                summary=Summary(reconstruction=ReconstructionRecord(steps=1, lr=1e-3))
                if reconstructed else Summary())
    torch.manual_seed(1)
    trainer = Trainer(DropNet(), plan, _recipe(epochs=1, bn_reestimate=setting), _data(),
                      _data(32), tmp_path, lambda model, top1: None)
    mean = trainer.model.bn.running_mean.clone()
    trainer._begin()
    assert torch.equal(trainer.model.bn.running_mean, mean) is not moved


def test_a_resume_refuses_another_recipe(tmp_path):
    trainer = _trainer(tmp_path, _recipe(epochs=1), [])
    trainer.fit()
    other = _trainer(tmp_path, _recipe(epochs=1, seed=5), [])
    with pytest.raises(BadInput, match="different recipe"):
        other.fit(resume=True)


# -- the commands --------------------------------------------------------------------------
def _archive(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    base = TinyNet(width=16)
    ckpt = tmp_path / "tiny.pt"
    torch.save(base.state_dict(), ckpt)
    model, plan = decompose(base, "bsconv-u", INPUT_SHAPE, RankOptions(rank=1))
    archive = tmp_path / "tiny.bsc.pt"
    save_archive(archive, model, ArchSpec(NETS_SPEC), plan,
                 source_sha256=load_model(ckpt, arch=NETS_SPEC).sha256)
    return ckpt, archive


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_finetune_writes_the_best_archive_and_resumes(tmp_path):
    ckpt, archive = _archive(tmp_path)
    recipe = _write(tmp_path, "r.yaml", {
        "model": str(ckpt), "arch": NETS_SPEC, "data": {"train": SYNTHETIC, "limit_train": 64,
                                                        "limit_val": 32},
        "distillation": {"features": 1.0},  # layer-wise: hooks on both models
        "epochs": 1, "batch_size": 16, "output": str(tmp_path / "run")})
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "--trust-code",
                                 str(archive), "-r", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["best_top1"] >= summary["initial_top1"]
    out = load_model(summary["output"])
    assert out.is_archive and out.metadata["finetune"]["val_top1"] == summary["best_top1"]
    again = runner.invoke(app, ["finetune", "--trust-code", str(archive), "-r", str(recipe)])
    assert again.exit_code == 2 and "--resume" in again.stderr
    done = runner.invoke(app, ["finetune", "--trust-code",
                               str(archive), "-r", str(recipe), "--resume"])
    assert done.exit_code == 0, done.stderr  # nothing left to train: the same best model
    over = runner.invoke(app, ["finetune", "--trust-code",
                               str(archive), "-r", str(recipe), "-o", str(archive),
                               "--force"])
    assert over.exit_code == 2 and "input" in over.stderr  # never over the model trained
    other = _write(tmp_path, "o.yaml", {"model": str(tmp_path / "missing.pt"),
                                         "data": {"train": SYNTHETIC}, "epochs": 1,
                                         "output": str(tmp_path / "run2")})
    bad = runner.invoke(app, ["finetune", "--trust-code", str(archive), "-r", str(other)])
    assert bad.exit_code == 2 and "missing.pt" in bad.stderr  # the teacher


@pytest.mark.parametrize("data,message", [
    ({"data": {"train": SYNTHETIC}, "epoch": 1}, "unknown key 'epoch'"),
    ({"data": {"train": SYNTHETIC}, "batch_size": "big"}, "'batch_size' must be an integer"),
    ({"data": {"train": "fashion-mnist:/nowhere"}}, "recipe data.train"),
])
def test_cli_rejects_bad_recipes_before_writing(tmp_path, data, message):
    ckpt, archive = _archive(tmp_path)
    recipe = _write(tmp_path, "bad.yaml", {**data, "output": str(tmp_path / "run"),
                                           "model": str(ckpt), "arch": NETS_SPEC,
                                           "distillation": None})
    for args in (["finetune", "--trust-code",
                  str(archive), "-r", str(recipe)], ["run", "--trust-code", str(recipe)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "run").exists()
    missing = CliRunner().invoke(app, ["run", "--trust-code", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


@pytest.mark.slow  # decompose, fine-tune, export and bench end to end: 10 s
def test_cli_run_produces_the_results_folder(tmp_path):
    ckpt, _ = _archive(tmp_path)
    recipe = _write(tmp_path, "run.yaml", {
        "model": str(ckpt), "arch": NETS_SPEC, "input_shape": list(INPUT_SHAPE),
        "data": {"train": SYNTHETIC, "limit_train": 64, "limit_val": 32},
        "decompose": {"method": "auto", "budget": "macs=0.6",
                      "calibration": {"samples": 32, "batch": 16}},
        "epochs": 1, "batch_size": 16, "bench": {"runs": 2, "batch": 4}})
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["run", "--trust-code",
                                      str(recipe), "--output-dir", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert names >= {"decomposed.pt", "model.pt", "model.onnx", "report.json", "report.md",
                     "report.png", "metrics.jsonl", "run.json", "checkpoint.pt"}
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"]["export"]["passed"]
    assert summary["steps"]["finetune"]["best_top1"] >= summary["steps"]["finetune"][
        "initial_top1"]
    again = CliRunner().invoke(app, ["run", "--trust-code", str(recipe), "--output-dir", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr


def test_a_single_process_world_has_no_group_to_join(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined_world("cpu") as world:
        assert (world.rank, world.size, world.device.type) == (0, 1, "cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow  # two processes: alone in the slow tier, not beside an xdist worker
def test_torchrun_ddp_with_two_gloo_processes(tmp_path):
    ckpt, archive = _archive(tmp_path)
    recipe = _write(tmp_path, "ddp.yaml", {
        "model": str(ckpt), "arch": NETS_SPEC,
        "data": {"train": SYNTHETIC, "limit_train": 64, "limit_val": 32},
        "epochs": 2, "batch_size": 8, "output": str(tmp_path / "ddp")})
    torchrun = Path(sys.executable).with_name("torchrun")  # installed with torch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(NETS.parents[1])}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "bscompress",
         "finetune", "--trust-code", str(archive), "-r", str(recipe), "--device", "cpu",
         "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # the ranks released the group together
    summary = json.loads(proc.stdout)  # rank 0 alone prints
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]  # rank 0 alone logs
    # 64 samples over 2 processes of batch 8: 4 steps per epoch each
    assert load_model(summary["output"]).is_archive


@pytest.mark.slow  # two processes
def test_ranks_launched_with_different_recipes_exit_2(tmp_path):
    """Each rank read its own recipe (steps_per_epoch 2 against 4): both trained on, their
    all-reduces pairing up different steps; now every rank names the difference."""
    import socket

    ckpt, archive = _archive(tmp_path)
    recipes = [_write(tmp_path, f"r{steps}.yaml", {
        "model": str(ckpt), "arch": NETS_SPEC, "steps_per_epoch": steps,
        "data": {"train": SYNTHETIC, "limit_train": 64, "limit_val": 32},
        "epochs": 1, "batch_size": 8, "output": str(tmp_path / "ddp")}) for steps in (2, 4)]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank, recipe in enumerate(recipes):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(NETS.parents[1]),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bscompress", "finetune", "--trust-code", str(archive),
             "-r", str(recipe), "--device", "cpu"], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert "were given different recipes" in err
    assert not (tmp_path / "ddp" / "model.pt").exists()


def test_cli_finetune_builds_a_spec_with_the_recipes_arch_kwargs(tmp_path):
    recipe = _write(tmp_path, "scratch.yaml", {
        "model": NETS_SPEC, "arch_kwargs": {"num_classes": 4, "width": 8},
        "input_shape": list(INPUT_SHAPE), "distillation": None,
        "data": {"train": "synthetic:3x16x16:4", "limit_train": 32, "limit_val": 16},
        "epochs": 1, "batch_size": 16, "output": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["finetune", "--trust-code",
                                      NETS_SPEC, "-r", str(recipe), "--json"])
    assert result.exit_code == 0, result.stderr
    model = load_model(json.loads(result.stdout)["output"]).model
    assert model.fc.out_features == 4 and model.stem.out_channels == 8


def test_an_explicit_teacher_overrides_the_original_in_run(tmp_path):
    """``bscompress run`` distils from the model before decomposition unless the recipe's
    ``distillation.teacher`` names another one."""
    from bscompress.app.pipeline import load_teacher

    ckpt, archive = _archive(tmp_path)
    torch.manual_seed(1)
    other = tmp_path / "teacher.pt"
    torch.save(TinyNet(width=16).state_dict(), other)
    loaded = load_model(archive)
    original = load_model(ckpt, arch=NETS_SPEC).model
    base = {"model": str(ckpt), "arch": NETS_SPEC, "data": {"train": SYNTHETIC}}
    assert load_teacher(parse_recipe(base), loaded, original) is original
    chosen = load_teacher(parse_recipe({**base, "distillation": {"teacher": str(other)}}),
                          loaded, original)
    expected = torch.load(other, weights_only=True)
    assert chosen is not original
    assert all(torch.equal(chosen.state_dict()[k], v) for k, v in expected.items())
    assert load_teacher(parse_recipe({**base, "distillation": None}), loaded, original) is None
