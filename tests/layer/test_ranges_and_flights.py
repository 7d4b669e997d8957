"""Request planning and single-flight bookkeeping, without any I/O."""
from __future__ import annotations

import threading

from stargz_store.layer.flight import FlightTable
from stargz_store.layer.ranges import Extent, Request, coalesce, split_into_batches


def ext(key: str, start: int, end: int) -> Extent:
    return Extent(key, start, end, finish=lambda raw: bytes(raw))


def spans(requests: list[Request]) -> list[tuple[int, int, list[str]]]:
    return [(r.start, r.end, [e.key for e in r.extents]) for r in requests]


def test_adjacent_and_close_extents_merge_far_ones_do_not():
    extents = [ext("c", 300, 400), ext("a", 0, 100), ext("b", 100, 200), ext("d", 1000, 1100)]
    assert spans(coalesce(extents, gap=100, max_size=1 << 20)) == [(0, 400, ["a", "b", "c"]), (1000, 1100, ["d"])]
    assert spans(coalesce(extents, gap=0, max_size=1 << 20)) == [
        (0, 200, ["a", "b"]),
        (300, 400, ["c"]),
        (1000, 1100, ["d"]),
    ]


def test_shared_extents_of_inner_offset_chunks_merge():
    extents = [ext("a", 50, 500), ext("b", 50, 500), ext("c", 500, 900)]
    assert spans(coalesce(extents, gap=0, max_size=1 << 20)) == [(50, 900, ["a", "b", "c"])]


def test_requests_do_not_grow_past_max_size_but_big_extents_stay_whole():
    extents = [ext(str(i), i * 100, (i + 1) * 100) for i in range(10)] + [ext("big", 1000, 5000)]
    reqs = coalesce(extents, gap=0, max_size=300)
    assert all(r.end - r.start <= 300 for r in reqs[:-1])
    assert spans(reqs)[-1] == (1000, 5000, ["big"])
    assert [e.key for r in reqs for e in r.extents] == [e.key for e in extents]


def test_batches_cover_every_request_once_in_order():
    reqs = [Request(i * 10, i * 10 + 5 + i, []) for i in range(9)]
    batches = split_into_batches(reqs, 4)
    assert 1 < len(batches) <= 4
    assert [r for b in batches for r in b] == reqs
    assert split_into_batches(reqs, 1) == [reqs]
    assert split_into_batches([], 4) == []


def test_claim_gives_each_key_to_one_owner_and_finish_wakes_waiters():
    table = FlightTable()
    mine, theirs = table.claim(["a", "b"])
    assert set(mine) == {"a", "b"} and theirs == {}
    mine2, theirs2 = table.claim(["b", "c"])
    assert set(mine2) == {"c"} and set(theirs2) == {"b"}
    assert theirs2["b"] is mine["b"]
    woke: list[bytes | None] = []
    waiter = threading.Thread(target=lambda: woke.append(theirs2["b"].wait(10) and theirs2["b"].result))
    waiter.start()
    table.finish("b", mine["b"], result=b"B")
    waiter.join()
    assert woke == [b"B"]
    table.finish("b", mine["b"], error=RuntimeError("late"))  # a second landing is ignored
    assert mine["b"].result == b"B" and mine["b"].error is None
    assert not table.in_flight("b")
    assert table.in_flight("a")


def test_fail_all_lands_every_pending_flight():
    table = FlightTable()
    mine, _ = table.claim(["x", "y"])
    table.fail_all(RuntimeError("closing"))
    assert all(f.done and isinstance(f.error, RuntimeError) for f in mine.values())
    assert len(table) == 0
