"""The interface every fetch policy implements: hooks the layer calls, each a no-op by default.

A policy is a guess about what will be read soon, fetched now so that the read finds it cached
or in flight. It never decides how bytes are verified or cached (the `ChunkReader` does), never
waits on what it starts, and never fails a read: a wrong guess costs bytes, nothing else.

Hooks, in the order a layer calls them:
- `on_open()`: the layer was just opened and reported ready (prefetch, background fetch);
- `on_miss(entry, missing, plan)`: a read of `entry` misses `missing` chunks and a request for
  them is being planned: add chunks to `plan` (same request, or one alongside);
- `on_read(entry, offset, size, last_index)`: a read was started (its own chunks are cached or
  in flight): start fetches of what comes next, without waiting;
- `on_data(entry, offset, data)`: a read returned `data`;
- `close()`: the layer is closing; stop.

The layer calls only the hooks a policy overrides, so a policy costs nothing on the paths it does
not hook. A policy is made from the layer it serves, seen through `PolicyHost` (what a policy may
use of it), so this package does not depend on `layer.py`.
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Mapping, Protocol, Sequence, TypeVar

from ...formats.layer_toc import ParsedToc
from ...formats.toc import Chunk, Toc, TocEntry

if TYPE_CHECKING:
    from ..config import LayerConfig
    from ..fetcher import Counters
    from ..reader import ChunkReader, FetchPlan
    from ..scheduler import FetchScheduler


class PolicyHost(Protocol):
    """What a fetch policy may use of its layer (`Layer` implements it)."""

    reader: ChunkReader
    parsed: ParsedToc
    toc: Toc
    config: LayerConfig
    scheduler: FetchScheduler
    counters: Counters
    library_worker: Any
    import_worker: Any

    def read(self, entry: TocEntry, offset: int, size: int) -> bytes: ...

    def fetch_ahead(self, entry: TocEntry) -> bool: ...

    def image_layers(self) -> Sequence[Any]: ...


PolicyFactory = Callable[[PolicyHost], "FetchPolicy"]
Hint = tuple[Callable[[], Sequence[Any]], Any, TocEntry]  # (the image's layers, a layer, a file of it)


class HintWorker:
    """One daemon thread fed a bounded queue of hints (`Hint`s), for a readahead that parses
    files the read path hands over: `_put` never blocks the read path (a hint dropped under load
    costs only the round trips it would have saved), `close` ends the thread after what is
    queued. A subclass sets its own state, then calls `__init__`, and implements `_run`."""

    def __init__(self, name: str, max_queued: int) -> None:
        self._queue: queue.Queue[Hint | None] = queue.Queue(max_queued)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, image_layers: Callable[[], Sequence[Any]], layer: Any, entry: TocEntry) -> None:
        try:
            self._queue.put_nowait((image_layers, layer, entry))
        except queue.Full:
            pass

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        raise NotImplementedError
_Worker = TypeVar("_Worker")


class SharedWorker(Generic[_Worker]):
    """The process's one worker of a kind (one thread for all layers), made on first call:
    `shared = SharedWorker(LibraryReadahead)`, then `shared()`."""

    def __init__(self, make: Callable[[], _Worker]) -> None:
        self._make = make
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def __call__(self) -> _Worker:
        with self._lock:
            if self._worker is None:
                self._worker = self._make()
            return self._worker

HOOKS = ("on_open", "on_miss", "on_read", "on_data", "close")


class FetchPolicy:
    name: ClassVar[str] = ""

    def on_open(self) -> None:
        pass

    def on_miss(self, entry: TocEntry, missing: Mapping[str, Chunk], plan: FetchPlan) -> None:
        pass

    def on_read(self, entry: TocEntry, offset: int, size: int, last_index: int) -> None:
        pass

    def on_data(self, entry: TocEntry, offset: int, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def hooks(self, hook: str) -> bool:
        """Whether this policy overrides `hook` (the layer calls only those)."""
        return getattr(type(self), hook) is not getattr(FetchPolicy, hook)
