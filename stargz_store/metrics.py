"""The store's Prometheus instruments: counted where things happen, exported by `daemon.metrics_server`.

Why here, at the top of the package: registry, layer, cache and FUSE code all count into these,
and none of them may import the daemon. Every instrument lives in one `REGISTRY` of its own (not
prometheus_client's global one), so a test or a library user that imports the store exports
nothing unless it starts the endpoint, and two daemons in one test process would share these
process-wide figures only.

What must hold:
- counters are process-wide and monotonic: a layer's own `stats()` vanish when it closes, so what
  a scrape sees is counted here as well, at the event, never derived from open layers;
- label values are bounded: fetch kinds, registry error kinds and FUSE operation names are fixed
  sets; image references and layer digests appear only on the gauges of layers open now
  (`daemon.metrics_server.StoreCollector`), so a node that served 10,000 images does not export
  10,000 series;
- cheap on the hot path: label children are bound once (`_fetch_children`); FUSE requests are
  counted by `FuseOperations` under one lock (see there).
"""
from __future__ import annotations

import bisect
import errno
import threading
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .registry import errors as registry_errors

REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "stargz_store"

FETCH_KINDS = ("on_demand", "prefetch", "background", "toc")
# Registry request latency: a local registry answers in ~1 ms, a remote one in 20-200 ms, a large
# streamed prefetch takes seconds.
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RESOLVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# FUSE answers: ~20 us from memory, ~100 us from the disk cache, a registry round trip on a miss.
FUSE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1, 2.5, 5, 10, 30)

fetched_bytes = Counter(f"{PREFIX}_fetched_bytes", "Compressed bytes received from registries, by why they were "
                        "fetched (on_demand: a read missed; prefetch: the landmark region at layer open; "
                        "background: the rest of a layer; toc: a layer's footer and TOC at open)", ["kind"], registry=REGISTRY)
fetch_requests = Counter(f"{PREFIX}_fetch_requests", "Byte ranges asked of registries, by kind", ["kind"],
                         registry=REGISTRY)
fetch_seconds = Histogram(f"{PREFIX}_fetch_seconds", "Latency of one registry fetch (a ranged or streamed "
                          "request, retries included), by kind", ["kind"], buckets=FETCH_BUCKETS, registry=REGISTRY)
registry_errors_total = Counter(f"{PREFIX}_registry_errors", "Failed registry requests after retries, by kind of "
                                "failure", ["kind"], registry=REGISTRY)
verify_failures = Counter(f"{PREFIX}_verify_failures", "Fetched chunks rejected because they did not decompress "
                          "or hash to their TOC digest", registry=REGISTRY)
served_bytes = Counter(f"{PREFIX}_served_bytes", "Bytes answered to FUSE reads (file contents and the raw blob "
                       "file)", registry=REGISTRY)
resolve_seconds = Histogram(f"{PREFIX}_resolve_seconds", "Time to resolve an image (manifest and config) or to "
                            "open a layer (its TOC), successful or not", ["what"], buckets=RESOLVE_BUCKETS,
                            registry=REGISTRY)
evicted_bytes = Counter(f"{PREFIX}_cache_evicted_bytes", "Bytes removed from the disk cache by the size limit or "
                        "`stargz-store prune`", registry=REGISTRY)

# The registry's error types, most specific first, and their label: a fixed set.
_ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (registry_errors.RangeNotSatisfiableError, "range_not_satisfiable"),
    (registry_errors.NotFoundError, "not_found"),
    (registry_errors.AuthError, "auth"),
    (registry_errors.RegistryTimeoutError, "timeout"),
    (registry_errors.UnreachableError, "unreachable"),
    (registry_errors.ShortReadError, "short_read"),
    (registry_errors.DigestMismatchError, "digest_mismatch"),
    (registry_errors.ServerError, "server"),
    (registry_errors.RegistryError, "other_registry"),
    (TimeoutError, "timeout"),
    (ConnectionError, "unreachable"),
)


def error_kind(exc: BaseException) -> str:
    """The label of a failed fetch: the registry error type it is (or was caused by), else "other"."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for cls, kind in _ERROR_KINDS:
            if isinstance(e, cls):
                return kind
        e = e.__cause__ or e.__context__
    return "other"


def count_registry_error(exc: BaseException, *, registry_only: bool = False) -> None:
    """Count a failed registry request; `registry_only`: not when `exc` came from elsewhere (a bad
    TOC, a closed store), where the caller's failure may have other causes."""
    kind = error_kind(exc)
    if kind != "other" or not registry_only:
        registry_errors_total.labels(kind).inc()


