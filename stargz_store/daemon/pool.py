"""The image pool: references -> manifest/config -> every layer resolved in parallel.

What must hold (additional-layer-store.md §4, §8, §9):
- the first lookup of any layer of an image resolves the manifest (host platform) and config
  once, and opens *all* its layers' TOCs in parallel, because podman asks for every layer in a row;
- a layer is found by its compressed blob digest (Podman <= 5.0) or its TOC digest (5.1+);
- anything we cannot serve lazily answers ENOENT (plain layers, unknown refs/digests) or EIO
  (registry or verification trouble) quickly; failures are remembered for `negative_ttl` seconds so
  a retry storm does not reach the registry;
- `use`/`release` keep per-(ref, key) counts; a layer nobody uses and nobody touched for
  `release_grace` seconds is closed (memory freed, disk cache kept) and transparently reopened on
  the next access, since containers/storage may come back to a linked `diff` at any time;
- manifest and config are kept under `<root>/pool/` so a restarted daemon re-serves the layers
  containers/storage already linked, even for a tag that has moved since (as stargz-store does);
- a key the known manifest lacks makes us re-read a tag's manifest (at most once per
  `negative_ttl`): the layers of the new manifest are added, the old ones stay served, because
  containers made from the old image still use their `diff` paths.

Errors leave this module as `fs.errors` types only; the FUSE adapter turns them into errno.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..formats.errors import FormatError, NotLazyFormatError
from ..fs.errors import EntryNotFound, FsError, InvalidName, LayerUnavailable
from ..fs.layer_tree import LayerTree
from ..fs.model import ImageFiles, ServedLayer
from ..layer import release_frozen
from ..registry.client import Manifest, RegistryClient
from ..registry.errors import (
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    UnsupportedManifestError,
)
from ..registry.manifest import sha256_digest
from ..registry.reference import Reference, parse_reference
from .info import info_for_blob_key, info_for_toc_key, toc_digest_annotation

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass
class PoolConfig:
    """Times in seconds."""

    resolve_timeout: float = 30.0  # the longest a lookup waits for an image or layer (stargz-store: 30 s)
    negative_ttl: float = 10.0  # how long a failed resolution is answered from memory
    release_grace: float = 120.0  # unused layers are closed this long after their last access
    resolve_workers: int = 8  # layers opened in parallel (TOC fetch + prefetch)
    platform: str | None = None  # None = the host platform
    reap_interval: float = 5.0


class _Slot:
    """One layer of a resolved image; `served` is set while the layer is open."""

    def __init__(self, index: int, descriptor: Mapping[str, Any], diff_id: str | None, number: int) -> None:
        self.index = index
        self.descriptor = dict(descriptor)
        self.blob_digest: str = descriptor["digest"]
        self.toc_annotation = toc_digest_annotation(descriptor)
        self.diff_id = diff_id
        self.number = number
        self.future: Future[ServedLayer] | None = None
        self.failed_until = 0.0
        self.served: ServedLayer | None = None
        self.last_access = time.monotonic()


class _Image:
    """A resolved reference: its manifest, config and layer slots."""

    def __init__(self, ref: Reference, manifest: Manifest, config_raw: bytes, from_disk: bool) -> None:
        self.ref = ref
        self.manifest = manifest
        self.config_raw = config_raw
        self.from_disk = from_disk
        # Set once the config (and so the layers' DiffIDs) is known: layers of a fetched image are
        # opened while the config is still on its way; `config_error` says why it never came.
        self.config_ready = threading.Event()
        self.config_error: FsError | None = None
        if config_raw:
            self.config_ready.set()
        self.slots: dict[str, _Slot] = {}
        self.by_toc: dict[str, str] = {}
        self.last_access = time.monotonic()
        self.checked_at = 0.0 if from_disk else time.monotonic()

    def files(self) -> ImageFiles:
        keys = list(self.slots) + list(self.by_toc)
        return ImageFiles(manifest=self.manifest.raw, config=self.config_raw, layer_keys=tuple(keys))


class ImagePool:
    """Implements `fs.model.LayerProvider` over a registry client and a layer resolver."""

    def __init__(
        self,
        client: RegistryClient,
        resolver: Any,
        config: PoolConfig | None = None,
        *,
        metadata_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.resolver = resolver
        self.config = config or PoolConfig()
        self.metadata_dir = metadata_dir
        self._lock = threading.RLock()  # re-entered when a refresh indexes new layers
        self._images: dict[str, _Image] = {}
        self._pending: dict[str, Future[_Image]] = {}
        # (ref key, blob digest) -> the tail of the blob podman asked for first, fetched while the
        # manifest is (`_start_early_tail`); refs whose manifest is being fetched
        self._early_tails: dict[tuple[str, str], Future] = {}
        self._manifest_pending: set[str] = set()
        self._negative: dict[str, tuple[float, FsError]] = {}
        self._refcounts: dict[tuple[str, str], int] = {}
        self._layer_numbers: dict[tuple[str, str], int] = {}
        self._counters = {
            "image_resolves": 0,
            "image_resolve_failures": 0,
            "image_loads_from_disk": 0,
            "layer_opens": 0,
            "layer_open_failures": 0,
            "layers_closed": 0,
            "negative_hits": 0,
            "uses": 0,
            "releases": 0,
            "untracked_releases": 0,
        }
        self._image_executor = ThreadPoolExecutor(4, thread_name_prefix="resolve-image")
        self._layer_executor = ThreadPoolExecutor(max(1, self.config.resolve_workers), thread_name_prefix="resolve-layer")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="layer-reaper", daemon=True)
        self._reaper.start()
        if callable(getattr(client, "learn_schemes", None)):
            # Before podman's first lookup: the first pull should not pay for scheme discovery.
            threading.Thread(target=self._learn_schemes, name="registry-schemes", daemon=True).start()

    def _learn_schemes(self) -> None:
        try:
            self.client.learn_schemes()
        except Exception:  # an optimisation only: the first request finds out the same
            log.debug("learning registry schemes failed", exc_info=True)

    # -- LayerProvider ------------------------------------------------------------------------

    def canonical_ref(self, text: str) -> str:
        return str(_parse_ref(text))

    def resolved(self, ref: str, key: str = "") -> bool:
        image = self._images.get(ref)  # no lock: a dict read is atomic, and a stale answer is harmless
        return image is not None and (not key or key in image.slots or key in image.by_toc)

    def warm(self, ref: str) -> None:
        try:
            self._image(ref, wait=False)
        except FsError:
            pass

    def image_files(self, ref: str) -> ImageFiles:
        image = self._image(ref)
        assert image is not None
        return image.files()

    def layer(self, ref: str, key: str) -> ServedLayer:
        now = time.monotonic()
        deadline = now + self.config.resolve_timeout
        image = self._image(ref, deadline=deadline, first_key=key)
        assert image is not None
        image.last_access = now
        slot = self._slot_for(image, key, deadline)
        slot.last_access = now
        served = slot.served
        if served is None:
            served = self._open(image, slot, deadline)
        if key not in served.infos:
            raise EntryNotFound(f"{ref}: layer {slot.blob_digest} cannot be served under key {key}")
        return served

    def use(self, ref: str, key: str) -> None:
        with self._lock:
            self._refcounts[(ref, key)] = self._refcounts.get((ref, key), 0) + 1
            self._counters["uses"] += 1
        log.debug("use %s %s", ref, key)

    def release(self, ref: str, key: str) -> None:
        with self._lock:
            self._counters["releases"] += 1
            count = self._refcounts.get((ref, key), 0)
            if count <= 1:
                self._refcounts.pop((ref, key), None)
                if count == 0:
                    self._counters["untracked_releases"] += 1
            else:
                self._refcounts[(ref, key)] = count - 1
        log.debug("release %s %s (count was %d)", ref, key, count)

    def forget_failures(self, ref: str) -> None:
        """Drop the remembered failures of `ref` (a canonical reference): something that decides
        whether it can be resolved changed (the runtime sent new credentials for it), so the next
        lookup tries the registry again instead of answering the old error for `negative_ttl`."""
        with self._lock:
            self._negative.pop(ref, None)
            image = self._images.get(ref)
            for slot in image.slots.values() if image is not None else ():
                slot.failed_until = 0.0

    def known_refs(self) -> list[str]:
        with self._lock:
            return list(self._images)

    # -- images -------------------------------------------------------------------------------

    def _image(
        self, ref: str, *, wait: bool = True, deadline: float | None = None, first_key: str | None = None
    ) -> _Image | None:
        image = self._images.get(ref)  # the hot path of every read: no lock (a dict read is atomic)
        if image is not None:
            return image
        if self._stop.is_set():
            raise LayerUnavailable("the store is shutting down")
        with self._lock:
            image = self._images.get(ref)
            if image is not None:
                return image
            negative = self._negative.get(ref)
            if negative is not None:
                if negative[0] > time.monotonic():
                    self._counters["negative_hits"] += 1
                    raise _fresh(negative[1])
                del self._negative[ref]
            future = self._pending.get(ref)
            reference = _parse_ref(ref)  # a key canonical_ref made: parses back to the same reference
            if future is None:
                self._manifest_pending.add(ref)
                future = self._image_executor.submit(self._resolve_image, ref, reference)
                self._pending[ref] = future
            if first_key is not None and ref in self._manifest_pending and (ref, first_key) not in self._early_tails:
                self._start_early_tail(ref, reference, first_key)
        if not wait:
            return None
        try:
            return self._result(future, deadline or time.monotonic() + self.config.resolve_timeout)
        except FutureTimeout:
            raise LayerUnavailable(f"resolving {ref} takes longer than {self.config.resolve_timeout:g} s") from None
        except FsError as e:
            raise _fresh(e) from None

    def _start_early_tail(self, key: str, ref: Reference, layer_key: str) -> None:
        """Ask for the tail of the layer podman looks up first while the manifest is being fetched.

        Its size is not known before the manifest, but a suffix range needs none; the bytes are
        used only if the manifest then lists that blob with that size, and verified against its
        TOC digest like any tail. Saves one round trip on the first pull of an image. A key that
        is a TOC digest (podman 5.1+) names no blob: that guess costs one 404. Called with the
        lock held."""
        if not _DIGEST_RE.fullmatch(layer_key) or self._metadata_path_exists(ref):
            return
        fetch_tail = getattr(self.resolver, "fetch_tail", None)
        if fetch_tail is None:
            return
        try:
            self._early_tails[(key, layer_key)] = self._layer_executor.submit(fetch_tail, ref, layer_key)
        except RuntimeError:  # shutting down
            pass

    def _metadata_path_exists(self, ref: Reference) -> bool:
        path = self._metadata_path(ref)
        return path is not None and (path / "meta.json").exists()

    def _resolve_image(self, key: str, ref: Reference) -> _Image:
        try:
            image = self._load_from_disk(ref)
            if image is None:
                image = self._fetch_image(key, ref)
            else:
                self._manifest_known(key)
                self._index_layers(key, image, image.manifest, self._diff_ids(key, image.config_raw))
        except Exception as e:
            error = _as_fs_error(e, f"resolving {key}")
            with self._lock:
                self._pending.pop(key, None)
                self._negative[key] = (time.monotonic() + self.config.negative_ttl, error)
                self._counters["image_resolve_failures"] += 1
                self._manifest_pending.discard(key)
                self._drop_early_tails(key)
            log.info("cannot resolve %s: %s", key, error)
            raise error from None
        with self._lock:
            self._images[key] = image
            self._pending.pop(key, None)
            self._drop_early_tails(key)  # a guess no layer took (a TOC digest, a stale key)
        for slot in image.slots.values():
            self._submit_open(image, slot)
        log.info("resolved %s: manifest %s, %d layers", key, image.manifest.digest, len(image.slots))
        return image

    def _manifest_known(self, key: str) -> None:
        """From now on the layers' own opens fetch their tails: no more early ones."""
        with self._lock:
            self._manifest_pending.discard(key)

    def _drop_early_tails(self, key: str) -> None:
        for k in [k for k in self._early_tails if k[0] == key]:
            self._early_tails.pop(k).cancel()

    def _fetch_image(self, key: str, ref: Reference) -> _Image:
        """Manifest, then the layers' TOCs and the config at the same time: the layers do not
        need the config (only their `info` files do, for the DiffID), so the TOCs are not held
        up a round trip by it."""
        try:
            manifest = self.client.get_manifest(ref, self.config.platform)
        finally:
            self._manifest_known(key)
        image = _Image(ref, manifest, b"", from_disk=False)
        self._index_layers(key, image, manifest, None)
        for slot in image.slots.values():
            self._submit_open(image, slot)
        try:
            config_raw = self.client.get_blob(ref, manifest.config["digest"])
            self._set_diff_ids(key, image, manifest, self._diff_ids(key, config_raw))
            image.config_raw = config_raw
        except Exception as e:
            image.config_error = _as_fs_error(e, f"config of {key}")
            raise
        finally:
            image.config_ready.set()  # layers opened meanwhile see the DiffIDs (set first) or the error
        with self._lock:
            self._counters["image_resolves"] += 1
        self._save_to_disk(ref, manifest, config_raw)
        return image

    @staticmethod
    def _diff_ids(key: str, config_raw: bytes) -> list:
        try:
            config = json.loads(config_raw)
            return list((config.get("rootfs") or {}).get("diff_ids") or [])
        except (ValueError, AttributeError, TypeError) as e:
            raise UnsupportedManifestError(f"config of {key} is not valid JSON: {e}") from None

    @staticmethod
    def _set_diff_ids(key: str, image: _Image, manifest: Manifest, diff_ids: list) -> None:
        layers = manifest.layers
        if len(diff_ids) != len(layers):
            log.warning("%s: %d layers but %d diff_ids; DiffIDs will not be reported", key, len(layers), len(diff_ids))
            return
        for descriptor, diff_id in zip(layers, diff_ids):
            slot = image.slots.get(descriptor.get("digest"))
            if slot is not None and slot.diff_id is None:
                slot.diff_id = diff_id

    def _index_layers(self, key: str, image: _Image, manifest: Manifest, diff_ids: list | None) -> list[_Slot]:
        """Add slots for the layers of `manifest`; returns the new ones. Without `diff_ids` (the
        config is still being fetched) `_set_diff_ids` fills them in later."""
        added = []
        for i, descriptor in enumerate(manifest.layers):
            digest = descriptor.get("digest")
            if not isinstance(digest, str) or digest in image.slots:
                continue
            slot = _Slot(i, descriptor, None, self._layer_number(key, digest))
            image.slots[digest] = slot
            added.append(slot)
            if slot.toc_annotation:
                image.by_toc.setdefault(slot.toc_annotation, digest)
        if diff_ids is not None:
            self._set_diff_ids(key, image, manifest, diff_ids)
        return added

    def _refresh(self, key: str, image: _Image) -> bool:
        """Re-read a tag's manifest; add the layers of a new one. True when something was added."""
        if image.ref.digest is not None:
            return False  # pinned: the manifest cannot change
        with self._lock:
            if time.monotonic() - image.checked_at < self.config.negative_ttl:
                return False
            image.checked_at = time.monotonic()
        try:
            manifest = self.client.get_manifest(image.ref, self.config.platform)
            if manifest.digest == image.manifest.digest:
                return False
            config_raw = self.client.get_blob(image.ref, manifest.config["digest"])
            diff_ids = self._diff_ids(key, config_raw)
            with self._lock:
                self._counters["image_resolves"] += 1
                added = self._index_layers(key, image, manifest, diff_ids)
                image.manifest, image.config_raw = manifest, config_raw
        except Exception as e:
            log.info("re-checking %s: %s", key, _as_fs_error(e, "refresh"))
            return False
        self._save_to_disk(image.ref, manifest, config_raw)
        log.info("%s now points to manifest %s (%d new layers)", key, manifest.digest, len(added))
        for slot in added:
            self._submit_open(image, slot)
        return bool(added)

    def _layer_number(self, ref: str, blob_digest: str) -> int:
        with self._lock:
            number = self._layer_numbers.get((ref, blob_digest))
            if number is None:
                number = len(self._layer_numbers) + 1
                self._layer_numbers[(ref, blob_digest)] = number
            return number

    # -- layers -------------------------------------------------------------------------------

    def _slot_for(self, image: _Image, key: str, deadline: float) -> _Slot:
        try:
            return self._find_slot(image, key, deadline)
        except EntryNotFound:
            if not self._refresh(str(image.ref), image):
                raise
        return self._find_slot(image, key, deadline)

    def _find_slot(self, image: _Image, key: str, deadline: float) -> _Slot:
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
                    self._result(candidate.future, deadline)
                except Exception:
                    pass
            if candidate.served is not None and key in candidate.served.infos:
                return candidate
        raise EntryNotFound(f"{image.ref}: no layer with digest {key}")

    def _result(self, future: Future, deadline: float):
        """`future.result()` until `deadline` (FutureTimeout), cut short by `close()` (EIO)."""
        while True:
            if self._stop.is_set():
                raise LayerUnavailable("the store is shutting down")
            remaining = deadline - time.monotonic()
            try:
                return future.result(max(0.0, min(0.2, remaining)))
            except FutureTimeout:
                if remaining <= 0.2:
                    raise

    def _submit_open(self, image: _Image, slot: _Slot) -> Future[ServedLayer]:
        with self._lock:
            if self._stop.is_set():
                raise LayerUnavailable("the store is shutting down")
            future = slot.future
            if future is not None and not (future.done() and slot.served is None and time.monotonic() >= slot.failed_until):
                return future
            # The early tail goes to the open now, under the lock: taken when the open task runs,
            # it could be dropped first as "taken by no layer" once the image is resolved.
            early_tail = self._early_tails.pop((str(image.ref), slot.blob_digest), None)
            future = self._layer_executor.submit(self._open_slot, image, slot, early_tail)
            slot.future = future
            return future

    def _open(self, image: _Image, slot: _Slot, deadline: float) -> ServedLayer:
        future = self._submit_open(image, slot)
        remembered = future.done()
        try:
            return self._result(future, deadline)
        except FutureTimeout:
            raise LayerUnavailable(f"{image.ref}: layer {slot.blob_digest} not ready after {self.config.resolve_timeout:g} s") from None
        except FsError as e:
            if remembered:
                with self._lock:
                    self._counters["negative_hits"] += 1
            raise _fresh(e) from None

    def _open_slot(self, image: _Image, slot: _Slot, early_tail: Future | None = None) -> ServedLayer:
        try:
            layer = self._with_config(image, self.resolver.open_layer(image.ref, slot.descriptor, early_tail=early_tail))
        except Exception as e:
            error = _as_fs_error(e, f"{image.ref}: layer {slot.blob_digest}")
            with self._lock:
                slot.failed_until = time.monotonic() + self.config.negative_ttl
                self._counters["layer_open_failures"] += 1
            if isinstance(error, EntryNotFound):
                log.info("%s", error)
            else:
                log.warning("%s", error)
            raise error from None
        layer.attach_image(lambda image=image: self._open_layers_top_first(image))  # for library readahead
        parsed = layer.parsed
        toc = layer.toc
        infos: Mapping[str, bytes] = _LayerInfos(slot, parsed) if slot.diff_id else {}
        served = ServedLayer(layer, LayerTree(toc, slot.number << 32), infos)
        with self._lock:
            slot.served = served
            slot.last_access = time.monotonic()
            image.by_toc.setdefault(parsed.toc_digest, slot.blob_digest)
            self._counters["layer_opens"] += 1
        log.info("%s: layer %s ready (%s, %d entries)", image.ref, slot.blob_digest, parsed.format, len(toc))
        return served

    def _with_config(self, image: _Image, layer: Any) -> Any:
        """`layer` once the image's config is known (its `info` needs the DiffID); closed if the
        config never comes."""
        if not image.config_ready.wait(self.config.resolve_timeout) or image.config_error is not None:
            _close_quietly(layer)
            raise image.config_error or LayerUnavailable(f"config of {image.ref} not fetched in time")
        return layer

    # -- lifetime -----------------------------------------------------------------------------

    def _open_layers_top_first(self, image: _Image) -> list[Any]:
        """The image's open layers, topmost first (the merged view library readahead resolves in)."""
        slots = sorted(image.slots.values(), key=lambda s: s.index, reverse=True)
        return [s.served.layer for s in slots if s.served is not None]

    def _in_use(self, ref: str, slot: _Slot, served: ServedLayer) -> bool:
        keys = {slot.blob_digest, *served.infos}
        return any(self._refcounts.get((ref, k), 0) > 0 for k in keys)

    def reap(self, now: float | None = None) -> int:
        """Close layers unused for `release_grace` seconds; drop idle images. Returns layers closed."""
        now = time.monotonic() if now is None else now
        grace = self.config.release_grace
        to_close: list[tuple[str, _Slot, ServedLayer]] = []
        with self._lock:
            for key, image in list(self._images.items()):
                for slot in image.slots.values():
                    served = slot.served
                    if served is None or served.open_count > 0 or now - slot.last_access < grace:
                        continue
                    if self._in_use(key, slot, served):
                        continue
                    slot.served = None
                    slot.future = None
                    to_close.append((key, slot, served))
                idle = all(s.served is None for s in image.slots.values()) and now - image.last_access >= grace
                pinned = any(r == key and c > 0 for (r, _), c in self._refcounts.items())
                if idle and not pinned:
                    del self._images[key]
            for key in [k for k, (until, _) in self._negative.items() if until <= now]:
                del self._negative[key]
            self._counters["layers_closed"] += len(to_close)
        for key, slot, served in to_close:
            log.info("%s: releasing memory of unused layer %s", key, slot.blob_digest)
            _close_quietly(served.layer)
        closed = len(to_close)
        if closed:
            del key, slot, served
            to_close.clear()  # the last references, before the frozen trees go back to the GC
            release_frozen()
        return closed

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval):
            try:
                self.reap()
            except Exception:
                log.exception("layer reaper failed")

    def close(self) -> None:
        """Stop background work, wake every waiting lookup (EIO) and close every open layer.

        Disk caches stay. Idempotent. Threads still inside a registry request finish on their own
        timeouts; the daemon does not wait for them.
        """
        self._stop.set()
        with self._lock:
            served = [s.served for img in self._images.values() for s in img.slots.values() if s.served]
            self._images.clear()
        for s in served:
            _close_quietly(s.layer)
        self._image_executor.shutdown(wait=False, cancel_futures=True)
        self._layer_executor.shutdown(wait=False, cancel_futures=True)

    # -- counters -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pool = dict(self._counters)
            pool["images"] = len(self._images)
            pool["open_layers"] = sum(1 for i in self._images.values() for s in i.slots.values() if s.served)
            refcounts = {f"{r} {k}": c for (r, k), c in self._refcounts.items()}
            layers = {
                f"{key}@{slot.blob_digest}": slot.served.layer
                for key, image in self._images.items()
                for slot in image.slots.values()
                if slot.served is not None
            }
        layer_stats: dict[str, Any] = {}
        for name, layer in layers.items():
            stats_fn: Callable[[], dict] | None = getattr(layer, "stats", None)
            try:
                layer_stats[name] = stats_fn() if stats_fn else {}
            except Exception as e:  # counters must never break the daemon
                layer_stats[name] = {"error": str(e)}
        return {"pool": pool, "refcounts": refcounts, "layers": layer_stats}

    # -- on-disk metadata ---------------------------------------------------------------------

    def _metadata_path(self, ref: Reference) -> Path | None:
        if self.metadata_dir is None:
            return None
        return self.metadata_dir / f"metadata--sha256-{hashlib.sha256(str(ref).encode()).hexdigest()}"

    def _save_to_disk(self, ref: Reference, manifest: Manifest, config_raw: bytes) -> None:
        path = self._metadata_path(ref)
        if path is None:
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
            meta = {"ref": str(ref), "manifest_digest": manifest.digest, "media_type": manifest.media_type}
            for name, data in (("manifest", manifest.raw), ("config", config_raw), ("meta.json", json.dumps(meta).encode())):
                tmp = path / f".{name}.tmp"
                tmp.write_bytes(data)
                tmp.replace(path / name)
        except OSError as e:
            log.warning("cannot keep metadata of %s on disk: %s", ref, e)

    def _load_from_disk(self, ref: Reference) -> _Image | None:
        if not self._metadata_path_exists(ref):
            return None
        path = self._metadata_path(ref)
        assert path is not None
        try:
            meta = json.loads((path / "meta.json").read_text())
            raw = (path / "manifest").read_bytes()
            config_raw = (path / "config").read_bytes()
            if meta.get("ref") != str(ref) or sha256_digest(raw) != meta["manifest_digest"]:
                raise ValueError("manifest does not match its recorded digest")
            manifest = Manifest.from_raw(raw, meta["media_type"], meta["manifest_digest"])
            if sha256_digest(config_raw) != manifest.config["digest"]:
                raise ValueError("config does not match the manifest")
        except (OSError, ValueError, KeyError, RegistryError) as e:
            log.warning("ignoring cached metadata of %s: %s", ref, e)
            return None
        with self._lock:
            self._counters["image_loads_from_disk"] += 1
        return _Image(ref, manifest, config_raw, from_disk=True)


