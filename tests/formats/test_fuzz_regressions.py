"""Inputs the fuzzer (`make fuzz`) and the hostile-input properties found, replayed for good.

Each file in `fuzz_regressions/` is one fuzz input (`hostile.run_input`: the first byte picks the
parser). It once escaped as something other than a `FormatError`, or made the two TOC builders
of that time disagree; it must now be a valid model or a `FormatError` like any other input.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .hostile import run_input

FOUND = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.bin"))


@pytest.mark.parametrize("path", FOUND, ids=[p.stem for p in FOUND])
def test_found_input_is_a_model_or_a_format_error(path):
    run_input(path.read_bytes())


def test_there_are_regressions_to_replay():
    assert FOUND