class FetchTimer:
    """`with FetchTimer(kind) as t: ...; t.received(n)`: one registry fetch's latency, bytes and ranges.
    `guess`: a request that may well miss (the early tail, asked for under a key that may not be a
    blob): its failure is no registry error."""

    __slots__ = ("kind", "ranges", "began", "guess")

    def __init__(self, kind: str, ranges: int = 1, *, guess: bool = False) -> None:
        self.kind = kind
        self.ranges = ranges
        self.began = 0.0
        self.guess = guess

    def __enter__(self) -> FetchTimer:
        self.began = time.monotonic()
        _fetch_children(self.kind)[0].inc(self.ranges)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _fetch_children(self.kind)[1].observe(time.monotonic() - self.began)
        if exc is not None and not self.guess:
            count_registry_error(exc)

    def received(self, n: int) -> None:
        if n:
            _fetch_children(self.kind)[2].inc(n)


_fetch_kinds: dict[str, tuple] = {}


def _fetch_children(kind: str) -> tuple:
    """(requests, seconds, bytes) of a fetch kind, bound once (`labels()` costs a lock and a lookup)."""
    children = _fetch_kinds.get(kind)
    if children is None:
        children = _fetch_kinds[kind] = (fetch_requests.labels(kind), fetch_seconds.labels(kind),
                                         fetched_bytes.labels(kind))
    return children


class FuseOperations(Collector):
    """FUSE answer latency and EIO answers by operation: `stargz_store_fuse_operation_seconds`
    (a histogram) and `stargz_store_fuse_eio_total`.

    Kept here rather than in a prometheus_client `Histogram`: this runs once per FUSE request,
    and one lock and a bisect cost a third of what `Histogram.observe` does (its two locks per
    observation plus one per bucket object)."""

    def __init__(self, buckets: tuple[float, ...] = FUSE_BUCKETS) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()
        self._rows: dict[str, list] = {}  # operation -> [count per bucket..., +Inf count, sum, eio]

    def observe(self, opcode: int, name: str, seconds: float, error: int) -> None:
        """One answered FUSE request (`fuse.SessionOptions.observe`); `error`: the errno sent, 0 = none."""
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            row = self._rows.get(name)
            if row is None:
                row = self._rows[name] = [0] * (len(self.buckets) + 1) + [0.0, 0]
            row[i] += 1
            row[-2] += seconds
            if error == errno.EIO:
                row[-1] += 1

    def counts(self) -> dict[str, list[float]]:
        """Requests answered so far and the seconds they took, by operation: {name: [count,
        seconds]} (stats.json's `fs.requests`: what one walk costs, per file, in a benchmark)."""
        with self._lock:
            return {name: [sum(row[:-2]), round(row[-2], 6)] for name, row in self._rows.items()}

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            rows = {name: list(row) for name, row in self._rows.items()}
        seconds = HistogramMetricFamily(f"{PREFIX}_fuse_operation_seconds", "Time to answer one FUSE request, "
                                        "by operation", labels=["operation"])
        eio = CounterMetricFamily(f"{PREFIX}_fuse_eio", "FUSE requests answered with EIO (a read that could not "
                                  "get its bytes, a layer that could not be opened), by operation",
                                  labels=["operation"])
        for name, row in sorted(rows.items()):
            label = name.lower()
            cumulative, buckets = 0, []
            for bound, n in zip((*map(floatToGoString, self.buckets), "+Inf"), row[:-2]):
                cumulative += n
                buckets.append((bound, cumulative))
            seconds.add_metric([label], buckets, row[-2])
            eio.add_metric([label], row[-1])
        yield seconds
        yield eio


fuse_operations = FuseOperations()
REGISTRY.register(fuse_operations)
observe_fuse = fuse_operations.observe


def for_each_kind() -> None:
    """Create every fetch kind's series at 0, so a dashboard sees them before the first fetch."""
    for kind in FETCH_KINDS:
        fetched_bytes.labels(kind)
        fetch_requests.labels(kind)
        fetch_seconds.labels(kind)
    for what in ("image", "layer"):
        resolve_seconds.labels(what)
