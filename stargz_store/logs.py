"""Warnings that would repeat once per request, logged once per cause and time window.

A registry that went away fails every read of every container; a full cache disk fails every
chunk write. Logged per request, that is thousands of identical lines that bury the one that
explains it. `Throttled` logs the first occurrence of a cause (its `key`) at the asked level,
the repeats within `window` seconds at debug level only, and the next occurrence after the window
again, saying how many it held back. Metrics count every occurrence (`stargz_store.metrics`).

What must hold: never drops the first line of a cause; bounded memory (`max_keys` causes, the
oldest forgotten first); thread-safe.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Hashable

WINDOW = 60.0
MAX_KEYS = 1024
# Every process of the store (holder, servers, commands) logs lines of this one shape.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Throttled:
    """`log.warning(key, msg, *args)`: see the module docstring."""

    def __init__(self, logger: logging.Logger, window: float = WINDOW, max_keys: int = MAX_KEYS) -> None:
        self.logger = logger
        self.window = window
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: OrderedDict[Hashable, list] = OrderedDict()  # key -> [first logged at, held back since]

    def warning(self, key: Hashable, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object) -> None:
        self.log(logging.ERROR, key, msg, *args)

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)
            if state is not None and now - state[0] < self.window:
                state[1] += 1
                held = -1
            else:
                held = state[1] if state is not None else 0
                self._seen[key] = [now, 0]
                self._seen.move_to_end(key)
                while len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
        if held < 0:
            self.logger.debug(msg, *args)
        elif held:
            self.logger.log(level, msg + " (and %d more like it in the %g s before, logged at debug level)",
                            *args, held, self.window)
        else:
            self.logger.log(level, msg, *args)
