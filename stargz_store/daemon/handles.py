"""Who holds an open layer, and when an unheld one is closed.

A layer is held while any of these lasts (each is counted, none is timed):
- a *pin*: the kernel holds the layer's directory (`<ref>/<key>`, from its LOOKUP to its FORGET).
  Whatever the kernel holds below it (the `diff` tree a container's overlay uses, an open file)
  keeps that directory, so a layer in use by a container is always pinned;
- a *use*: containers/storage's `use` notification, until its `rmdir` (release). A pulled layer
  stays used as long as it exists in containers/storage (additional-layer-store.md §8);
- a *hold*: a read or an open file handle in progress (`ImagePool.hold` / `let_go`).
Pins and uses are counted by (reference, key), because they may come before the layer is
resolved, and a layer has two keys (blob digest, TOC digest); holds by layer.

A layer held by nothing is *idle*: it stays open (a re-pull, a new container of the image finds
it warm) in an LRU of at most `max_idle` layers, each for at most `idle_ttl` seconds; beyond that
one thread closes it (its memory is freed, its disk cache stays) and it is reopened on the next
request. Nothing is ever closed under a reader or an open file.

All state is guarded by the pool's lock, which this class is given (the pool's open path and the
closing here touch the same layer slots).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable, Protocol

from .stats import PoolCounters

log = logging.getLogger(__name__)


class Holdable(Protocol):
    """A layer slot as seen here: its image reference, its keys, and the open layer (or None)."""

    ref: str

    def keys(self) -> tuple[str, ...]: ...

    def detach(self) -> object | None:
        """Mark the layer closed and return what must be closed (called with the lock held)."""


class LayerHandles:
    """Pins, uses and holds of layers, and the idle LRU. See the module docstring."""

    def __init__(
        self,
        lock: threading.RLock,
        close: Callable[[Holdable, object], None],
        counters: PoolCounters,
        *,
        collect: Callable[[], None] = lambda: None,
        max_idle: int = 64,
        idle_ttl: float = 120.0,
        max_use_counts: int = 65536,
    ) -> None:
        self._lock = lock
        self._close = close
        self._collect = collect
        self.counters = counters
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self.max_use_counts = max_use_counts
        self.uses: dict[tuple[str, str], int] = {}
        # Told every use count after each change (under the lock, so in order), before the
        # notification is answered: the restart holder keeps them for a process taking over.
        self.on_uses: Callable[[list[tuple[str, str, int]]], None] | None = None
        self._pins: dict[tuple[str, str], int] = {}
        self._holds: dict[Holdable, int] = {}
        self._per_ref: dict[str, int] = {}  # pins + uses + holds of each reference's layers
        self._open: dict[tuple[str, str], Holdable] = {}  # (ref, key) -> open layer slot
        self._idle: OrderedDict[Holdable, float] = OrderedDict()  # open and unheld, oldest first
        self._cond = threading.Condition(lock)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="idle-layers", daemon=True)
        self._thread.start()

    # -- counting -----------------------------------------------------------------------------

    def _count(self, table: dict, key: Hashable, ref: str, delta: int) -> int:
        """Add `delta` to `table[key]` (never below 0; 0 drops the key) and to `ref`'s total."""
        old = table.get(key, 0)
        new = max(0, old + delta)
        if new:
            table[key] = new
        else:
            table.pop(key, None)
        total = self._per_ref.get(ref, 0) + new - old
        if total > 0:
            self._per_ref[ref] = total
        else:
            self._per_ref.pop(ref, None)
        return new

    def use(self, ref: str, key: str) -> None:
        with self._lock:
            if (ref, key) not in self.uses and len(self.uses) >= self.max_use_counts:
                dropped = next(iter(self.uses))  # the least recently counted: its layer may now close when idle
                self._count(self.uses, dropped, dropped[0], -self.uses[dropped])
                self.counters.add("use_counts_dropped")
                log.warning("more than %d layers in use: forgetting the use count of %s %s",
                            self.max_use_counts, *dropped)
                self._maybe_idle(*dropped)
            count = self._count(self.uses, (ref, key), ref, 1)
            self.uses[(ref, key)] = self.uses.pop((ref, key))  # most recent last
            self._busy(ref, key)
            self._uses_changed()
        log.debug("use %s %s (count %d)", ref, key, count)

    def release(self, ref: str, key: str) -> bool:
        """One release of (ref, key); True when no use of it is counted any more."""
        with self._lock:
            before = self.uses.get((ref, key), 0)
            if before == 0:
                self.counters.add("untracked_releases")
            else:
                self._count(self.uses, (ref, key), ref, -1)
                self._uses_changed()
            self._maybe_idle(ref, key)
            left = self.uses.get((ref, key), 0)
        log.debug("release %s %s (count was %d)", ref, key, before)
        return left == 0

    def use_counts(self) -> list[tuple[str, str, int]]:
        """Every counted use, oldest first: what a process taking over the mount adopts."""
        with self._lock:
            return [(ref, key, n) for (ref, key), n in self.uses.items()]

    def adopt_uses(self, counts: list[tuple[str, str, int]]) -> None:
        """Use counts an earlier process of this mount had received (restart hand-over)."""
        with self._lock:
            for ref, key, n in counts:
                if n > 0:
                    self._count(self.uses, (ref, key), ref, n)
                    self._busy(ref, key)

    def _uses_changed(self) -> None:
        if self.on_uses is not None:
            self.on_uses([(ref, key, n) for (ref, key), n in self.uses.items()])

    def pin(self, ref: str, key: str) -> None:
        with self._lock:
            self._count(self._pins, (ref, key), ref, 1)
            self._busy(ref, key)

    def unpin(self, ref: str, key: str) -> None:
        with self._lock:
            self._count(self._pins, (ref, key), ref, -1)
            self._maybe_idle(ref, key)

    def hold(self, slot: Holdable) -> None:
        with self._lock:
            self._count(self._holds, slot, slot.ref, 1)
            self._idle.pop(slot, None)

    def let_go(self, slot: Holdable) -> None:
        with self._lock:
            self._count(self._holds, slot, slot.ref, -1)
            if self._is_open(slot) and not self._held(slot):
                self._make_idle(slot)

    def holds_ref(self, ref: str) -> bool:
        """Whether anything holds a layer of `ref` (or its directories): its image must stay."""
        return self._per_ref.get(ref, 0) > 0

    # -- open layers --------------------------------------------------------------------------

    def opened(self, slot: Holdable) -> None:
        """`slot`'s layer is open now (called with its keys known)."""
        with self._lock:
            for key in slot.keys():
                self._open[(slot.ref, key)] = slot
            if not self._held(slot):
                self._make_idle(slot)

    def forget(self, slot: Holdable) -> None:
        """`slot` is gone with its image (its layer closed by the caller)."""
        with self._lock:
            self._unregister(slot)

    def trim(self, keep: int | None = None, now: float | None = None) -> int:
        """Close the idle layers beyond `keep` (default `max_idle`) and those idle longer than
        `idle_ttl`, now, in this thread; returns how many were closed."""
        with self._lock:
            victims = self._victims(time.monotonic() if now is None else now, self.max_idle if keep is None else keep)
        return self._close_all(victims)

    def _close_all(self, victims: list[tuple[Holdable, object]]) -> int:
        """Close detached layers, then let the cyclic GC see what they held (`collect`): once
        nothing here refers to them any more, or it would keep them alive."""
        count = len(victims)
        while victims:
            slot, detached = victims.pop()
            try:
                self._close(slot, detached)
            except Exception:
                log.exception("closing an idle layer failed")
            del slot, detached
        if count:
            self._collect()
        return count

    def references(self, slot: Holdable) -> dict[str, int]:
        """What holds `slot` now: kernel pins and use notifications (over its keys), reads and
        open files in progress (`holds`); `idle` 1 when it is in the idle LRU."""
        with self._lock:
            ref, keys = slot.ref, slot.keys()
            return {"pins": sum(self._pins.get((ref, k), 0) for k in keys),
                    "uses": sum(self.uses.get((ref, k), 0) for k in keys),
                    "holds": self._holds.get(slot, 0), "idle": int(slot in self._idle)}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"open_layers": len({id(s) for s in self._open.values()}), "idle_layers": len(self._idle),
                    "pinned_layer_dirs": len(self._pins), "reads_in_progress": sum(self._holds.values())}

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._cond.notify_all()

    # -- internals (the lock is held) ---------------------------------------------------------

    def _held(self, slot: Holdable) -> bool:
        if self._holds.get(slot):
            return True
        ref = slot.ref
        return any(self.uses.get((ref, k)) or self._pins.get((ref, k)) for k in slot.keys())

    def _is_open(self, slot: Holdable) -> bool:
        keys = slot.keys()
        return bool(keys) and self._open.get((slot.ref, keys[0])) is slot

    def _busy(self, ref: str, key: str) -> None:
        slot = self._open.get((ref, key))
        if slot is not None:
            self._idle.pop(slot, None)

    def _maybe_idle(self, ref: str, key: str) -> None:
        slot = self._open.get((ref, key))
        if slot is not None and not self._held(slot):
            self._make_idle(slot)

    def _make_idle(self, slot: Holdable) -> None:
        self._idle.pop(slot, None)
        self._idle[slot] = time.monotonic()
        if len(self._idle) > self.max_idle or len(self._idle) == 1:
            self._cond.notify()  # over capacity, or the first deadline to wait for

    def _unregister(self, slot: Holdable) -> None:
        self._idle.pop(slot, None)
        for key in slot.keys():
            if self._open.get((slot.ref, key)) is slot:
                del self._open[(slot.ref, key)]

    def _victims(self, now: float, keep: int) -> list[tuple[Holdable, object]]:
        out = []
        while self._idle:
            slot, since = next(iter(self._idle.items()))
            if len(self._idle) <= keep and now - since < self.idle_ttl:
                break
            self._unregister(slot)
            detached = slot.detach()
            if detached is not None:
                out.append((slot, detached))
        return out

    def _next_wait(self) -> float | None:
        if not self._idle:
            return None
        since = next(iter(self._idle.values()))
        return max(0.0, since + self.idle_ttl - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    victims = self._victims(time.monotonic(), self.max_idle)
                    if victims:
                        break
                    self._cond.wait(self._next_wait())
            self._close_all(victims)
