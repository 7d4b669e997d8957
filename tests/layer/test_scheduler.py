"""FetchScheduler: background turns only when no foreground fetch runs, at most N at once."""
from __future__ import annotations

import threading
import time

from stargz_store.layer.scheduler import FetchScheduler


def test_background_turn_waits_for_foreground_and_slots():
    sched = FetchScheduler(background_slots=1)
    stop = threading.Event()
    entered = threading.Event()
    leave = threading.Event()

    def background() -> None:
        with sched.background_turn(stop, poll=0.01) as allowed:
            assert allowed
            entered.set()
            leave.wait(10)

    sched.foreground_started()
    t = threading.Thread(target=background)
    t.start()
    time.sleep(0.2)  # not a timing assertion: the turn must not be granted at all meanwhile
    assert not entered.is_set()
    sched.foreground_finished()
    assert entered.wait(10)
    # the single slot is taken: a second background turn waits until the first leaves
    second = threading.Event()

    def background2() -> None:
        with sched.background_turn(stop, poll=0.01) as allowed:
            if allowed:
                second.set()

    t2 = threading.Thread(target=background2)
    t2.start()
    time.sleep(0.2)
    assert not second.is_set()
    leave.set()
    assert second.wait(10)
    t.join()
    t2.join()


def test_stop_ends_a_waiting_turn_without_running_it():
    sched = FetchScheduler()
    sched.foreground_started()
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(sched.background_turn(stop, poll=0.01).__enter__()))
    t.start()
    stop.set()
    t.join(10)
    assert result == [False]
