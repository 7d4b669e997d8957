"""Image resolution: a reference -> its manifest, config and one slot per layer.

What must hold (additional-layer-store.md §4, §8, §9):
- the first lookup of any layer of an image resolves the manifest (host platform) and config
  once; the pool then opens *all* its layers in parallel, because podman asks for every layer in
  a row. The layers' TOCs are fetched while the config is (they do not need it; only their `info`
  files do, for the DiffID), and the tail of the layer podman looks up first goes out with the
  manifest request (`_start_early_tail`) once the store has seen that the runtime names layers by
  their blob digest (`LookupKeys`): a TOC digest (podman 5.1+) names no blob, and guessing it
  would cost a 404 on every first pull;
- a layer is found by its compressed blob digest (Podman <= 5.0) or its TOC digest (5.1+);
- failures are remembered for `negative_ttl` seconds (`_negative`), so a retry storm does not
  reach the registry;
- manifest and config are kept on disk (`metadata.MetadataStore`) so a restarted daemon re-serves
  the layers containers/storage already linked, even for a tag that has moved since;
- a key the known manifest lacks makes us re-read a tag's manifest (at most once per
  `negative_ttl`): the layers of the new manifest are added, the old ones stay served, because
  containers made from the old image still use their `diff` paths;
- at most `max_images` images are kept (and as many failures remembered): beyond that, the least
  recently used image that nothing holds is forgotten, with its metadata and layer numbers.

Errors leave this module as `fs.errors` types only; the FUSE adapter turns them into errno.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Mapping, TypeVar

from .. import metrics
from ..formats.errors import FormatError, NotLazyFormatError
from ..fs.errors import EntryNotFound, FsError, InvalidName, LayerUnavailable
from ..fs.model import ImageFiles, ServedLayer
from ..registry.client import Manifest
from ..registry.errors import InvalidReferenceError, NotFoundError, RegistryError, UnsupportedManifestError
from ..registry.reference import Reference, parse_reference
from .pool_config import PoolConfig
from .info import toc_digest_annotation
from .metadata import LayerNumbers, MetadataStore
from .protocols import LayerOpener, RegistryAccess
from .stats import PoolCounters

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
LOOKUP_KEYS_FILE = "lookup-keys"  # under the metadata directory: what the runtime's layer keys are
T = TypeVar("T")


class Slot:
    """One layer of a resolved image; `served` is set while the layer is open."""

    def __init__(self, ref: str, index: int, descriptor: Mapping[str, Any], number: int) -> None:
        self.ref = ref
        self.index = index
        self.descriptor = dict(descriptor)
        self.blob_digest: str = descriptor["digest"]
        self.toc_annotation = toc_digest_annotation(descriptor)
        self.toc_digest = ""  # the computed one, once the layer was open
        self.diff_id: str | None = None
        self.number = number
        self.future: Future[ServedLayer] | None = None
        self.failed_until = 0.0
        self.served: ServedLayer | None = None

    def keys(self) -> tuple[str, ...]:
        """The keys podman may look this layer up by (`LayerHandles`)."""
        keys = [self.blob_digest]
        for key in (self.toc_annotation, self.toc_digest):
            if key and key not in keys:
                keys.append(key)
        return tuple(keys)

    def detach(self) -> ServedLayer | None:
        """Mark closed; returns the layer that was open (the caller closes it)."""
        served, self.served, self.future = self.served, None, None
        return served


class Image:
    """A resolved reference: its manifest, config and layer slots."""

    def __init__(self, ref: Reference, manifest: Manifest, config_raw: bytes, from_disk: bool) -> None:
        self.ref = ref
        self.key = str(ref)
        self.manifest = manifest
        self.config_raw = config_raw
        self.from_disk = from_disk
        # Set once the config (and so the layers' DiffIDs) is known: layers of a fetched image are
        # opened while the config is still on its way; `config_error` says why it never came.
        self.config_ready = threading.Event()
        self.config_error: FsError | None = None
        if config_raw:
            self.config_ready.set()
        self.slots: dict[str, Slot] = {}
        self.start_fetched = False  # the start fetch ran (once all layers were first open: pool.py)
        self.by_toc: dict[str, str] = {}
        self.checked_at = 0.0 if from_disk else time.monotonic()

    def files(self) -> ImageFiles:
        keys = list(self.slots) + list(self.by_toc)
        return ImageFiles(manifest=self.manifest.raw, config=self.config_raw, layer_keys=tuple(keys))

    def lists(self, key: str) -> bool:
        return key in self.slots or key in self.by_toc


class Shutdown:
    """The pool's stop flag, and waits on futures that it cuts short."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait_result(self, future: Future[T], deadline: float) -> T:
        """`future.result()` until `deadline` (FutureTimeout), cut short by shutdown (EIO).

        A failed future's error (always an `FsError` here) is kept by the future, answering every
        later wait; each wait raises a new copy of it. Raising the kept one would add this wait's
        frames, which hold the future, to its traceback: a reference cycle (error -> frame ->
        future -> error) that only the cyclic GC could free, with everything those frames hold."""
        while True:
            if self.event.is_set():
                raise LayerUnavailable("the store is shutting down")
            remaining = deadline - time.monotonic()
            try:
                error = future.exception(max(0.0, min(0.2, remaining)))
            except FutureTimeout:
                if remaining <= 0.2:
                    raise
                continue
            except CancelledError:
                raise LayerUnavailable("the store is shutting down") from None
            if error is None:
                return future.result()
            raise _fresh(error if isinstance(error, FsError) else as_fs_error(error, "resolving"))


