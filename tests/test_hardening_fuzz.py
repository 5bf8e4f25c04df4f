"""Property-based fuzzing of the two untrusted documents bscompress reads: archive headers
(their Plan above all) and recipes. Every mutation either loads or is refused with
:class:`BadInput` (exit 2): never another exception."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bscompress.core.errors import BadInput
from bscompress.core.recipe import parse_recipe
from bscompress.io.arch import ArchSpec
from bscompress.io.archive import _load_archive, save_archive
from tests.nets import TinyNet

NETS = Path(__file__).parent / "nets.py"
SPEC = f"{NETS}:TinyNet"
RECIPE = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "demo-kd.yaml").read_text())
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> tuple[dict, dict]:
    """The header and state of a TinyNet archive holding every kind of plan entry."""
    from bscompress.compress.decomposition import decompose
    from bscompress.core.surgery import Eligibility
    from bscompress.methods import RankOptions
    from bscompress.transforms.upcycle import UpcycleOptions, upcycle

    torch.manual_seed(0)
    model, plan = decompose(TinyNet().eval(), "dsc", [1, 3, 16, 16], RankOptions(rank=2),
                            Eligibility(min_in_channels=8))
    model, plan = upcycle(model, [1, 3, 16, 16], UpcycleOptions(experts=2), plan)
    path = tmp_path_factory.mktemp("fuzz") / "a.pt"
    save_archive(path, model, ArchSpec(SPEC), plan)
    obj = torch.load(path, weights_only=True)
    state = obj.pop("state_dict")
    return obj, state


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON-like tree."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(tree, data, values):
    """Replace one random node of ``tree`` (not the root) by a random JSON value, or delete
    it from its parent."""
    paths = [p for p, _ in _paths(tree) if p]
    path = data.draw(st.sampled_from(paths))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(values)
    return path


@FUZZ
@given(data=st.data())
def test_mutated_archive_plans_load_or_exit_2(header, data):
    obj, state = copy.deepcopy(header[0]), header[1]
    target = data.draw(st.sampled_from(["plan", "plan", "plan", "arch", "metadata", "header"]))
    tree = obj if target == "header" else obj[target]
    if not isinstance(tree, (dict, list)) or not tree:
        return
    _mutate(tree, data, json_values)
    try:
        model = _load_archive(Path("fuzz.pt"), obj, {**obj, "state_dict": state}).model
    except BadInput:
        return
    # what loads runs on the shape it claims
    out = model(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 10)


@FUZZ
@given(data=st.data())
def test_mutated_recipes_parse_or_exit_2(data):
    recipe = copy.deepcopy(RECIPE)
    recipe["decompose"] = {"method": "auto", "budget": "macs=0.5",
                           "calibration": {"samples": 64, "reconstruct": {"steps": 5}}}
    recipe["upcycle"] = {"experts": 4}
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(recipe, data, json_values)
    try:
        parse_recipe(recipe, source="fuzz.yaml")
    except BadInput as err:
        assert "fuzz.yaml" in str(err) or "recipe" in str(err)
