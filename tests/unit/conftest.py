"""Fixtures of the unit tests that more than one test module uses."""

from __future__ import annotations

import pytest

from tests.monitoring_support import make_world


@pytest.fixture(scope="module")
def world() -> dict:
    """The synthetic monitoring world (stand-in model, reference profile, val images); read-only."""
    return make_world()
