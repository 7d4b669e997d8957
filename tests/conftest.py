"""Shared fixtures: each module under tests/fixtures starts one real component and cleans it up."""
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.registry", "tests.fixtures.store", "tests.fixtures.registry_auth", "tests.fixtures.fault_proxy",
                  "tests.fixtures.podman", "tests.fixtures.podman_made", "tests.fixtures.rootless"]

TESTDATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def testdata() -> Path:
    """Reference images made by tools we did not write (copied from shared/testdata)."""
    return TESTDATA