class _LayerInfos(Mapping[str, bytes]):
    """The `info` JSON of a layer under both its keys (blob and TOC digest). The keys are known at
    once (lookups check them); the JSON is built at the first read of an `info` file, because its
    uid/gid sets take a pass over every TOC entry, which a first lookup should not wait for."""

    def __init__(self, slot: _Slot, parsed: Any) -> None:
        self._slot = slot
        self._parsed = parsed
        self._keys = (slot.blob_digest, parsed.toc_digest)
        self._built: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def _build(self) -> dict[str, bytes]:
        with self._lock:
            if self._built is None:
                slot, parsed = self._slot, self._parsed
                assert slot.diff_id is not None
                uids, gids = parsed.toc.uids(), parsed.toc.gids()
                self._built = {
                    slot.blob_digest: info_for_blob_key(slot.descriptor, slot.diff_id, parsed.compression, uids, gids),
                    parsed.toc_digest: info_for_toc_key(
                        parsed.toc_digest, slot.descriptor, slot.diff_id, parsed.compression, uids, gids
                    ),
                }
            return self._built

    def __getitem__(self, key: str) -> bytes:
        if key not in self._keys:
            raise KeyError(key)
        return self._build()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(dict.fromkeys(self._keys))

    def __len__(self) -> int:
        return len(set(self._keys))


