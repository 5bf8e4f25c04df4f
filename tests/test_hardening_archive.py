"""Hostile and broken models: archives that would run code, tampered plans, weights that are
not finite or not floating point, hostile pickles, architecture code that exits — each ends in
exit 2 with one sentence, runs nothing, and leaves every file as it was."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.core.plan import Plan
from bscompress.core.surgery import Eligibility
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import save_archive
from tests.nets import TinyNet

NETS = Path(__file__).parent / "nets.py"
SPEC = f"{NETS}:TinyNet"
runner = CliRunner()


def invoke(*args: object, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(result, *words: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "internal error" not in result.stderr
    message = " ".join(result.stderr.split())
    for word in words:
        assert word in message, (word, message)


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    """A checkpoint of TinyNet and its BSConv-U archive (.pt and .safetensors)."""
    from bscompress.compress.decomposition import decompose
    from bscompress.methods import RankOptions

    folder = tmp_path_factory.mktemp("archives")
    torch.manual_seed(0)
    net = TinyNet().eval()
    torch.save(net.state_dict(), folder / "tiny.pt")
    model, plan = decompose(copy.deepcopy(net), "bsconv-u", [1, 3, 16, 16], RankOptions(),
                            Eligibility(min_in_channels=8))
    for name in ("bsu.pt", "bsu.safetensors"):
        save_archive(folder / name, model, ArchSpec(SPEC), plan)
    return folder


def tampered(archive_dir: Path, tmp_path: Path, change, name: str = "evil.pt") -> Path:
    """A copy of the .pt archive whose loaded dict ``change`` edits in place."""
    obj = torch.load(archive_dir / "bsu.pt", weights_only=True)
    change(obj)
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------
# archives that would run code


@pytest.mark.parametrize("command", ["inspect", "evaluate", "export", "pack"])
def test_archive_naming_a_shell_command_runs_nothing(archive_dir, tmp_path, command):
    marker = tmp_path / "PWNED"

    def evil(obj):
        obj["arch"] = {"spec": "os:system", "kwargs": {"command": f"touch {marker}"}}

    path = tampered(archive_dir, tmp_path, evil)
    before = digest(path)
    extra = {"inspect": [], "evaluate": ["--data", "synthetic:3x16x16:10"],
             "export": ["-o", tmp_path / "x.onnx"], "pack": ["-o", tmp_path / "x.pt"]}[command]
    result = invoke(command, path, *extra)
    assert_refused(result, "'os:system'", "--trust-code")
    assert not marker.exists()
    assert digest(path) == before
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.pt").exists()


def test_safetensors_metadata_naming_subprocess_runs_nothing(archive_dir, tmp_path):
    marker = tmp_path / "PWNED"
    tensors = load_file(archive_dir / "bsu.safetensors")
    from safetensors import safe_open

    with safe_open(str(archive_dir / "bsu.safetensors"), "pt") as fh:
        header = json.loads(fh.metadata()["bscompress"])
    header["arch"] = {"spec": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}
    path = tmp_path / "evil.safetensors"
    save_file(tensors, str(path), metadata={"bscompress": json.dumps(header)})
    assert_refused(invoke("inspect", path), "'subprocess:run'")
    assert not marker.exists()


def test_archive_naming_a_python_file_imports_it_only_with_consent(archive_dir, tmp_path):
    marker = tmp_path / "IMPORTED"
    code = NETS.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n"
    (tmp_path / "planted.py").write_text(code)

    def evil(obj):
        obj["arch"] = {"spec": "planted.py:TinyNet", "kwargs": {}}

    path = tampered(archive_dir, tmp_path, evil)
    assert_refused(invoke("inspect", path), "planted.py", "--trust-code")
    assert not marker.exists()
    # consent: the archive's own folder is where its relative file is looked up
    result = invoke("inspect", path, "--trust-code", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert marker.exists()


def test_own_archives_load_and_edited_ones_do_not(archive_dir, tmp_path):
    assert invoke("inspect", archive_dir / "bsu.pt", "--quiet").exit_code == 0

    def widen(obj):  # same code, other arguments: no longer what this user signed
        obj["arch"]["kwargs"] = {"width": 16, "num_classes": 10}

    assert_refused(invoke("inspect", tampered(archive_dir, tmp_path, widen)), "--trust-code")


def test_archive_kwargs_must_be_json(archive_dir, tmp_path):
    def tensor_kwargs(obj):
        obj["arch"]["kwargs"] = {"width": torch.tensor(16)}

    result = invoke("inspect", tampered(archive_dir, tmp_path, tensor_kwargs), "--trust-code")
    assert_refused(result, "arch.kwargs", "JSON")


def test_builtin_archives_need_no_signature(tmp_path):
    out = tmp_path / "demo.pt"
    from bscompress.demo import CHECKPOINT

    assert invoke("pack", CHECKPOINT, "--arch", "bscompress.demo:fmnist_resnet", "-o", out,
                  "-q").exit_code == 0
    obj = torch.load(out, weights_only=True)
    obj["arch_signature"] = "0" * 64
    torch.save(obj, out)
    assert invoke("inspect", out, "--quiet", "--no-analysis").exit_code == 0


def test_module_that_is_not_a_builtin_architecture_is_refused(archive_dir, tmp_path):
    def io_helper(obj):  # a bscompress function that writes files is no architecture
        obj["arch"] = {"spec": "bscompress.core.files:write_json_atomic",
                       "kwargs": {"path": str(tmp_path / "x.json"), "data": 1}}

    assert_refused(invoke("inspect", tampered(archive_dir, tmp_path, io_helper)),
                   "--trust-code")
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------
# tampered plans and headers


def _layer(obj: dict, name: str = "features.0") -> dict:
    return next(e for e in obj["plan"]["layers"] if e["name"] == name)


TAMPERINGS = {
    "rank 0": lambda o: _layer(o)["ranks"].update(rank=0),
    "rank -3": lambda o: _layer(o)["ranks"].update(rank=-3),
    "rank 'two'": lambda o: _layer(o)["ranks"].update(rank="two"),
    "rank 5 (weights of rank 1)": lambda o: _layer(o)["ranks"].update(rank=5),
    "unknown modifier": lambda o: _layer(o)["modifiers"].append({"kind": "rootkit"}),
    "modifier without kind": lambda o: _layer(o)["modifiers"].append({"experts": 4}),
    "layer entry a string": lambda o: o["plan"]["layers"].append("features.0"),
    "layers not a list": lambda o: o["plan"].update(layers={"a": 1}),
    "method on BatchNorm": lambda o: o["plan"]["layers"].append(
        {**_layer(o), "name": "bn"}),
    "method on a parent": lambda o: o["plan"]["layers"].append(
        {**_layer(o), "name": "features"}),
    "unknown method": lambda o: _layer(o).update(method="magic"),
    "unknown layer": lambda o: _layer(o).update(name="nowhere.0"),
    "input_shape text": lambda o: o["plan"].update(input_shape="big"),
    "input_shape zero": lambda o: o["plan"].update(input_shape=[1, 3, 0, 16]),
    "input_shape huge": lambda o: o["plan"].update(input_shape=[1, 3, 10**6, 10**6]),
    "metadata a list": lambda o: o.update(metadata=[1, 2]),
    "state_dict a list": lambda o: o.update(state_dict=[1, 2]),
    "state_dict missing": lambda o: o.pop("state_dict"),
    "format_version '1'": lambda o: o.update(format_version="1"),
    "format_version 99": lambda o: o.update(format_version=99),
    "plan a string": lambda o: o.update(plan="rm -rf"),
    "arch a string": lambda o: o.update(arch="os:system"),
    "arch spec garbage": lambda o: o["arch"].update(spec="not a spec"),
    "plan meta a list": lambda o: o["plan"].update(meta=[]),
    # the summary under the plan table formats these: a string there was an internal error
    "budget fraction text": lambda o: o["plan"]["meta"].update(
        budget={"kind": "macs", "fraction": "half", "target": 1, "achieved": 1}),
    "calibration layers a list": lambda o: o["plan"]["meta"].update(
        calibration={"layers": [], "full_covariance_layers": 0, "covariance_mb": 0}),
    "macs_after text": lambda o: o["plan"]["meta"].update(macs_after="fewer"),
    "params_before text": lambda o: _layer(o).update(params_before="many"),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_archive_exits_2(archive_dir, tmp_path, name):
    path = tampered(archive_dir, tmp_path, TAMPERINGS[name])
    before = digest(path)
    result = invoke("inspect", path, "--quiet", "--no-analysis")
    assert_refused(result, str(path))
    assert digest(path) == before


@pytest.mark.parametrize("header", ["[1, 2]", "not json", "\"text\""])
def test_safetensors_metadata_not_an_object(archive_dir, tmp_path, header):
    path = tmp_path / "bad.safetensors"
    save_file(load_file(archive_dir / "bsu.safetensors"), str(path),
              metadata={"bscompress": header})
    assert_refused(invoke("inspect", path), "damaged")


# ---------------------------------------------------------------------------------------------
# weights


def _checkpoint(tmp_path: Path, change) -> Path:
    state = TinyNet().state_dict()
    change(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("command", ["inspect", "decompose"])
def test_nonfinite_weights_refused_naming_the_tensor(tmp_path, value, command):
    def poison(state):
        state["features.0.weight"][0, 0, 0, 0] = value

    path = _checkpoint(tmp_path, poison)
    out = tmp_path / "out.pt"
    extra = ["-o", out] if command == "decompose" else []
    result = invoke(command, path, "--arch", SPEC, *extra)
    assert_refused(result, "features.0.weight", "BSCOMPRESS_ALLOW_NONFINITE")
    assert not out.exists()
    # opting in loads it; the factorizations still refuse NaN with a sentence
    result = invoke(command, path, "--arch", SPEC, *extra,
                    env={"BSCOMPRESS_ALLOW_NONFINITE": "1"})
    assert_refused(result, "features.0.weight")
    assert not out.exists()


def test_nonfinite_is_loaded_with_opt_in_for_inspection_without_analysis(tmp_path):
    def poison(state):
        state["fc.weight"][0, 0] = float("nan")

    path = _checkpoint(tmp_path, poison)
    result = invoke("inspect", path, "--arch", SPEC, "--no-analysis", "--quiet",
                    env={"BSCOMPRESS_ALLOW_NONFINITE": "1"})
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_integer_and_bool_weights_refused(tmp_path, dtype):
    def cast(state):
        for key in list(state):
            if state[key].is_floating_point():
                state[key] = state[key].to(dtype)

    path = _checkpoint(tmp_path, cast)
    result = invoke("evaluate", path, "--arch", SPEC, "--data", "synthetic:3x16x16:10")
    assert_refused(result, str(dtype).replace("torch.", ""), "floating-point")


def test_integer_weights_in_safetensors_refused(tmp_path):
    state = {k: v.to(torch.int8) if v.is_floating_point() else v
             for k, v in TinyNet().state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert_refused(invoke("inspect", path, "--arch", SPEC), "int8")


def test_half_weights_converted_with_a_note(tmp_path):
    def half(state):
        for key in list(state):
            if state[key].is_floating_point():
                state[key] = state[key].half()

    path = _checkpoint(tmp_path, half)
    result = invoke("inspect", path, "--arch", SPEC, "--no-analysis")
    assert result.exit_code == 0, result.stderr
    assert "float16" in result.stderr and "converted to float32" in result.stderr


# ---------------------------------------------------------------------------------------------
# hostile pickles and architecture code


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_hostile_pickle_runs_nothing_and_names_the_flag(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    result = invoke("inspect", path, "--arch", SPEC)
    assert_refused(result, "--trust-pickle", "system")
    assert "truncated" not in result.stderr and "weights_only" not in result.stderr
    assert not marker.exists()


ARCH_FILES = {
    "sys.exit at import": ("import sys\nsys.exit(7)\n", "sys.exit(7)"),
    "argparse at import": ("import argparse\np = argparse.ArgumentParser()\n"
                           "p.add_argument('--lr', required=True)\np.parse_args()\n",
                           "sys.exit(2)"),
    "syntax error": ("def broken(:\n", "SyntaxError"),
    "import error": ("import no_such_module_here\n", "ModuleNotFoundError"),
    "factory raises": ("def Net(**kw):\n    raise RuntimeError('no GPU found')\n",
                       "no GPU found"),
    "factory exits": ("import sys\ndef Net(**kw):\n    sys.exit(3)\n", "sys.exit(3)"),
    "factory returns a number": ("def Net(**kw):\n    return 3\n", "not a torch.nn.Module"),
}


@pytest.mark.parametrize("case", sorted(ARCH_FILES))
def test_architecture_code_that_fails_exits_2(tmp_path, case):
    code, words = ARCH_FILES[case]
    (tmp_path / "arch.py").write_text(code)
    ckpt = _checkpoint(tmp_path, lambda state: None)
    result = invoke("inspect", ckpt, "--arch", f"{tmp_path / 'arch.py'}:Net")
    assert_refused(result, words)
    assert "usage:" not in result.stdout + result.stderr


def test_factory_rejecting_its_kwargs(tmp_path):
    ckpt = _checkpoint(tmp_path, lambda state: None)
    result = invoke("inspect", ckpt, "--arch", SPEC, "--arch-kwargs", '{"depth": 3}')
    assert_refused(result, "--arch-kwargs", "depth")


# ---------------------------------------------------------------------------------------------
# outputs


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _checkpoint(tmp_path, lambda state: None)


def test_decompose_never_replaces_a_device(ckpt, tmp_path):
    result = invoke("decompose", ckpt, "--arch", SPEC, "-o", os.devnull, "--force")
    assert_refused(result, os.devnull, "not a regular file")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_outputs_under_a_file_or_in_proc_refused(ckpt, tmp_path):
    result = invoke("decompose", ckpt, "--arch", SPEC, "-o", ckpt / "x.pt")
    assert_refused(result, "is a file, not a folder")
    if Path("/proc/self").exists():
        result = invoke("pack", ckpt, "--arch", SPEC, "-o", "/proc/self/comm", "--force")
        assert_refused(result, "/proc")


@pytest.mark.parametrize("command", ["decompose", "pack"])
def test_output_equal_to_the_architecture_file_refused(tmp_path, command):
    arch = tmp_path / "nets.py"
    arch.write_text(NETS.read_text())
    ckpt = _checkpoint(tmp_path, lambda state: None)
    before = digest(arch)
    result = invoke(command, ckpt, "--arch", f"{arch}:TinyNet", "-o", arch, "--force")
    assert_refused(result, "also an input")
    assert digest(arch) == before


def test_output_through_a_link_to_the_input_refused(ckpt, tmp_path):
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    before = digest(ckpt)
    result = invoke("pack", ckpt, "--arch", SPEC, "-o", link, "--force")
    assert_refused(result, "also an input")
    assert digest(ckpt) == before


def test_archives_get_the_common_file_mode(ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "packed.pt"
        assert invoke("pack", ckpt, "--arch", SPEC, "-o", out, "-q").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_json_output_is_valid_even_with_nan(tmp_path):
    from bscompress.core.files import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}


def test_plan_from_dict_keeps_reading_todays_archives(archive_dir):
    obj = torch.load(archive_dir / "bsu.pt", weights_only=True)
    plan = Plan.from_dict(obj["plan"])
    assert plan.replaced() and plan.input_shape == [1, 3, 16, 16]


def test_the_signing_key_is_made_whole_once_and_kept(tmp_path, monkeypatch):
    from bscompress.io import trust

    path = tmp_path / "config" / "archive.key"
    monkeypatch.setenv("BSCOMPRESS_KEY_FILE", str(path))
    key = trust.user_key()
    assert key is not None and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["archive.key"]  # no temporary
    assert trust.user_key() == key  # kept

    # a racing process linked its key first: ours is dropped, theirs is read
    other = tmp_path / "other" / "archive.key"
    monkeypatch.setenv("BSCOMPRESS_KEY_FILE", str(other))
    real_link = os.link

    def raced(source, target):
        Path(target).write_text("ab" * 32)
        return real_link(source, target)

    monkeypatch.setattr(trust.os, "link", raced)
    assert trust.user_key() == bytes.fromhex("ab" * 32)
    assert sorted(p.name for p in other.parent.iterdir()) == ["archive.key"]
