"""Operating a running daemon: the cache janitor, the Prometheus endpoint, `status` and `prune`.

    ops = start_operations(cfg, pool)        # after build_store; before the control socket
    control = start_control_socket(address, pool, ops.control_operations())
    ...
    ops.close()

- the janitor (`cache.janitor`) measures the disk cache and holds it under `[store]
  cache_max_size_gb`; what it must keep are the chunks and raw blocks of the layers in use
  (`protected_layers`): those the kernel holds (a container's overlay, an open file, a lookup it
  still caches) or that a read is in progress on;
- `metrics_address` serves `/metrics` (Prometheus text format, prometheus_client's HTTP server on
  a thread of its own) with the instruments of `stargz_store.metrics` and `StoreCollector`'s
  figures read at scrape time;
- `status` and `prune` are control socket operations (root only, see `control`), used by
  `stargz-store status` and `stargz-store prune` (`daemon.status_cli`).
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import metrics
from ..cache.janitor import LOW_WATER, CacheJanitor, Protected
from .config import StoreConfig, split_host_port
from .control import ControlRequestError, Operation
from .stats import COUNTERS

METRICS_BIND_WAIT = 30.0  # seconds a taken metrics port is retried (a restart's previous process)

log = logging.getLogger(__name__)


def layers_in_use(pool: Any) -> frozenset[str]:
    """The blob digests of the open layers something uses now (pins or holds): cheap, no chunk lists."""
    return frozenset(row["layer"] for row, _ in pool.served_layers() if row["pins"] or row["holds"])


def protected_layers(pool: Any) -> Protected:
    """The chunks and blobs of every open layer that something uses now (pins or holds)."""
    chunks: set[str] = set()
    blobs: set[str] = set()
    for row, layer in pool.served_layers():
        if row["pins"] or row["holds"]:
            chunks.update(layer.chunk_sizes())
            blobs.add(row["layer"])
    return Protected(frozenset(chunks), frozenset(blobs))


class StoreCollector(Collector):
    """Figures read from the pool and the cache at each scrape. Labels: the image reference and
    blob digest of layers open now only (bounded by `[store] idle_layers` plus the layers in use)."""

    def __init__(self, pool: Any, cache: Any, janitor: CacheJanitor) -> None:
        self.pool = pool
        self.cache = cache
        self.janitor = janitor

    def collect(self) -> Iterable[Any]:
        p = metrics.PREFIX
        counters = self.pool.counters.snapshot()
        for name in COUNTERS:
            yield CounterMetricFamily(f"{p}_{name}", f"Pool events: {name.replace('_', ' ')} (see stats.json)",
                                      value=counters.get(name, 0))
        rows = self.pool.served_layers()
        yield GaugeMetricFamily(f"{p}_images", "Images resolved now", value=len(self.pool.image_refs()))
        yield GaugeMetricFamily(f"{p}_layers_open", "Layers open now", value=len(rows))
        in_use = sum(1 for row, _ in rows if row["pins"] or row["holds"])
        yield GaugeMetricFamily(f"{p}_layers_in_use", "Open layers the kernel holds or a read is in progress on",
                                value=in_use)
        refs = GaugeMetricFamily(f"{p}_layer_references", "What holds each open layer: kernel pins (a "
                                 "container's overlay, an open file, a cached lookup), use notifications of "
                                 "containers/storage, reads in progress", labels=["image", "layer", "kind"])
        fetched = GaugeMetricFamily(f"{p}_layer_fetched_bytes", "Compressed bytes fetched for each open layer "
                                    "since it was opened", labels=["image", "layer"])
        for row, layer in rows:
            for kind in ("pins", "uses", "holds"):
                refs.add_metric([row["image"], row["layer"], kind], row[kind])
            try:
                fetched.add_metric([row["image"], row["layer"]], layer.stats().get("fetched_bytes", 0))
            except Exception:  # a layer closing under us: left out of this scrape
                pass
        yield refs
        yield fetched
        stats = self.cache.stats()
        hits = CounterMetricFamily(f"{p}_cache_hits", "Chunks answered from the cache, by tier", labels=["tier"])
        hits.add_metric(["memory"], stats.get("memory_hits", 0))
        hits.add_metric(["disk"], stats.get("disk_hits", 0))
        yield hits
        yield CounterMetricFamily(f"{p}_cache_misses", "Chunk lookups the cache could not answer",
                                  value=stats.get("misses", 0))
        yield CounterMetricFamily(f"{p}_cache_damaged_files", "Cache files found damaged and removed",
                                  value=stats.get("bad_files", 0) + stats.get("bad_blob_blocks", 0))
        yield GaugeMetricFamily(f"{p}_cache_memory_bytes", "Bytes of hot chunks in the memory LRU",
                                value=stats.get("memory_bytes", 0))
        size = self.janitor.size
        if size is not None:
            yield GaugeMetricFamily(f"{p}_cache_size_bytes", "Disk cache size (allocated bytes; measured, plus "
                                    "writes since)", value=size)
        if self.janitor.max_bytes is not None:
            yield GaugeMetricFamily(f"{p}_cache_limit_bytes", "[store] cache_max_size_gb", value=self.janitor.max_bytes)


class Operations:
    """The janitor, the metrics endpoint and the control operations of one daemon."""

    def __init__(self, cfg: StoreConfig, pool: Any, cache: Any) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cache = cache
        self.started = time.time()
        self.janitor = CacheJanitor(cache, lambda: protected_layers(pool), max_bytes=cfg.cache_max_bytes,
                                    on_removed=metrics.evicted_bytes.inc, in_use=lambda: layers_in_use(pool))
        self._server: Any = None
        self._collector: StoreCollector | None = None
        self._closed = threading.Event()

    def start(self) -> Operations:
        self.janitor.start()
        if self.cfg.metrics_address:
            self.start_metrics(self.cfg.metrics_address)
        return self

    def start_metrics(self, address: str) -> None:
        """Serve /metrics at `address`; a failure is logged and the daemon serves on without it."""
        from prometheus_client import start_http_server

        host, port = split_host_port(address)
        self._collector = StoreCollector(self.pool, self.cache, self.janitor)
        metrics.REGISTRY.register(self._collector)
        metrics.for_each_kind()
        def bind() -> bool:
            try:
                self._server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=metrics.REGISTRY)
            except OSError as e:
                if e.errno == errno.EADDRINUSE and time.monotonic() < give_up:
                    return False
                log.error("cannot serve metrics at %s: %s; the store runs without them", address, e.strerror or e)
                return True
            log.info("metrics at http://%s/metrics", address)
            return True

        # After a restart hand-over the previous serving process holds the port until it has
        # finished its last reads: keep trying for a while, on a thread (serving does not wait).
        give_up = time.monotonic() + METRICS_BIND_WAIT
        if not bind():
            def retry() -> None:
                while not bind() and not self._closed.wait(0.5):
                    pass

            threading.Thread(target=retry, name="metrics-bind", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.janitor.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._collector is not None:
            metrics.REGISTRY.unregister(self._collector)
            self._collector = None

    # -- control operations ---------------------------------------------------------------------

    def control_operations(self) -> dict[str, Operation]:
        return {"status": self.status, "prune": self.prune}

    def status(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """Images, layers (what holds them, how much is local), the cache (size, in use, could free)."""
        layers = []
        for row, layer in self.pool.served_layers():
            entry = dict(row)
            try:
                local, total = layer.local_share()
                stats = layer.stats()
            except Exception:  # closed under us
                continue
            entry.update(blob_size=layer.blob_size, content_bytes=total, local_bytes=local,
                         fetched_bytes=stats.get("fetched_bytes", 0), background=stats.get("background_state"),
                         fetching=stats.get("in_flight", 0))
            layers.append(entry)
        scan = self.janitor.prune(None)
        stats = self.cache.stats()
        return {
            "pid": os.getpid(), "uptime_sec": round(time.time() - self.started, 1),
            "images": self.pool.image_refs(), "layers": layers,
            "cache": {"root": str(self.cache.root), "size": scan.size_before, "limit": self.janitor.max_bytes,
                      "in_use": scan.in_use_bytes, "could_free": scan.evictable_bytes,
                      "memory_bytes": stats.get("memory_bytes", 0)},
            "metrics_address": self.cfg.metrics_address,
        }

    def prune(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """Remove unused cache files now: down to `target` bytes if given, else down to the low
        water mark of the limit, else (no limit) everything not in use."""
        target = request.get("target")
        if target is not None and (not isinstance(target, int) or isinstance(target, bool) or target < 0):
            raise ControlRequestError("target must be a number of bytes >= 0")
        if target is None:
            limit = self.janitor.max_bytes
            target = 0 if limit is None else int(limit * LOW_WATER)
        result = self.janitor.prune(target)
        log.info("prune (asked for, target %d bytes): removed %d file(s), %d bytes; cache now %d bytes, %d in use",
                 target, result.removed_files, result.removed_bytes, result.size_after, result.in_use_bytes)
        return result.as_dict()


def start_operations(cfg: StoreConfig, pool: Any) -> Operations:
    """The daemon's operations over `pool` and the chunk cache its layers share."""
    return Operations(cfg, pool, pool.resolver.cache).start()
