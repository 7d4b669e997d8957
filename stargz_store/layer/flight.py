"""Single flight: at most one fetch per key at a time; everyone else who needs it waits for it."""
from __future__ import annotations

import threading
from typing import Iterable


class Flight:
    """The pending result of one fetch. Set exactly once, with bytes or an exception."""

    __slots__ = ("_done", "result", "error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> bool:
        """True when the flight has landed (either way) within `timeout` seconds."""
        return self._done.wait(max(0.0, timeout))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _land(self, result: bytes | None, error: BaseException | None) -> None:
        self.result = result
        self.error = error
        self._done.set()


class FlightTable:
    """Keys in flight. A caller `claim`s the keys it will fetch and gets the flights of keys
    someone else is already fetching; whoever claimed a key must `finish` it (result or error),
    which removes it from the table before waking the waiters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def claim(self, keys: Iterable[str]) -> tuple[dict[str, Flight], dict[str, Flight]]:
        """(mine, theirs): new flights this caller must complete, and flights already in the air."""
        mine: dict[str, Flight] = {}
        theirs: dict[str, Flight] = {}
        with self._lock:
            for key in keys:
                if key in mine or key in theirs:
                    continue
                f = self._flights.get(key)
                if f is None:
                    f = self._flights[key] = Flight()
                    mine[key] = f
                else:
                    theirs[key] = f
        return mine, theirs

    def finish(self, key: str, flight: Flight, result: bytes | None = None, error: BaseException | None = None) -> None:
        with self._lock:  # landing under the lock makes "first result wins" race-free
            if flight.done:
                return
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight._land(result, error)

    def fail_all(self, error: BaseException) -> None:
        """Land every pending flight with `error` (the layer is closing)."""
        with self._lock:
            for f in self._flights.values():
                if not f.done:
                    f._land(None, error)
            self._flights.clear()

    def in_flight(self, key: str) -> bool:
        with self._lock:
            return key in self._flights

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)