def _parse_ref(text: str) -> Reference:
    try:
        return parse_reference(text)
    except InvalidReferenceError as e:
        raise InvalidName(f"invalid image reference {text!r}: {e}") from None


def _fresh(error: FsError) -> FsError:
    """A new instance of a remembered error, so re-raising it does not grow one traceback forever."""
    return type(error)(str(error))


def _close_quietly(layer: Any) -> None:
    try:
        layer.close()
    except Exception:
        log.exception("closing layer failed")


def _as_fs_error(error: BaseException, what: str) -> FsError:
    """Why a resolution failed, as the answer podman should get: ENOENT declines, EIO reports trouble."""
    if isinstance(error, FsError):
        return error
    if isinstance(error, NotLazyFormatError):
        return EntryNotFound(f"{what}: not an eStargz/zstd:chunked layer ({error})")
    if isinstance(error, (NotFoundError, UnsupportedManifestError)):
        return EntryNotFound(f"{what}: {error}")
    if isinstance(error, InvalidReferenceError):
        return InvalidName(f"{what}: {error}")
    if isinstance(error, (FormatError, RegistryError)):
        return LayerUnavailable(f"{what}: {error}")
    log.error("%s: unexpected %s", what, type(error).__name__, exc_info=error)
    return LayerUnavailable(f"{what}: {type(error).__name__}: {error}")