class LookupKeys:
    """What the runtime's layer keys are: compressed blob digests (Podman <= 5.0, CRI-O) or TOC
    digests (Podman 5.1+), learned from the first lookup that a manifest answers and kept in
    `path` across restarts (a node runs one runtime).

    Why: the early tail guesses that the key is a blob digest before the manifest says so. Right,
    it saves a round trip; wrong, it is a request the registry answers 404. So it is guessed only
    once this store has seen blob-digest keys, and never while it has seen TOC-digest keys.
    """

    BLOB = "blob"
    TOC = "toc"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.kind: str | None = None
        if path is not None:
            try:
                text = path.read_text().strip()
            except OSError:
                text = ""
            self.kind = text if text in (self.BLOB, self.TOC) else None

    def names_blobs(self) -> bool:
        return self.kind == self.BLOB

    def learn(self, image: "Image", key: str) -> None:
        """`key` was looked up in `image`: note whether it named a blob or a TOC."""
        kind = self.BLOB if key in image.slots else self.TOC if key in image.by_toc else None
        if kind is None or kind == self.kind:
            return
        log.info("the runtime names layers by their %s digest", "blob" if kind == self.BLOB else "TOC")
        self.kind = kind
        if self.path is not None:
            try:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(kind + "\n")
                tmp.replace(self.path)
            except OSError as e:
                log.warning("cannot keep %s: %s", self.path, e)


