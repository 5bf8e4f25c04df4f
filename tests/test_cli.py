"""The command line: exit codes, one-sentence errors, JSON output, no partial outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.io.archive import load_model
from tests.nets import TinyNet

NETS = Path(__file__).parent / "nets.py"
SPEC = f"{NETS}:TinyNet"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(TinyNet().state_dict(), path)
    return path


def test_version_and_help_examples():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("bscompress ")
    for command in ("inspect", "pack", "evaluate"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout, command


def test_inspect_json_lists_every_conv(ckpt):
    result = invoke("inspect", ckpt, "--arch", SPEC, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["input_shape"] == [1, 3, 16, 16]  # declared by tests/nets.py
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["stem", "features.0", "features.2", "features.4", "features.5"]
    eligible = {layer["name"] for layer in data["layers"] if layer["skip_reason"] is None}
    assert eligible == {"features.0", "features.2"}
    assert data["macs"] == sum(layer["macs"] for layer in data["layers"]) + 16 * 10


def test_inspect_table_and_globs(ckpt):
    result = invoke("inspect", ckpt, "--arch", SPEC, "--exclude", "features.2", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "features.0" in result.stdout
    assert "excluded by --exclude 'features.2'" in result.stdout


def test_inspect_bare_spec_needs_a_shape_when_unknown(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("from torch import nn\n\ndef net():\n    return nn.Conv2d(8, 8, 3)\n")
    result = invoke("inspect", f"{plain}:net")
    assert result.exit_code == 2
    assert "--input-shape" in result.stderr
    assert invoke("inspect", f"{plain}:net", "--input-shape", "1,8,9,9").exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.pt", "--arch", SPEC], "no such file"),
        (["{ckpt}"], "pass --arch"),
        (["{ckpt}", "--arch", "torchvision:resnet18"], "does not match --arch"),
        (["{ckpt}", "--arch", SPEC, "--input-shape", "1,x"], "--input-shape"),
        (["{ckpt}", "--arch", SPEC, "--arch-kwargs", "{"], "--arch-kwargs"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(ckpt, args, message):
    result = invoke("inspect", *[str(ckpt) if a == "{ckpt}" else a for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ")


def test_pack_writes_an_archive_and_refuses_to_overwrite(ckpt, tmp_path):
    out = tmp_path / "tiny.bsc.pt"
    result = invoke("pack", ckpt, "--arch", SPEC, "-o", out)
    assert result.exit_code == 0, result.stderr
    loaded = load_model(out)
    assert loaded.is_archive and loaded.plan.input_shape == [1, 3, 16, 16]
    assert invoke("inspect", out, "--json").exit_code == 0  # needs no --arch
    again = invoke("pack", ckpt, "--arch", SPEC, "-o", out)
    assert again.exit_code == 2 and "--force" in again.stderr
    over_input = invoke("pack", ckpt, "--arch", SPEC, "-o", ckpt, "--force")
    assert over_input.exit_code == 2 and "also an input" in over_input.stderr


def test_failed_load_writes_no_output(tmp_path):
    out = tmp_path / "out.pt"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    result = invoke("pack", bad, "--arch", SPEC, "-o", out)
    assert result.exit_code == 2 and "truncated or corrupt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_python_m_entry_point_and_no_traceback(tmp_path):
    env_python = sys.executable  # (--version: test_version_and_help_examples)
    pickled = tmp_path / "whole.pt"
    torch.save(TinyNet(), pickled)
    result = subprocess.run([env_python, "-m", "bscompress", "inspect", str(pickled)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--trust-pickle" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run([env_python, "-m", "bscompress", "--debug", "inspect", str(pickled)],
                           capture_output=True, text=True, check=False)
    assert "Traceback" in debug.stderr


def test_archives_record_preprocessing_and_commands_reuse_it(ckpt, tmp_path):
    packed = tmp_path / "tiny.bsc.pt"
    assert invoke("pack", ckpt, "--arch", SPEC, "-o", packed, "--mean", "0.5,0.4,0.3",
                  "--std", "0.2").exit_code == 0
    assert load_model(packed).metadata["preprocessing"] == {"mean": [0.5, 0.4, 0.3],
                                                           "std": [0.2]}
    data = ["--data", "synthetic:3x16x16:10", "--limit", "64", "--json"]
    recorded = invoke("evaluate", packed, *data)
    assert recorded.exit_code == 0 and "recorded in the archive" in recorded.stderr
    explicit = invoke("evaluate", packed, *data, "--mean", "0.5,0.4,0.3", "--std", "0.2")
    plain = invoke("evaluate", ckpt, "--arch", SPEC, *data)
    assert "recorded" not in explicit.stderr + plain.stderr
    result = {name: json.loads(r.stdout) for name, r in
              [("recorded", recorded), ("explicit", explicit), ("plain", plain)]}
    assert result["recorded"] == {**result["explicit"], "model": str(packed)}
    # the decomposed archive records what it was told, and bench refuses a disagreement
    dsc = tmp_path / "tiny.dsc.pt"
    assert invoke("decompose", ckpt, "--arch", SPEC, "-m", "dsc", "-o", dsc, "--mean", "0.1",
                  "--std", "0.2", "-q").exit_code == 0
    assert load_model(dsc).metadata["preprocessing"] == {"mean": [0.1], "std": [0.2]}
    clash = invoke("bench", packed, dsc, *data[:4], "--runs", "1", "--profile-top", "0")
    assert clash.exit_code == 2 and "record different preprocessing" in clash.stderr
    bad = invoke("pack", ckpt, "--arch", SPEC, "-o", tmp_path / "x.pt", "--mean", "a,b")
    assert bad.exit_code == 2 and "--mean" in bad.stderr and not (tmp_path / "x.pt").exists()
