"""Paging over the services index: newest first, by cursor, filters bounded by a budget."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio

from soaf.dashboard import listing
from soaf.protocol.keys import Keys

N = 3000


@pytest.fixture
def filled(redis_server, prefix):
    """N records, one submitted per second; every 1000th one running, the rest succeeded."""
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_server.url)
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        sid = f"s{i:05d}"
        state = "running" if i % 1000 == 7 else "succeeded"
        pipe.hset(keys.service(sid), mapping={"state": json.dumps(state),
                                              "service": json.dumps("svc"),
                                              "submitted_at": 1000 + i})
        pipe.zadd(keys.services, {sid: 1000 + i})
    pipe.execute()
    yield keys, r
    r.close()


def page(url, keys, filters=None, **kw):
    async def read():
        r = redis.asyncio.Redis.from_url(url)
        try:
            return await listing.page(r, keys, filters or listing.Filters(), **kw)
        finally:
            await r.aclose()
    return asyncio.run(read())


def test_pages_go_from_the_newest_to_the_oldest_without_gaps_or_repeats(redis_server, filled):
    keys, _ = filled
    first = page(redis_server.url, keys)
    assert [row["service_id"] for row in first.rows] == [f"s{i:05d}" for i in range(N - 1, N - 51, -1)]
    assert first.total == N and first.scanned == 50 and first.next
    seen, cursor = [], None
    while True:
        p = page(redis_server.url, keys, cursor=cursor, size=500)
        seen += [row["service_id"] for row in p.rows]
        if p.next is None:
            break
        cursor = p.next
    assert seen == [f"s{i:05d}" for i in range(N - 1, -1, -1)]


def test_a_cursor_whose_service_expired_goes_on_by_its_score(redis_server, filled):
    keys, r = filled
    first = page(redis_server.url, keys, size=10)
    last = first.rows[-1]["service_id"]
    r.zrem(keys.services, last)
    r.delete(keys.service(last))
    second = page(redis_server.url, keys, cursor=first.next, size=10)
    assert second.rows[0]["service_id"] == f"s{int(last[1:]) - 1:05d}"


def test_a_filter_looks_at_a_bounded_number_of_records_per_page(redis_server, filled, monkeypatch):
    keys, _ = filled
    monkeypatch.setattr(listing, "SCAN_BUDGET", 1200)
    running = listing.Filters(state="running")
    first = page(redis_server.url, keys, running)
    assert [row["service_id"] for row in first.rows] == ["s02007"]  # within the newest 1200
    assert first.scanned == 1200 and first.next is not None
    second = page(redis_server.url, keys, running, cursor=first.next)
    assert [row["service_id"] for row in second.rows] == ["s01007"]
    third = page(redis_server.url, keys, running, cursor=second.next)
    assert [row["service_id"] for row in third.rows] == ["s00007"]
    assert third.scanned == 600 and third.next is None


def test_bad_cursors_start_from_the_newest(redis_server, filled):
    keys, _ = filled
    for cursor in ("", "garbage", "x:y", ":s00001"):
        assert page(redis_server.url, keys, cursor=cursor, size=1).rows[0]["service_id"] == "s02999"
