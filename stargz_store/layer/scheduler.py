"""Who may fetch when: on-demand reads first, background fetch only in the gaps, across all layers."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class FetchScheduler:
    """Shared by every layer a resolver opens (a daemon serves many layers from one link).

    On-demand and prefetch fetches are counted while they run, by the work item itself on its
    worker thread (`with scheduler.foreground():`, the only way to count one, so every count is
    given back however the item ends; a queued item that is cancelled never held one). A
    background batch runs only inside `background_turn`, which waits until no foreground fetch is
    in flight anywhere, none has finished within the last `quiet_period` seconds, and fewer than
    `background_slots` batches are running (the Go store's `max_concurrency` for background tasks
    is 2).

    The quiet period matters: a starting container reads, computes for a few milliseconds, and
    reads again. Without it every such gap let a background batch onto the link, and the next
    on-demand read queued behind it (the startup benchmark saw 6x the needed bytes arrive before
    the first output).

    Opening a layer counts as activity too (`note_activity`): between a layer being reported
    ready and the container's first read, podman creates the container, which is a quiet stretch
    of a second or more; a background batch started then holds the link when the first reads
    come.
    """

    def __init__(self, background_slots: int = 2, quiet_period: float = 0.0) -> None:
        self.background_slots = max(1, background_slots)
        self.quiet_period = max(0.0, quiet_period)
        self._cond = threading.Condition()
        self._foreground = 0
        self._background = 0
        self._last_foreground_end = float("-inf")

    @contextmanager
    def foreground(self) -> Iterator[None]:
        """Count one foreground fetch for the duration of the block; given back on every way out
        of it (return, error)."""
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._last_foreground_end = time.monotonic()
                self._cond.notify_all()

    def note_activity(self) -> None:
        """Restart the quiet period without a fetch (a layer was just opened)."""
        with self._cond:
            self._last_foreground_end = max(self._last_foreground_end, time.monotonic())
            self._cond.notify_all()

    @property
    def foreground_active(self) -> int:
        with self._cond:
            return self._foreground

    @contextmanager
    def background_turn(self, stop: threading.Event, poll: float = 0.05) -> Iterator[bool]:
        """Yields True once a background batch may run (False if `stop` was set meanwhile)."""
        with self._cond:
            while self._background_must_wait() and not stop.is_set():
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

    def pause_for_foreground(self, stop: threading.Event, max_wait: float, poll: float = 0.05) -> bool:
        """For a background stream inside its `background_turn` (it keeps its slot): wait until no
        foreground fetch is in flight and the quiet period has passed, as a new batch would.
        False when `stop` was set or that did not happen within `max_wait` seconds (the caller
        then gives up its request and its turn)."""
        deadline = time.monotonic() + max_wait
        with self._cond:
            while self._foreground_busy():
                remaining = deadline - time.monotonic()
                if stop.is_set() or remaining <= 0:
                    return False
                self._cond.wait(min(poll, remaining))
        return not stop.is_set()

    def foreground_busy(self) -> bool:
        """A foreground fetch is in flight, or one ended less than the quiet period ago."""
        with self._cond:
            return self._foreground_busy()

    def _foreground_busy(self) -> bool:
        return self._foreground > 0 or time.monotonic() - self._last_foreground_end < self.quiet_period

    def _background_must_wait(self) -> bool:
        return self._background >= self.background_slots or self._foreground_busy()
