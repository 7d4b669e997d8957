"""Background fetch takes the link only when on-demand reads leave it alone."""
import threading
import time

from stargz_store.layer.scheduler import FetchScheduler


def _granted_after(scheduler: FetchScheduler) -> float:
    """Enter a background turn from another thread; return when it was granted (monotonic)."""
    granted: list[float] = []

    def run() -> None:
        with scheduler.background_turn(threading.Event(), poll=0.01) as allowed:
            assert allowed
            granted.append(time.monotonic())

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert granted, "background turn never granted"
    return granted[0]


def test_background_waits_for_the_quiet_period_after_a_foreground_fetch():
    scheduler = FetchScheduler(background_slots=2, quiet_period=0.3)
    with scheduler.foreground():
        pass
    finished = time.monotonic()
    assert _granted_after(scheduler) - finished >= 0.3


def test_background_waits_while_a_foreground_fetch_is_in_flight():
    scheduler = FetchScheduler(background_slots=2)
    counted = threading.Event()
    release_at: list[float] = []

    def finish_later() -> None:
        with scheduler.foreground():
            counted.set()
            time.sleep(0.2)
            release_at.append(time.monotonic())

    threading.Thread(target=finish_later).start()
    assert counted.wait(10)
    granted = _granted_after(scheduler)
    assert release_at and granted >= release_at[0]


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
    scheduler.note_activity()
    noted = time.monotonic()
    assert _granted_after(scheduler) - noted >= 0.3 - 0.01
