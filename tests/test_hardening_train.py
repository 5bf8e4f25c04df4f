"""Hardening of ``finetune`` and ``run`` (issue 18): outputs never replace an input, a
diverged fine-tune stops with exit 1 and valid JSON, every check runs before the run folder
is made, bad recipe files exit 2, a resume refuses another model or recipe, and
interruptions leave folders that the next command accepts.

Every bad input asserts the exit code, a word of the message, and that no file under the
test folder changed or appeared (a snapshot of names and SHA-256)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.app.pipeline import RUN_MARK
from bscompress.compress.decomposition import decompose
from bscompress.core.errors import CheckFailed
from bscompress.core.recipe import parse_recipe
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import load_model, save_archive
from bscompress.methods import RankOptions
from bscompress.train.finetune import Trainer
from tests.nets import INPUT_SHAPE, TinyNet

NETS = Path(__file__).parent / "nets.py"
NETS_SPEC = f"{NETS}:TinyNet"
SYNTHETIC = "synthetic:3x16x16:10"
ROOT = Path(__file__).parents[1]


def invoke(*args):
    """The command line; ``finetune`` and ``run`` with ``--trust-code``: the recipes here name
    this suite's own network file (tests/nets.py) as their arch."""
    extra = ["--trust-code"] if args and args[0] in ("finetune", "run") else []
    return CliRunner().invoke(app, [str(args[0]), *extra, *(str(a) for a in args[1:])])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: its name and content digest."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = ("dir" if path.is_dir() and not path.is_symlink()
                      else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    """A tiny checkpoint and its decomposed archive."""
    torch.manual_seed(0)
    base = TinyNet(width=8)
    ckpt = tmp_path / "tiny.pt"
    torch.save(base.state_dict(), ckpt)
    model, plan = decompose(base, "bsconv-u", INPUT_SHAPE, RankOptions(rank=1))
    archive = tmp_path / "tiny.bsc.pt"
    save_archive(archive, model, ArchSpec(NETS_SPEC, {"width": 8}), plan,
                 source_sha256=load_model(ckpt, arch=NETS_SPEC,
                                          arch_kwargs={"width": 8}).sha256)
    return ckpt, archive


def recipe_file(path: Path, **fields) -> Path:
    data = {"arch": NETS_SPEC, "arch_kwargs": {"width": 8},
            "data": {"train": SYNTHETIC, "limit_train": 32, "limit_val": 16},
            "epochs": 1, "batch_size": 16, "bn_reestimate": False,
            "export": {"enabled": False}, "bench": {"enabled": False}, **fields}
    path.write_text(yaml.safe_dump(data))
    return path


# -- 1. outputs never replace an input -----------------------------------------------------
@pytest.mark.parametrize("target", ["teacher", "recipe", "link-to-teacher", "in-data",
                                    "run-best"])
def test_finetune_never_writes_over_an_input(tmp_path, tiny, target):
    ckpt, archive = tiny
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(ckpt, teacher)
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    (images / "a" / "x.png").write_bytes(b"not read: the guard comes first")
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(tmp_path / "run"),
                         distillation={"teacher": str(teacher)},
                         data={"train": SYNTHETIC, "val": f"imagefolder:{images}"})
    (tmp_path / "link.pt").symlink_to(teacher)
    model = archive
    if target == "run-best":  # the model trained sits where the run keeps its best model
        (tmp_path / "run").mkdir()
        model = tmp_path / "run" / "best.pt"
        shutil.copyfile(archive, model)
    out = {"teacher": teacher, "recipe": recipe, "link-to-teacher": tmp_path / "link.pt",
           "in-data": images / "a" / "model.pt", "run-best": tmp_path / "other.pt"}[target]
    before = snapshot(tmp_path)
    result = invoke("finetune", model, "-r", recipe, "-o", out, "--force")
    assert result.exit_code == 2, result.stderr
    assert "input" in result.stderr and "internal error" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["model.pt", "decomposed.pt", "checkpoint.pt", "run.json"])
