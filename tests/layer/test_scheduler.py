"""Background fetch takes the link only when on-demand reads leave it alone.

What is waited for is observed (`WatchedScheduler.refused`), never slept on; the quiet period is a
duration, so its tests measure the time before its start, which makes the lower bound exact
however late the threads run.
"""
import contextlib
import threading
import time

from stargz_store.layer.scheduler import FetchScheduler

from .helpers import WatchedScheduler


def _enter_background_turn(scheduler: FetchScheduler) -> tuple[threading.Thread, list[float]]:
    """Enter a background turn from another thread; the list gets the monotonic time it was granted."""
    granted: list[float] = []

    def run() -> None:
        with scheduler.background_turn(threading.Event(), poll=0.01) as allowed:
            assert allowed
            granted.append(time.monotonic())

    t = threading.Thread(target=run)
    t.start()
    return t, granted


def _granted_after(scheduler: FetchScheduler) -> float:
    t, granted = _enter_background_turn(scheduler)
    t.join(30)
    assert granted, "background turn never granted"
    return granted[0]


def test_background_waits_for_the_quiet_period_after_a_foreground_fetch():
    scheduler = FetchScheduler(background_slots=2, quiet_period=0.3)
    with scheduler.foreground():
        before_finish = time.monotonic()
    assert _granted_after(scheduler) - before_finish >= 0.3


def test_background_waits_while_a_foreground_fetch_is_in_flight():
    scheduler = WatchedScheduler(background_slots=2)
    with contextlib.ExitStack() as foreground:
        foreground.enter_context(scheduler.foreground())
        t, granted = _enter_background_turn(scheduler)
        assert scheduler.refused.wait(30), "the background turn never asked"
        assert not granted  # refused while the foreground fetch runs, and it still runs
    t.join(30)
    assert granted, "background turn never granted once the foreground fetch ended"


def test_without_foreground_activity_background_starts_at_once_up_to_its_slots():
    scheduler = FetchScheduler(background_slots=1, quiet_period=5.0)
    stop = threading.Event()
    with scheduler.background_turn(stop) as first:
        assert first
        stop.set()  # the single slot is taken: a second turn can only end by being stopped
        with scheduler.background_turn(stop) as second:
            assert not second


def test_note_activity_restarts_the_quiet_period():
    scheduler = FetchScheduler(background_slots=2, quiet_period=0.3)
    before_note = time.monotonic()
    scheduler.note_activity()
    assert _granted_after(scheduler) - before_note >= 0.3
