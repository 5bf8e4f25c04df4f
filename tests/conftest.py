"""Suite-wide fixtures: timing stays out of unit tests, so the latency guard that a macs or
params budget runs by default (``recipe.GUARD_BY_DEFAULT``) is off, except in tests marked
``default_guard`` (they give it a fake timer)."""

from __future__ import annotations

import pytest

from bscompress.core import recipe


@pytest.fixture(autouse=True)
def _no_default_latency_guard(request, monkeypatch):
    if request.node.get_closest_marker("default_guard") is None:
        monkeypatch.setattr(recipe, "GUARD_BY_DEFAULT", False)
