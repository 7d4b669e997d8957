"""Who may fetch when: on-demand reads first, background fetch only in the gaps, across all layers."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class FetchScheduler:
    """Shared by every layer a resolver opens (a daemon serves many layers from one link).

    On-demand and prefetch fetches report themselves with `foreground_started`/`_finished`; a
    background batch runs only inside `background_turn`, which waits until no foreground fetch is
    in flight anywhere and fewer than `background_slots` batches are running (the Go store's
    `max_concurrency` for background tasks is 2).
    """

    def __init__(self, background_slots: int = 2) -> None:
        self.background_slots = max(1, background_slots)
        self._cond = threading.Condition()
        self._foreground = 0
        self._background = 0

    def foreground_started(self) -> None:
        with self._cond:
            self._foreground += 1

    def foreground_finished(self) -> None:
        with self._cond:
            self._foreground -= 1
            self._cond.notify_all()

    @property
    def foreground_active(self) -> int:
        with self._cond:
            return self._foreground

    @contextmanager
    def background_turn(self, stop: threading.Event, poll: float = 0.05) -> Iterator[bool]:
        """Yields True once a background batch may run (False if `stop` was set meanwhile)."""
        with self._cond:
            while (self._foreground > 0 or self._background >= self.background_slots) and not stop.is_set():
                self._cond.wait(poll)
            if stop.is_set():
                allowed = False
            else:
                allowed = True
                self._background += 1
        try:
            yield allowed
        finally:
            if allowed:
                with self._cond:
                    self._background -= 1
                    self._cond.notify_all()
