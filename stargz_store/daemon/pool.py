"""The image pool: what the filesystem asks for (`fs.provider.LayerProvider`), from its parts.

- `images.ImageResolver`: references -> manifest, config, layer slots; negative cache, early
  tail, moved tags, the bound on images;
- `handles.LayerHandles`: who holds an open layer (kernel pins, use notifications, reads) and the
  LRU of idle layers that closes what nothing holds;
- `metadata`: manifest/config and layer numbers on disk, pruned with their images;
- `info.LayerInfos`: the `info` JSON; `stats`: counters and the SIGUSR1 document.
This module opens layers (every layer of an image in parallel, as soon as its manifest is known)
and hands them to the filesystem, by key or by layer number.

Errors leave the pool as `fs.errors` types only; the FUSE adapter turns them into errno.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .. import metrics
from ..fs.errors import EntryNotFound, FsError, LayerUnavailable, StaleNode
from ..fs.inodes import MAX_LAYER_NUMBER, diff_ino
from ..fs.layer_tree import LayerTree
from ..fs.model import ImageFiles, ServedLayer
from .handles import LayerHandles
from .images import Image, ImageResolver, Shutdown, Slot, as_fs_error, parse_ref
from .info import LayerInfos
from .metadata import LayerNumbers, MetadataStore
from .pool_config import PoolConfig
from .protocols import EarlyTail, LayerOpener, OpenLayer, RegistryAccess
from .stats import PoolCounters, layer_stats

from ..layer import release_frozen
from ..layer.start_fetch import start_image

log = logging.getLogger(__name__)

__all__ = ["ImagePool", "PoolConfig"]

LAYER_NUMBERS_FILE = "layer-numbers"


class ImagePool:
    """Implements `fs.provider.LayerProvider` over a registry and a layer opener.

    `metadata_dir` (the daemon's `<root>/pool`) keeps each image's manifest and config, and the
    layer numbers (`layer-numbers`); None keeps nothing on disk.
    """

    def __init__(
        self,
        client: RegistryAccess,
        resolver: LayerOpener,
        config: PoolConfig | None = None,
        *,
        metadata_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.resolver = resolver
        self.config = config or PoolConfig()
        self._lock = threading.RLock()  # one lock for resolution, slots and handles (see `handles`)
        self.shutdown = Shutdown()
        self.counters = PoolCounters()
        self.metadata = MetadataStore(metadata_dir, self.config.max_images)
        self.numbers = LayerNumbers(metadata_dir / LAYER_NUMBERS_FILE if metadata_dir is not None else None)
        self.handles = LayerHandles(
            self._lock, self._close_layer, self.counters, collect=release_frozen, max_idle=self.config.idle_layers,
            idle_ttl=self.config.release_grace, max_use_counts=self.config.max_use_counts,
        )
        self._layer_executor = ThreadPoolExecutor(max(1, self.config.resolve_workers), thread_name_prefix="resolve-layer")
        self.images = ImageResolver(
            client, resolver, self.config, lock=self._lock, shutdown=self.shutdown, counters=self.counters,
            metadata=self.metadata, numbers=self.numbers, early_tail_executor=self._layer_executor,
            on_indexed=self._open_all, on_dropped=self._drop_image, holds=self.handles.holds_ref,
        )
        self._numbered: dict[int, tuple[Image, Slot]] = {}
        # Before podman's first lookup: the first pull should not pay for scheme discovery.
        threading.Thread(target=self._learn_schemes, name="registry-schemes", daemon=True).start()

    def _learn_schemes(self) -> None:
        try:
            self.client.learn_schemes()
        except Exception:  # an optimisation only: the first request finds out the same
            log.debug("learning registry schemes failed", exc_info=True)

    # -- LayerProvider ------------------------------------------------------------------------

    def canonical_ref(self, text: str) -> str:
        return str(parse_ref(text))

    def resolved(self, ref: str, key: str = "") -> bool:
        return self.images.resolved(ref, key)

    def image_files(self, ref: str) -> ImageFiles:
        return self.images.image(ref).files()

    def layer(self, ref: str, key: str) -> ServedLayer:
        deadline = time.monotonic() + self.config.resolve_timeout
        image = self.images.image(ref, deadline=deadline, first_key=key)
        self.images.touch(image)
        slot = self._slot_for(image, key, deadline)
        served = slot.served or self._open(image, slot, deadline)
        if key not in served.infos:
            raise EntryNotFound(f"{ref}: layer {slot.blob_digest} cannot be served under key {key}")
        return served

    def numbered(self, number: int) -> ServedLayer:
        image, slot = self._numbered_slot(number)
        return slot.served or self._open(image, slot, time.monotonic() + self.config.resolve_timeout)

    def hold(self, number: int) -> ServedLayer:
        image, slot = self._numbered_slot(number)
        self.handles.hold(slot)  # first: once open, it cannot become idle under us
        try:
            return slot.served or self._open(image, slot, time.monotonic() + self.config.resolve_timeout)
        except BaseException:
            self.handles.let_go(slot)
            raise

    def let_go(self, served: ServedLayer) -> None:
        found = self._numbered.get(served.number)
        if found is not None:
            self.handles.let_go(found[1])

    def pin(self, ref: str, key: str) -> None:
        self.handles.pin(ref, key)

    def unpin(self, ref: str, key: str) -> None:
        self.handles.unpin(ref, key)

    def use(self, ref: str, key: str) -> None:
        self.counters.add("uses")
        self.handles.use(ref, key)

    def release(self, ref: str, key: str) -> bool:
        self.counters.add("releases")
        return self.handles.release(ref, key)

    def forget_failures(self, ref: str) -> None:
        """Drop the remembered failures of `ref` (a canonical reference): something that decides
        whether it can be resolved changed (the runtime sent new credentials for it), so the next
        lookup tries the registry again instead of answering the old error for `negative_ttl`."""
        self.images.forget_failures(ref)

    def known_refs(self) -> list[str]:
        return self.images.known_refs()

    # -- slots --------------------------------------------------------------------------------

    def _numbered_slot(self, number: int) -> tuple[Image, Slot]:
        found = self._numbered.get(number)
        if found is None:
            known = self.numbers.layer(number)  # kept on disk, its image not resolved in this process yet
            if known is None:
                raise StaleNode(f"no layer number {number}")
            self.layer(*known)
            found = self._numbered.get(number)
            if found is None:
                raise StaleNode(f"layer number {number} ({known[0]} {known[1]}) is not in its image any more")
        return found

    def _slot_for(self, image: Image, key: str, deadline: float) -> Slot:
        try:
            return self._find_slot(image, key, deadline)
        except EntryNotFound:
            if not self.images.refresh(image):
                raise
        return self._find_slot(image, key, deadline)

    def _find_slot(self, image: Image, key: str, deadline: float) -> Slot:
        slot = image.slots.get(key)
        if slot is None:
            blob = image.by_toc.get(key)
            if blob is not None:
                slot = image.slots[blob]
        if slot is not None:
            return slot
        # A TOC digest that no annotation announced: wait for the layers and compare computed ones.
        for candidate in list(image.slots.values()):
            if candidate.future is not None and candidate.served is None:
                try:
                    self.shutdown.wait_result(candidate.future, deadline)
                except Exception:
                    pass
            if candidate.served is not None and key in candidate.served.infos:
                return candidate
        raise EntryNotFound(f"{image.ref}: no layer with digest {key}")

    # -- opening ------------------------------------------------------------------------------

    def _open_all(self, image: Image, slots: list[Slot]) -> None:
        """New slots of `image`: numbered, and their layers opened in parallel."""
        with self._lock:
            for slot in slots:
                if slot.number > MAX_LAYER_NUMBER:
                    log.error("layer number %d is beyond %d: inode numbers would overflow", slot.number, MAX_LAYER_NUMBER)
                self._numbered[slot.number] = (image, slot)
        for slot in slots:
            self._submit_open(image, slot)

    def _submit_open(self, image: Image, slot: Slot) -> Future[ServedLayer]:
        with self._lock:
            if self.shutdown.is_set():
                raise LayerUnavailable("the store is shutting down")
            future = slot.future
            if future is not None and not (future.done() and slot.served is None and time.monotonic() >= slot.failed_until):
                return future
            # The early tail goes to the open now, under the lock: taken when the open task runs,
            # it could be dropped first as "taken by no layer" once the image is resolved.
            early_tail = self.images.take_early_tail(image, slot)
            future = self._layer_executor.submit(self._open_slot, image, slot, early_tail)
            slot.future = future
            return future

    def _open(self, image: Image, slot: Slot, deadline: float) -> ServedLayer:
        future = self._submit_open(image, slot)
        remembered = future.done()
        try:
            return self.shutdown.wait_result(future, deadline)
        except FutureTimeout:
            raise LayerUnavailable(f"{image.ref}: layer {slot.blob_digest} not ready after {self.config.resolve_timeout:g} s") from None
        except FsError:
            if remembered:
                self.counters.add("negative_hits")
            raise

    def _open_slot(self, image: Image, slot: Slot, early_tail: EarlyTail | None = None) -> ServedLayer:
        began = time.monotonic()
        try:
            layer = self._with_config(image, self.resolver.open_layer(image.ref, slot.descriptor, early_tail=early_tail))
        except Exception as e:
            metrics.resolve_seconds.labels("layer").observe(time.monotonic() - began)  # (its registry errors
            # are counted where the TOC was fetched)
            error = as_fs_error(e, f"{image.ref}: layer {slot.blob_digest}")
            with self._lock:
                slot.failed_until = time.monotonic() + self.config.negative_ttl
            self.counters.add("layer_open_failures")
            if isinstance(error, EntryNotFound):
                log.info("%s", error)
            else:
                log.warning("%s", error)
            try:
                raise error from None
            finally:
                del error  # its traceback holds this frame: no error -> traceback -> frame -> error cycle
        metrics.resolve_seconds.labels("layer").observe(time.monotonic() - began)
        self._attach_image(layer, image)
        parsed = layer.parsed
        infos = LayerInfos(slot, parsed) if slot.diff_id else {}
        served = ServedLayer(layer, LayerTree(parsed.toc, diff_ino(slot.number, 0)), infos, ref=image.key,
                             number=slot.number, blob_digest=slot.blob_digest, toc_digest=parsed.toc_digest)
        with self._lock:
            current = self._numbered.get(slot.number)
            if current is None or current[1] is not slot:  # its image was forgotten meanwhile
                forgotten = True
            else:
                forgotten = False
                slot.toc_digest = parsed.toc_digest
                slot.served = served
                image.by_toc.setdefault(parsed.toc_digest, slot.blob_digest)
                self.handles.opened(slot)
        if forgotten:
            _close_quietly(layer)
            raise LayerUnavailable(f"{image.ref} was forgotten while its layer {slot.blob_digest} opened")
        self.counters.add("layer_opens")
        log.info("%s: layer %s ready (%s, %d entries)", image.ref, slot.blob_digest, parsed.format, len(parsed.toc))
        self._start_fetch_when_complete(image)
        return served

    def _start_fetch_when_complete(self, image: Image) -> None:
        """Once every layer of `image` is open (the first time only), start fetching what its
        config's command will read first (layer/start_fetch.py), on a thread of its own."""
        with self._lock:
            if image.start_fetched or any(s.served is None for s in image.slots.values()):
                return
            image.start_fetched = True
            layers = _open_layers(image)
        start_image(layers, image.config_raw, name=image.key)

    def _with_config(self, image: Image, layer: OpenLayer) -> OpenLayer:
        """`layer` once the image's config is known (its `info` needs the DiffID); closed if the
        config never comes."""
        if not image.config_ready.wait(self.config.resolve_timeout) or image.config_error is not None:
            _close_quietly(layer)
            raise image.config_error or LayerUnavailable(f"config of {image.ref} not fetched in time")
        return layer

    def _attach_image(self, layer: OpenLayer, image: Image) -> None:
        """Give the layer a view of its image's open layers, topmost first (library readahead
        resolves the libraries a program loads in it)."""
        layer.attach_image(lambda: _open_layers(image))

    # -- closing ------------------------------------------------------------------------------

    def _close_layer(self, slot: Slot, served: object) -> None:
        """An idle layer `handles` detached: close it (its memory goes, its disk cache stays)."""
        assert isinstance(served, ServedLayer)
        log.info("%s: closing idle layer %s", slot.ref, slot.blob_digest)
        _close_quietly(served.layer)
        self.counters.add("layers_closed")

    def _drop_image(self, image: Image) -> None:
        """`image` is forgotten (nothing holds it): close its layers, forget its numbers."""
        closed = []
        with self._lock:
            for slot in image.slots.values():
                self.handles.forget(slot)
                self._numbered.pop(slot.number, None)
                served = slot.detach()
                if served is not None:
                    closed.append(served)
        count = len(closed)
        while closed:
            _close_quietly(closed.pop().layer)
        self.counters.add("layers_closed", count)
        if count:
            release_frozen()

    def close(self) -> None:
        """Stop background work, wake every waiting lookup (EIO) and close every open layer.

        Disk caches stay. Idempotent. Threads still inside a registry request finish on their own
        timeouts; the daemon does not wait for them.
        """
        self.shutdown.event.set()
        self.handles.close()
        with self._lock:
            served = [slot.detach() for _, slot in self._numbered.values()]
        for s in served:
            if s is not None:
                _close_quietly(s.layer)
        self.images.close()
        self._layer_executor.shutdown(wait=False, cancel_futures=True)

    # -- what is served now (status, metrics, the cache janitor) -------------------------------

    def served_layers(self) -> list[tuple[dict[str, Any], OpenLayer]]:
        """Every open layer with what holds it: ({"image", "layer" (blob digest), "number",
        "toc_digest", "pins", "uses", "holds", "idle"}, the layer)."""
        with self._lock:
            open_slots = [(slot, slot.served) for _, slot in self._numbered.values() if slot.served is not None]
            rows = []
            for slot, served in open_slots:
                row: dict[str, Any] = {"image": slot.ref, "layer": slot.blob_digest, "number": slot.number,
                                       "toc_digest": slot.toc_digest}
                row.update(self.handles.references(slot))
                rows.append((row, served.layer))
        return rows

    def image_refs(self) -> list[str]:
        """The images resolved now."""
        with self._lock:
            return sorted(self.images.images)

    # -- counters -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The SIGUSR1 document (`stats`)."""
        pool: dict[str, Any] = self.counters.snapshot()
        with self._lock:
            pool["images"] = len(self.images.images)
            pool["layer_numbers"] = len(self.numbers)
            refcounts = {f"{r} {k}": c for (r, k), c in self.handles.uses.items()}
            layers = {f"{slot.ref}@{slot.blob_digest}": slot.served.layer.stats
                      for _, slot in self._numbered.values() if slot.served is not None}
        pool.update(self.handles.stats())
        return {"pool": pool, "refcounts": refcounts, "layers": layer_stats(layers)}


def _open_layers(image: Image) -> list[Any]:
    """The open layers of `image`, topmost first (the merged view's lookup order)."""
    slots = sorted(image.slots.values(), key=lambda s: s.index, reverse=True)
    return [s.served.layer for s in slots if s.served is not None]


def _close_quietly(layer: OpenLayer) -> None:
    try:
        layer.close()
    except Exception:
        log.exception("closing layer failed")