def test_run_never_writes_over_its_model(tmp_path, tiny, name):
    ckpt, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    model = out / name
    shutil.copyfile(ckpt, model)
    recipe = recipe_file(tmp_path / "r.yaml", model=str(model), distillation=None)
    before = snapshot(tmp_path)
    result = invoke("run", recipe, "--output-dir", out, "--force")
    assert result.exit_code == 2 and "input" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_run_folder_inside_a_data_folder_is_refused(tmp_path, tiny):
    ckpt, _ = tiny
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), distillation=None,
                         data={"train": SYNTHETIC, "val": f"imagefolder:{images}"})
    before = snapshot(tmp_path)
    result = invoke("run", recipe, "--output-dir", images / "run")
    assert result.exit_code == 2 and "input" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


# -- 2. a diverged fine-tune ---------------------------------------------------------------
def test_a_diverged_finetune_exits_1_and_keeps_the_best_model(tmp_path, tiny):
    ckpt, archive = tiny
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(tmp_path / "run"),
                         distillation=None, optimizer={"lr": 1e30, "momentum": 0.0},
                         schedule={"name": "constant", "warmup_epochs": 0})
    result = invoke("finetune", archive, "-r", recipe, "--json")
    assert result.exit_code == 1, result.stderr
    assert "diverged" in result.stderr and "optimizer.lr" in result.stderr
    assert "grad_clip" in result.stderr
    run = tmp_path / "run"
    lines = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["epoch"] == 0  # the start, and no record of a diverged epoch
    best = load_model(run / "best.pt").model  # the start: finite, never a NaN model
    assert all(torch.isfinite(t).all() for t in best.state_dict().values()
               if t.is_floating_point())
    assert not (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()
    assert not list(run.glob(".*.tmp"))
    # nothing to resume: a fresh start is accepted (here: the same divergence)
    again = invoke("finetune", archive, "-r", recipe)
    assert again.exit_code == 1 and "diverged" in again.stderr


class _Boom(nn.Module):
    """Returns NaN logits from its ``after``-th training forward on."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.calls, self.after = 0, after

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_a_diverged_epoch_never_replaces_the_checkpoint_or_the_best_model(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 2, 2, generator=generator),
                         torch.randint(0, 4, (32,), generator=generator))
    recipe = parse_recipe({"data": {"train": SYNTHETIC}, "epochs": 3, "batch_size": 8,
                           "distillation": None, "bn_reestimate": False})
    saved: list = []
    torch.manual_seed(0)
    trainer = Trainer(_Boom(after=6), None, recipe, data, data, tmp_path,
                      lambda model, top1: saved.append(
                          {k: v.clone() for k, v in model.state_dict().items()}))
    with pytest.raises(CheckFailed, match=r"epoch 2, step 3 .*optimizer\.lr"):
        trainer.fit()  # 4 steps per epoch: the 7th forward is step 3 of epoch 2
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1  # the last good epoch's
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for best in saved for v in best.values())
    lines = [strict_json(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]


# -- 3. and 4. every check before the run folder is made -----------------------------------
@pytest.mark.parametrize("fields,message", [
    ({"input_shape": [1, 1, 28]}, "input_shape"),
    ({"decompose": {"method": "nope"}}, "decompose.method"),
    ({"decompose": {"method": "auto"}}, "decompose.budget"),
    ({"decompose": {"method": "bsconv-u", "budget": "macs=2"}}, "decompose.budget"),
    ({"decompose": {"method": "svd", "rank": 2, "energy": 0.9}}, "decompose.rank"),
    ({"decompose": {"method": "cp", "energy": 0.9}}, "decompose.energy"),
    ({"decompose": {"method": "bsconv-u", "calibration": {"sensitivity": True}}},
     "sensitivity"),
    ({"decompose": {"method": "bsconv-u", "calibration": {"data": "synthetic:bad"}}},
     "decompose.calibration.data"),
    ({"upcycle": {"include": ["nothing*"]}}, "upcycle"),
    ({"export": {"opset": 99}}, "export.opset"),
    ({"distillation": {"teacher": "no-such-teacher.pt"}}, "no-such-teacher.pt"),
    ({"batch_size": 64}, "batch_size"),
    ({"input_shape": [1, 3, 8, 8]}, "gives samples of shape [3, 16, 16], the input shape is"),
    ({"bench": {"threads": 10**6}}, "bench.threads 1000000 is more than four threads"),
    ({"decompose": {"method": "bsconv-u", "budget": "latency=0.8", "latency_threads": 10**6}},
     "latency_threads 1000000"),
    ({"bench": {"batch": 10**8}}, "GiB of activations"),
    ({"data": {"train": "synthetic:1x16x16:10", "limit_train": 32, "limit_val": 16}},
     "does not run on a sample of recipe data.train"),
])
def test_run_checks_everything_before_making_the_folder(tmp_path, tiny, fields, message):
    ckpt, _ = tiny
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), **{"distillation": None,
                                                                   **fields})
    before = snapshot(tmp_path)
    start = time.perf_counter()
    result = invoke("run", recipe, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and "internal error" not in result.stderr
    assert snapshot(tmp_path) == before  # no folder, empty or not
    assert time.perf_counter() - start < 10  # nothing trained


def test_finetune_checks_the_batch_before_making_the_folder(tmp_path, tiny):
    ckpt, archive = tiny
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), batch_size=64,
                         output=str(tmp_path / "run"))
    before = snapshot(tmp_path)
    result = invoke("finetune", archive, "-r", recipe)
    assert result.exit_code == 2 and "batch_size" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


TEACHERS = """from torch import nn
def many(**_):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 100))
def gray(**_):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
"""


@pytest.mark.parametrize(("factory", "message"), [
    ("many", "outputs of shape [1, 100] on a training sample, the model [1, 10]"),
    ("gray", "does not run on a sample of the training data"),
    ("spec", "is an architecture spec, built with random weights, which cannot teach"),
])
@pytest.mark.parametrize("command", ["finetune", "run"])
def test_a_teacher_of_other_classes_or_inputs_is_refused_before_training(
        tmp_path, tiny, command, factory, message):
    """A teacher with another number of classes ended in a shape error inside the KL term
    (exit 3), one that takes other inputs in a conv error (exit 3): each is named before
    any folder is made."""
    ckpt, archive = tiny
    source = tmp_path / "teachers.py"
    source.write_text(TEACHERS)
    namespace: dict = {}
    exec(TEACHERS, namespace)
    teacher = tmp_path / "teacher.pt"
    if factory == "spec":  # a bare spec: random weights (it distilled from noise, silently)
        distillation = {"teacher": f"{source}:many"}
    else:
        torch.save(namespace[factory]().state_dict(), teacher)
        distillation = {"teacher": str(teacher), "teacher_arch": f"{source}:{factory}"}
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(tmp_path / "out"),
                         distillation=distillation)
    before = snapshot(tmp_path)
    args = (["finetune", archive, "-r", recipe] if command == "finetune"
            else ["run", recipe, "--output-dir", tmp_path / "run"])
    result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert "internal error" not in result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert snapshot(tmp_path) == before


# -- 5. recipe files -----------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ("latin-1", "UTF-8"), ("binary", "binary"), ("empty", "empty"), ("list", "mapping"),
    ("folder", "folder"), ("missing", "does not exist"), ("comments", "no keys"),
    ("aliases", "YAML aliases"), ("self-alias", "YAML aliases"),
    ("duplicate", "sets 'epochs' twice in one mapping (line 3)"),
])
def test_bad_recipe_files_exit_2_naming_the_file(tmp_path, tiny, content, message):
    """... including a kilobyte of nested aliases that expands to 9⁹ values ("billion
    laughs": minutes and gigabytes, and an error message of hundreds of megabytes, before)
    and a list that holds itself."""
    _, archive = tiny
    path = tmp_path / "recipe.yaml"
    if content == "latin-1":
        path.write_bytes("name: caf\xe9\ndata: {train: demo}\n".encode("latin-1"))
    elif content == "binary":
        path.write_bytes(archive.read_bytes()[:512])
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "list":
        path.write_text("- data\n- epochs\n")
    elif content == "folder":
        path.mkdir()
    elif content == "comments":
        path.write_text("# nothing yet\n")
    elif content == "aliases":
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        path.write_text("\n".join(lines) + "\narch_kwargs: {bomb: *a8}\n")
    elif content == "self-alias":
        path.write_text("arch_kwargs: {loop: &l [*l]}\n")
    elif content == "duplicate":  # the last one won, silently
        path.write_text("epochs: 1\ndata: {train: demo}\nepochs: 2\n")
    before = snapshot(tmp_path)
    for args in (["run", path], ["finetune", archive, "-r", path]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and str(path) in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


# -- 6. resume identity --------------------------------------------------------------------
def test_resume_refuses_another_model_or_recipe(tmp_path, tiny):
    ckpt, archive = tiny
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(run))
    assert invoke("finetune", archive, "-r", recipe).exit_code == 0
    torch.manual_seed(7)
    model, plan = decompose(TinyNet(width=8), "bsconv-u", INPUT_SHAPE, RankOptions(rank=1))
    other = tmp_path / "other.bsc.pt"
    save_archive(other, model, ArchSpec(NETS_SPEC, {"width": 8}), plan)
    changed = recipe_file(tmp_path / "seed.yaml", model=str(ckpt), output=str(run), seed=3)
    before = snapshot(tmp_path)
    result = invoke("finetune", other, "-r", recipe, "--resume", "-o", tmp_path / "o.pt")
    assert result.exit_code == 2, result.stderr
    assert "different model" in result.stderr and "--force" in result.stderr
    result = invoke("finetune", archive, "-r", changed, "--resume")
    assert result.exit_code == 2, result.stderr
    assert "different recipe (seed differs)" in result.stderr and "--force" in result.stderr
    assert snapshot(tmp_path) == before
    # a checkpoint written before fingerprints were stored still resumes, and a change
    # that does not touch training (the bench section) is no other recipe
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["fingerprint"]["model_sha256"] == load_model(archive).sha256
    del state["fingerprint"]
    torch.save(state, run / "checkpoint.pt")
    bench = recipe_file(recipe, model=str(ckpt), output=str(run), bench={"runs": 3,
                                                                         "enabled": False})
    result = invoke("finetune", archive, "-r", bench, "--resume")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("edit", ["best_top1", "momentum", "epoch"])
def test_resume_refuses_a_checkpoint_edited_out_of_shape(tmp_path, tiny, edit):
    """A checkpoint still weights-only and of this model and recipe, but whose best accuracy
    is a string, whose momentum buffers were resized (both exit 3 at the first comparison
    or step) or whose epoch is negative (trained from "epoch -4" without a word)."""
    ckpt, archive = tiny
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(run), epochs=2,
                         optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9})
    assert invoke("finetune", archive, "-r", recipe).exit_code == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["epoch"] = 1
    if edit == "best_top1":
        state["best_top1"] = "x"
    elif edit == "momentum":
        first = next(iter(state["optimizer"]["state"].values()))
        first["momentum_buffer"] = torch.zeros(1)
    else:
        state["epoch"] = -5
    torch.save(state, run / "checkpoint.pt")
    result = invoke("finetune", archive, "-r", recipe, "--resume")
    assert result.exit_code == 2, result.stderr
    assert "cannot resume from" in result.stderr and "--force" in result.stderr


def test_run_resume_refuses_another_model(tmp_path, tiny):
    ckpt, _ = tiny
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), distillation=None)
    result = invoke("run", recipe, "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    torch.manual_seed(9)
    torch.save(TinyNet(width=8).state_dict(), ckpt)  # the model file changed since
    before = snapshot(tmp_path)
    again = invoke("run", recipe, "--output-dir", out, "--resume")
    assert again.exit_code == 2 and "different model" in again.stderr, again.stderr
    assert snapshot(tmp_path) == before
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    before = snapshot(tmp_path)
    damaged = invoke("run", recipe, "--output-dir", out, "--resume")
    assert damaged.exit_code == 2 and "damaged" in damaged.stderr, damaged.stderr
    assert "--force" in damaged.stderr and snapshot(tmp_path) == before


# -- 7. interruptions ----------------------------------------------------------------------
def test_stale_temporaries_and_folders_killed_before_their_first_checkpoint(tmp_path, tiny):
    ckpt, archive = tiny
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(run))
    assert invoke("finetune", archive, "-r", recipe).exit_code == 0

    def kill_while_saving() -> list[Path]:  # what a SIGKILL during a save leaves
        stale = [run / ".best.pt.k1ll3d.tmp", run / ".checkpoint.pt.abc123.tmp",
                 run / ".model.pt.x9.tmp"]
        for path in stale:
            path.write_bytes(b"half a file")
        return stale

    stale = kill_while_saving()
    forced = invoke("finetune", archive, "-r", recipe, "--force")
    assert forced.exit_code == 0 and not any(p.exists() for p in stale), forced.stderr
    stale = kill_while_saving()
    for name in ("checkpoint.pt", "model.pt"):  # a SIGKILL during the first epoch
        (run / name).unlink()
    resume = invoke("finetune", archive, "-r", recipe, "--resume")
    assert resume.exit_code == 2 and "start without --resume" in resume.stderr
    fresh = invoke("finetune", archive, "-r", recipe)  # nothing to resume: accepted
    assert fresh.exit_code == 0, fresh.stderr
    assert (run / "checkpoint.pt").exists() and not any(p.exists() for p in stale)
    stale = kill_while_saving()
    resumed = invoke("finetune", archive, "-r", recipe, "--resume")
    assert resumed.exit_code == 0 and not any(p.exists() for p in stale), resumed.stderr
    assert [p.name for p in run.glob(".*")] == [RUN_MARK]  # no temporary left
    # the same rule for `run`: only a folder holding a run needs --resume or --force
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path / "run.yaml", model=str(ckpt),
                         decompose={"method": "bsconv-u", "rank": 1})
    assert invoke("run", recipe, "--output-dir", out).exit_code == 0
    held = invoke("run", recipe, "--output-dir", out)
    assert held.exit_code == 2 and "--resume" in held.stderr and "--force" in held.stderr
    for path in out.iterdir():
        if path.name not in ("decomposed.pt", "best.pt", "metrics.jsonl", RUN_MARK):
            path.unlink()
    (out / ".best.pt.k1ll3d.tmp").write_bytes(b"half")
    resume = invoke("run", recipe, "--output-dir", out, "--resume")
    assert resume.exit_code == 2 and "start without --resume" in resume.stderr
    fresh = invoke("run", recipe, "--output-dir", out)
    assert fresh.exit_code == 0, fresh.stderr
    assert {"model.pt", "checkpoint.pt", "run.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.glob(".*")] == [RUN_MARK]


@pytest.mark.slow  # a fine-tuning process started and stopped: 9 s
def test_sigint_then_sigterm_exits_130_after_saving(tmp_path, tiny):
    ckpt, archive = tiny
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), output=str(run), epochs=400,
                         batch_size=4, data={"train": SYNTHETIC, "limit_train": 64,
                                             "limit_val": 16})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bscompress", "finetune", "--trust-code",
                             str(archive),
                             "-r", str(recipe), "--device", "cpu", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        for _ in range(40):  # SIGTERMs while the checkpoint is saved and the process exits
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "stopped by signal 2" in stderr and "--resume" in stderr
    assert (run / "checkpoint.pt").exists() and not list(run.glob(".*.tmp"))


# -- a recipe runs no code without the consent of the command line --------------------------
@pytest.mark.parametrize("fields", [
    {"arch": "os:system", "arch_kwargs": {"command": "touch {marker}"}},
    {"arch": "shutil:rmtree", "arch_kwargs": {"path": "{marker}"}},
    {"model": "os:system", "arch": None, "arch_kwargs": {"command": "touch {marker}"}},
    {"distillation": {"teacher": "x.pt", "teacher_arch": "os:system"}},
    {"trust_pickle": True},
    {"arch": NETS_SPEC},  # code of a file: the user's own only with their consent
], ids=["arch", "arch-call", "model-spec", "teacher-arch", "trust-key", "file"])
def test_a_recipe_builds_only_built_in_code_without_trust_code(tmp_path, tiny, fields):
    """docs/security.md: a recipe is an input someone else may have written. The specs it
    names are built without --trust-code only when built-in, and its own trust_pickle key
    grants nothing; refused in a sentence before anything is imported, built or unpickled."""
    ckpt, archive = tiny
    marker = tmp_path / "RAN"
    if "rmtree" in str(fields):
        marker.mkdir()
    text = yaml.safe_dump(fields).replace("{marker}", str(marker))
    recipe = recipe_file(tmp_path / "r.yaml", **{"model": str(ckpt),
                                                 "output": str(tmp_path / "run"),
                                                 **yaml.safe_load(text)})
    for args in (["run", str(recipe)], ["finetune", str(archive), "-r", str(recipe)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.stderr
        assert ("--trust-code" in result.stderr or "--trust-pickle" in result.stderr)
        assert "internal error" not in result.stderr
        assert marker.exists() == ("rmtree" in str(fields))  # not made, or not removed
    assert not (tmp_path / "run").exists()


def test_a_built_in_recipe_runs_without_trust_code(tmp_path):
    """The recipes of recipes/ name built-in architectures: no consent needed."""
    from bscompress.app.pipeline import consented
    from bscompress.core.recipe import load_recipe

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert consented(recipe, False) is recipe
        assert consented(recipe, True).trust_pickle


@pytest.mark.parametrize(("fields", "message"), [
    ({"transforms": {"pad": 100000}}, "'transforms.pad': input should be less than or equal"),
    ({"seed": 2**70}, "'seed': input should be less than or equal"),
    ({"schedule": {"name": "step", "step_epochs": 1, "gamma": 1e300}}, "'schedule.gamma'"),
    ({"schedule": {"min_lr": 1e308}}, "'schedule.min_lr'"),
    ({"distillation": {"temperature": 1e-300}}, "'distillation.temperature'"),
])
def test_recipe_values_that_broke_training_are_refused_by_the_schema(tmp_path, tiny, fields,
                                                                     message):
    """A 5 TB padding, a seed past 64 bits, a decay of 1e300 and a floor of 1e308 × lr each
    ended in exit 3 in training, after the run folder was made."""
    _, archive = tiny
    recipe = recipe_file(tmp_path / "r.yaml", **fields)
    before = snapshot(tmp_path)
    result = invoke("finetune", archive, "-r", recipe, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("device", "environ", "message"), [
    ("mps", {}, "runs on the CPU or on CUDA devices"),
    ("meta", {}, "runs on the CPU or on CUDA devices"),
    ("cpu", {"WORLD_SIZE": "2"}, "not the RANK, MASTER_ADDR and MASTER_PORT"),
    ("cpu", {"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc', not a whole number"),
    ("cpu", {"LOCAL_RANK": "x"}, "LOCAL_RANK='x', not a whole number"),
])
def test_devices_and_launch_environments_that_cannot_run_exit_2(tmp_path, tiny, monkeypatch,
                                                                device, environ, message):
    """Device types other than the CPU and CUDA (exit 3 in the first transfer) and a
    WORLD_SIZE left without the rest of torchrun's variables, or not a number (exit 3 in
    int() or the process group), each in a sentence, with no folder made."""
    _, archive = tiny
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    recipe = recipe_file(tmp_path / "r.yaml")
    before = snapshot(tmp_path)
    result = invoke("finetune", archive, "-r", recipe, "--output-dir", tmp_path / "out",
                    "--device", device)
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert snapshot(tmp_path) == before


def test_train_and_val_image_folders_of_other_classes_are_refused(tmp_path, tiny):
    """DIR/train holding {cat, dog} and DIR/test {cat, fox}: label 1 was a dog in training
    and a fox in the validation that picks the best epoch."""
    from PIL import Image

    _, archive = tiny
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "fox"))):
        for name in classes:
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / "data" / split / name / "0.png")
    recipe = recipe_file(tmp_path / "r.yaml", data={"train": f"imagefolder:{tmp_path / 'data'}",
                                                    "val": f"imagefolder:{tmp_path / 'data'}"})
    result = invoke("finetune", archive, "-r", recipe, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert "not in both: dog, fox" in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "run"])
def test_files_of_run_names_that_no_run_wrote_are_not_written_over(tmp_path, tiny, command):
    """A folder holding the user's own best.pt / metrics.jsonl was taken for a killed run's
    left-overs and written over without --force; a run marks the folders it writes."""
    ckpt, archive = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own notes\n")
    (out / "best.pt").write_bytes(b"my model")
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt),
                         **({"decompose": {"method": "bsconv-u", "rank": 1}}
                            if command == "run" else {}))
    before = snapshot(tmp_path)
    args = (["finetune", archive, "-r", recipe, "--output-dir", out] if command == "finetune"
            else ["run", recipe, "--output-dir", out])
    result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert "--force" in result.stderr and "internal error" not in result.stderr
    assert snapshot(tmp_path) == before
    assert invoke(*args, "--force").exit_code == 0
    assert (out / RUN_MARK).exists()


def test_user_text_in_messages_is_printed_as_typed(tmp_path):
    """rich turned ':-1:' and ':smile:' in a device name or a path into emoji."""
    result = invoke("evaluate", tmp_path / "x:smile:.pt", "--data", "demo")
    assert result.exit_code == 2 and "x:smile:.pt" in result.stderr, result.stderr


def test_a_recipe_can_fix_kernels_without_factorizing(tmp_path, tiny):
    """'decompose: {method: none, fixed_kernels: bank}' was refused as an unknown method,
    while 'method: none' alone asked for fixed_kernels."""
    ckpt, _ = tiny
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt), epochs=0,
                         decompose={"method": "none", "fixed_kernels": "bank"})
    result = invoke("run", recipe, "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("command", ["finetune", "run"])
def test_a_folder_another_process_writes_into_is_refused(tmp_path, tiny, command):
    """Two runs into one folder both exited 0, each naming outputs that were partly the
    other's (model.pt of one, checkpoint.pt of the other, metrics.jsonl interleaved): the
    folder's mark is locked while a run writes there."""
    import fcntl

    ckpt, archive = tiny
    out = tmp_path / "shared"
    out.mkdir()
    recipe = recipe_file(tmp_path / "r.yaml", model=str(ckpt),
                         **({"decompose": {"method": "bsconv-u", "rank": 1}}
                            if command == "run" else {}))
    args = (["finetune", archive, "-r", recipe, "--output-dir", out] if command == "finetune"
            else ["run", recipe, "--output-dir", out])
    with open(out / RUN_MARK, "a") as other:  # another process's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke(*args)
    assert result.exit_code == 2, result.stderr
    assert "another bscompress process is writing into" in result.stderr
    assert [p.name for p in out.iterdir()] == [RUN_MARK]
    result = invoke(*args)  # released: the same run goes through
    assert result.exit_code == 0, result.stderr
