"""One schema for a step: the decompose (export, bench) section of a recipe is what the
command's options fill and the API's keywords; its rules are written once, named as recipe
keys or as flags; the same configuration gives the same Plan both ways."""

from __future__ import annotations

import inspect

import pytest
import typer.main
from typer.testing import CliRunner

from bscompress.app.cli import app
from bscompress.app.cli.common import flag_names
from bscompress.app.cli.decompose import flag
from bscompress.app.cli.export import flag as export_flag
from bscompress.app.pipeline import decompose_step
from bscompress.core.errors import BadInput
from bscompress.core.recipe import (
    Bench,
    Calibration,
    Decompose,
    Export,
    Reconstruction,
    parse_recipe,
)
from bscompress.demo import ARCH, CHECKPOINT
from bscompress.deploy.bench import bench_models, gate_failures
from bscompress.deploy.export import export_onnx
from bscompress.io.archive import load_model
from bscompress.methods import RankOptions

runner = CliRunner()


def _fields(section: type, prefix: str = "") -> list[str]:
    """Every field path of a section, nested sections included (not the sections)."""
    paths = []
    for name, info in section.model_fields.items():
        nested = next((t for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
                       if t in (Calibration, Reconstruction)), None)
        paths += _fields(nested, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return paths


def test_every_field_of_the_section_is_an_option_of_the_command():
    command = typer.main.get_command(app).commands["decompose"]
    options = {opt for param in command.params for opt in param.opts}
    missing = [field for field in _fields(Decompose) if flag(field) not in options]
    # the reconstruction batch is a recipe knob only (the command trains with its default)
    assert missing == ["calibration.reconstruct.batch"]


@pytest.mark.parametrize("section,words", [
    ({"budget": "macs=0.5", "rank": 2},
     "'decompose.budget' allocates the ranks itself: drop 'decompose.rank'"),
    ({"method": "auto"}, "'decompose.method' auto chooses per layer under a budget: add "
                         "'decompose.budget'"),
    ({"method": "none"}, "'decompose.method' none factorizes nothing: add "
                         "'decompose.fixed_kernels'"),
    ({"budget": "macs=0.5", "method": "dsc", "calibration": {"sensitivity": True}}, None),
    ({"method": "dsc", "calibration": {"sensitivity": True}},
     "'decompose.calibration.sensitivity' measures candidates"),
    ({"method": "dsc", "rank": 2, "energy": 0.9},
     "'decompose.rank' and 'decompose.energy' both choose the ranks"),
    ({"method": "tucker2", "tucker_ranks": 2.5},
     "'decompose.tucker_ranks' is a fraction of the channels"),
])
def test_rules_speak_of_recipe_keys(section, words):
    data = {"data": {"train": "demo"}, "decompose": section}
    if words is None:
        assert parse_recipe(data).decompose.calibration.sensitivity
        return
    with pytest.raises(BadInput, match="recipe: " + words.replace("(", r"\(")):
        parse_recipe(data)


def test_the_same_rule_speaks_of_flags_on_the_command_line(tmp_path):
    result = runner.invoke(app, ["decompose", str(CHECKPOINT), "--arch", ARCH, "-o",
                                 str(tmp_path / "x.pt"), "--budget", "macs=0.5", "--rank", "2"])
    assert result.exit_code == 2
    assert "--budget allocates the ranks itself: drop --rank and --energy" in " ".join(
        result.stderr.split())
    assert not (tmp_path / "x.pt").exists()


def test_the_library_speaks_of_its_own_fields():
    """A Python caller gets the names it passed (the command and recipes check first)."""
    with pytest.raises(BadInput, match=r"^RankOptions.rank must be at least 1, got 0$"):
        RankOptions(rank=0)
    with pytest.raises(BadInput, match=r"RankOptions.cp_rank must be a fraction"):
        RankOptions(cp_rank=1.5)


def test_a_recipe_and_the_command_give_the_same_plan(tmp_path):
    out = tmp_path / "cli.pt"
    result = runner.invoke(app, [
        "decompose", str(CHECKPOINT), "--arch", ARCH, "-o", str(out), "-q", "-m", "tucker2",
        "--budget", "macs=0.6", "--calib", "demo", "--calib-samples", "48", "--calib-batch",
        "16", "--holdout", "0.3", "--tucker-iters", "2", "--min-in-channels", "16"])
    assert result.exit_code == 0, result.stderr
    recipe = parse_recipe({"data": {"train": "demo"}, "decompose": {
        "method": "tucker2", "budget": "macs=0.6", "tucker_iters": 2, "min_in_channels": 16,
        "calibration": {"data": "demo", "samples": 48, "batch": 16, "holdout": 0.3}}})
    loaded = load_model(CHECKPOINT, arch=ARCH)
    _, plan, _ = decompose_step(loaded, recipe, [1, 1, 28, 28])
    written = load_model(out).plan
    assert plan.replaced() and plan.summary.calibration.samples == 48
    assert plan.to_dict() == written.to_dict()


# -- export and bench: the same schema for the recipe section, the command and the API ------

def _options(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {opt for param in command.params for opt in param.opts}


@pytest.mark.parametrize("section,command,namer,api", [
    (Export, "export", export_flag, export_onnx),
    (Bench, "bench", flag_names({}), bench_models),
])
def test_export_and_bench_sections_are_the_commands_options_and_the_apis_keywords(
        section, command, namer, api):
    fields = [f for f in section.model_fields if f != "enabled"]
    assert [f for f in fields if namer(f) not in _options(command)] == []
    keywords = (section().arguments() if section is Export
                else {**section().timing(), **section().gates()})
    parameters = set(inspect.signature(api).parameters)
    if section is Bench:
        parameters |= set(inspect.signature(gate_failures).parameters)
    assert set(keywords) <= parameters


def test_export_and_bench_rules_name_recipe_keys_and_flags(tmp_path):
    with pytest.raises(BadInput, match=r"^recipe: 'export.opset' 99 is outside"):
        parse_recipe({"data": {"train": "demo"}, "export": {"opset": 99}})
    with pytest.raises(BadInput, match=r"'bench.min_speedup': input should be greater than 0"):
        parse_recipe({"data": {"train": "demo"}, "bench": {"min_speedup": 0}})
    out = tmp_path / "m.onnx"
    for args, words in (
            (["export", str(CHECKPOINT), "--arch", ARCH, "-o", str(out), "--rtol", "nan"],
             "--rtol: input should be a finite number"),
            (["export", str(CHECKPOINT), "--arch", ARCH, "-o", str(out), "--opset", "17"],
             "--opset 17 is outside the range"),
            (["bench", str(CHECKPOINT), str(CHECKPOINT), "--arch", ARCH, "--min-speedup", "0"],
             "--min-speedup: input should be greater than 0"),
            (["bench", str(CHECKPOINT), "--arch", ARCH, "--runs", "0"],
             "--runs: input should be greater than or equal to 1"),
            # every number of every section is finite: a rank fraction of inf was an internal
            # error (int(inf)) deep in the factorization
            (["decompose", str(CHECKPOINT), "--arch", ARCH, "-m", "tucker2", "--tucker-ranks",
              "inf", "-o", str(out)], "--tucker-ranks: input should be a finite number"),
            (["decompose", str(CHECKPOINT), "--arch", ARCH, "-m", "cp", "--cp-rank", "inf",
              "-o", str(out)], "--cp-rank: input should be a finite number")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in " ".join(result.stderr.split()), (
            args, result.stderr)
    assert not out.exists()
