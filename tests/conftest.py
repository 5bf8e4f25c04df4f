"""Suite-wide fixtures: timing stays out of unit tests, so the latency guard that a macs or
params budget runs by default (``recipe.GUARD_BY_DEFAULT``) is off, except in tests marked
``default_guard`` (they give it a fake timer).

``make test`` runs the fast tier in two pytest-xdist workers: each then runs torch on one
thread (two workers of two threads each on two cores wait on each other), and the
``COLUMNS=80`` that xdist gives its workers is dropped, so that the CLI's tables render at
the width they have under a plain ``pytest`` (160, ``cli.common.out_console``)."""

from __future__ import annotations

import os

import pytest
import torch

from bscompress.core import recipe

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.pop("COLUMNS", None)


@pytest.fixture(autouse=True)
def _no_default_latency_guard(request, monkeypatch):
    if request.node.get_closest_marker("default_guard") is None:
        monkeypatch.setattr(recipe, "GUARD_BY_DEFAULT", False)