class ImageResolver:
    """References to `Image`s (see the module docstring). `on_indexed(image, slots)` is called
    with new layer slots (the pool opens them); `holds(ref)` says whether something holds an
    image (it is never forgotten then)."""

    def __init__(
        self,
        client: RegistryAccess,
        opener: LayerOpener,
        config: PoolConfig,
        *,
        lock: threading.RLock,
        shutdown: Shutdown,
        counters: PoolCounters,
        metadata: MetadataStore,
        numbers: LayerNumbers,
        early_tail_executor: ThreadPoolExecutor,
        on_indexed: Callable[[Image, list[Slot]], None],
        on_dropped: Callable[[Image], None],
        holds: Callable[[str], bool],
    ) -> None:
        self.client = client
        self.opener = opener
        self.config = config
        self._lock = lock
        self.shutdown = shutdown
        self.counters = counters
        self.metadata = metadata
        self.numbers = numbers
        self._tail_executor = early_tail_executor
        self._on_indexed = on_indexed
        self._on_dropped = on_dropped
        self._holds = holds
        self.images: dict[str, Image] = {}  # least recently used first
        self._pending: dict[str, Future[Image]] = {}
        self._negative: dict[str, tuple[float, FsError]] = {}
        # (ref key, blob digest) -> the tail of the blob podman asked for first, fetched while the
        # manifest is (`_start_early_tail`); refs whose manifest is being fetched
        self._early_tails: dict[tuple[str, str], Future] = {}
        self._manifest_pending: set[str] = set()
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="resolve-image")
        directory = metadata.directory
        self.lookup_keys = LookupKeys(directory / LOOKUP_KEYS_FILE if directory is not None else None)

    # -- lookups ------------------------------------------------------------------------------

    def resolved(self, ref: str, key: str = "") -> bool:
        image = self.images.get(ref)  # no lock: a dict read is atomic, and a stale answer is harmless
        return image is not None and (not key or image.lists(key))

    def image(self, ref: str, *, deadline: float | None = None, first_key: str | None = None) -> Image:
        """The resolved image `ref` (resolving it, up to `deadline`). `first_key`: the layer the
        lookup is for (its tail is asked for while the manifest is: `_start_early_tail`)."""
        image = self.images.get(ref)  # the hot path of every lookup: no lock
        if image is not None:
            return image
        if self.shutdown.is_set():
            raise LayerUnavailable("the store is shutting down")
        with self._lock:
            image = self.images.get(ref)
            if image is not None:
                return image
            negative = self._negative.get(ref)
            if negative is not None:
                if negative[0] > time.monotonic():
                    self.counters.add("negative_hits")
                    raise _fresh(negative[1])
                del self._negative[ref]
            future = self._pending.get(ref)
            reference = parse_ref(ref)  # a key canonical_ref made: parses back to the same reference
            if future is None:
                self._manifest_pending.add(ref)
                future = self._executor.submit(self._resolve, ref, reference)
                self._pending[ref] = future
            if first_key is not None and ref in self._manifest_pending and (ref, first_key) not in self._early_tails:
                self._start_early_tail(ref, reference, first_key)
        try:
            image = self.shutdown.wait_result(future, deadline or time.monotonic() + self.config.resolve_timeout)
            if first_key is not None:
                self.lookup_keys.learn(image, first_key)
            return image
        except FutureTimeout:
            raise LayerUnavailable(f"resolving {ref} takes longer than {self.config.resolve_timeout:g} s") from None

    def known_refs(self) -> list[str]:
        with self._lock:
            return list(self.images)

    def forget_failures(self, ref: str) -> None:
        """Drop the remembered failures of `ref` and of its layers (see `ImagePool.forget_failures`)."""
        with self._lock:
            self._negative.pop(ref, None)
            image = self.images.get(ref)
            for slot in image.slots.values() if image is not None else ():
                slot.failed_until = 0.0

    def touch(self, image: Image) -> None:
        """`image` was used: the last to be forgotten."""
        with self._lock:
            if self.images.get(image.key) is image:
                self.images[image.key] = self.images.pop(image.key)

    # -- resolving ----------------------------------------------------------------------------

    def _start_early_tail(self, key: str, ref: Reference, layer_key: str) -> None:
        """Ask for the tail of the layer podman looks up first while the manifest is being fetched.

        Its size is not known before the manifest, but a suffix range needs none; the bytes are
        used only if the manifest then lists that blob with that size, and verified against its
        TOC digest like any tail. Saves one round trip on the first pull of an image. A key that
        is a TOC digest (podman 5.1+) names no blob, and that guess would cost a 404: so only
        once the runtime is known to name blobs (`LookupKeys`). Called with the lock held."""
        if (not _DIGEST_RE.fullmatch(layer_key) or self.metadata.exists(key)
                or not self.lookup_keys.names_blobs()):
            return
        try:
            self._early_tails[(key, layer_key)] = self._tail_executor.submit(self.opener.fetch_tail, ref, layer_key)
        except RuntimeError:  # shutting down
            pass

    def take_early_tail(self, image: Image, slot: Slot) -> Future | None:
        """The early tail of `slot`'s blob, for its open (called with the lock held)."""
        return self._early_tails.pop((image.key, slot.blob_digest), None)

    def _resolve(self, key: str, ref: Reference) -> Image:
        began = time.monotonic()
        try:
            kept = self.metadata.load(key)
            if kept is None:
                image = self._fetch(key, ref)
            else:
                self.counters.add("image_loads_from_disk")
                image = Image(ref, kept[0], kept[1], from_disk=True)
                self._manifest_known(key)
                self._index_layers(image, image.manifest, _diff_ids(key, image.config_raw))
        except Exception as e:
            metrics.resolve_seconds.labels("image").observe(time.monotonic() - began)
            metrics.count_registry_error(e, registry_only=True)
            error = as_fs_error(e, f"resolving {key}")
            with self._lock:
                self._pending.pop(key, None)
                self._negative[key] = (time.monotonic() + self.config.negative_ttl, error)
                self._bound_negative()
                self.counters.add("image_resolve_failures")
                self._manifest_pending.discard(key)
                self._drop_early_tails(key)
            log.info("cannot resolve %s: %s", key, error)
            try:
                raise error from None
            finally:
                del error  # the raised error's traceback holds this frame: no error -> frame -> error cycle
        metrics.resolve_seconds.labels("image").observe(time.monotonic() - began)
        with self._lock:
            self.images[key] = image
            self._pending.pop(key, None)
            self._drop_early_tails(key)  # a guess no layer took (a TOC digest, a stale key)
        self._on_indexed(image, list(image.slots.values()))
        log.info("resolved %s: manifest %s, %d layers", key, image.manifest.digest, len(image.slots))
        self._forget_unheld(keep=key)
        return image

    def _manifest_known(self, key: str) -> None:
        """From now on the layers' own opens fetch their tails: no more early ones."""
        with self._lock:
            self._manifest_pending.discard(key)

    def _drop_early_tails(self, key: str) -> None:
        for k in [k for k in self._early_tails if k[0] == key]:
            self._early_tails.pop(k).cancel()

    def _fetch(self, key: str, ref: Reference) -> Image:
        """Manifest, then the layers' TOCs and the config at the same time: the layers do not
        need the config (only their `info` files do, for the DiffID), so the TOCs are not held
        up a round trip by it."""
        try:
            manifest = self.client.get_manifest(ref, self.config.platform)
        finally:
            self._manifest_known(key)
        image = Image(ref, manifest, b"", from_disk=False)
        self._index_layers(image, manifest, None)
        self._on_indexed(image, list(image.slots.values()))
        try:
            config_raw = self.client.get_blob(ref, manifest.config["digest"])
            _set_diff_ids(key, image, manifest, _diff_ids(key, config_raw))
            image.config_raw = config_raw
        except Exception as e:
            image.config_error = as_fs_error(e, f"config of {key}")
            raise
        finally:
            image.config_ready.set()  # layers opened meanwhile see the DiffIDs (set first) or the error
        self.counters.add("image_resolves")
        self.metadata.save(key, manifest, config_raw)
        return image

    def _index_layers(self, image: Image, manifest: Manifest, diff_ids: list | None) -> list[Slot]:
        """Add slots for the layers of `manifest` (numbered, on disk first); returns the new ones.
        Without `diff_ids` (the config is still being fetched) `_set_diff_ids` fills them in later."""
        new = [(i, d) for i, d in enumerate(manifest.layers)
               if isinstance(d.get("digest"), str) and d["digest"] not in image.slots]
        numbers = self.numbers.numbers(image.key, [d["digest"] for _, d in new])
        added = []
        for i, descriptor in new:
            digest = descriptor["digest"]
            if digest in image.slots:
                continue
            slot = Slot(image.key, i, descriptor, numbers[digest])
            image.slots[digest] = slot
            added.append(slot)
            if slot.toc_annotation:
                image.by_toc.setdefault(slot.toc_annotation, digest)
        if diff_ids is not None:
            _set_diff_ids(image.key, image, manifest, diff_ids)
        return added

    def refresh(self, image: Image) -> bool:
        """Re-read a tag's manifest; add the layers of a new one. True when something was added."""
        if image.ref.digest is not None:
            return False  # pinned: the manifest cannot change
        key = image.key
        with self._lock:
            if time.monotonic() - image.checked_at < self.config.negative_ttl:
                return False
            image.checked_at = time.monotonic()
        try:
            manifest = self.client.get_manifest(image.ref, self.config.platform)
            if manifest.digest == image.manifest.digest:
                return False
            config_raw = self.client.get_blob(image.ref, manifest.config["digest"])
            diff_ids = _diff_ids(key, config_raw)
            with self._lock:
                self.counters.add("image_resolves")
                added = self._index_layers(image, manifest, diff_ids)
                image.manifest, image.config_raw = manifest, config_raw
        except Exception as e:
            log.info("re-checking %s: %s", key, as_fs_error(e, "refresh"))
            return False
        self.metadata.save(key, manifest, config_raw)
        log.info("%s now points to manifest %s (%d new layers)", key, manifest.digest, len(added))
        self._on_indexed(image, added)
        return bool(added)

    # -- bounds -------------------------------------------------------------------------------

    def _bound_negative(self) -> None:
        """At most `max_images` remembered failures: expired ones go first, then the oldest."""
        now = time.monotonic()
        for key in [k for k, (until, _) in self._negative.items() if until <= now]:
            del self._negative[key]
        while len(self._negative) > self.config.max_images:
            del self._negative[next(iter(self._negative))]

    def _forget_unheld(self, keep: str) -> None:
        """Beyond `max_images`: forget the least recently used images nothing holds (never `keep`,
        the one just resolved), with their kept metadata and layer numbers (the kernel holds no
        node of them: it would pin them)."""
        dropped: list[Image] = []
        with self._lock:
            excess = len(self.images) - self.config.max_images
            for key in list(self.images):
                if excess <= 0:
                    break
                if key == keep or self._holds(key) or self._pending.get(key) is not None:
                    continue
                dropped.append(self.images.pop(key))
                excess -= 1
        for image in dropped:
            log.info("forgetting unused image %s (more than %d images)", image.key, self.config.max_images)
            self._on_dropped(image)
            self.metadata.remove(image.key)
        removed = [i.key for i in dropped] + self.metadata.prune(lambda ref: ref == keep or ref in self.images or self._holds(ref))
        if removed:
            self.numbers.prune(removed)
            self.counters.add("images_dropped", len(dropped))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _diff_ids(key: str, config_raw: bytes) -> list:
    try:
        config = json.loads(config_raw)
        return list((config.get("rootfs") or {}).get("diff_ids") or [])
    except (ValueError, AttributeError, TypeError) as e:
        raise UnsupportedManifestError(f"config of {key} is not valid JSON: {e}") from None


def _set_diff_ids(key: str, image: Image, manifest: Manifest, diff_ids: list) -> None:
    layers = manifest.layers
    if len(diff_ids) != len(layers):
        log.warning("%s: %d layers but %d diff_ids; DiffIDs will not be reported", key, len(layers), len(diff_ids))
        return
    for descriptor, diff_id in zip(layers, diff_ids):
        slot = image.slots.get(descriptor.get("digest"))
        if slot is not None and slot.diff_id is None:
            slot.diff_id = diff_id


def parse_ref(text: str) -> Reference:
    try:
        return parse_reference(text)
    except InvalidReferenceError as e:
        raise InvalidName(f"invalid image reference {text!r}: {e}") from None


def _fresh(error: FsError) -> FsError:
    """A new instance of a remembered error, so re-raising it does not grow one traceback forever."""
    return type(error)(str(error))


def as_fs_error(error: BaseException, what: str) -> FsError:
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
