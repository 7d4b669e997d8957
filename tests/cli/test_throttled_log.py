"""`stargz_store.logs.Throttled`: a warning that repeats per request is logged once per cause and window."""
from __future__ import annotations

import logging

from stargz_store import logs


def test_repeats_go_to_debug_and_are_counted_after_the_window(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    throttled = logs.Throttled(logging.getLogger("test.throttled"), window=60.0)
    with caplog.at_level(logging.DEBUG, logger="test.throttled"):
        for i in range(5):
            throttled.warning("registry down", "fetch %d failed", i)
        throttled.warning("disk full", "cannot cache %d", 1)  # another cause: its own first line
        now[0] += 61
        throttled.warning("registry down", "fetch %d failed", 9)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["fetch 0 failed", "cannot cache 1",
                        "fetch 9 failed (and 4 more like it in the 60 s before, logged at debug level)"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] == [
        f"fetch {i} failed" for i in range(1, 5)]


def test_causes_are_bounded():
    throttled = logs.Throttled(logging.getLogger("test.throttled.bound"), max_keys=3)
    for i in range(10):
        throttled.warning(i, "x")
    assert len(throttled._seen) == 3
