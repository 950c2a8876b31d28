"""AsyncClient against a real core: the same calls as Client, driving many services at once."""

from __future__ import annotations

import asyncio

import pytest

import soaf.client.follow
from soaf import AsyncClient, ServiceParamTemplate
from soaf.errors import RedisUnavailable, UnknownService, WaitTimeout
from soaf.protocol.keys import Keys
from soaf.protocol.state import decode_events
from tests.conftest import SECRET


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def aclient(redis_server, prefix) -> AsyncClient:
    return AsyncClient(redis_server.url, secret=SECRET, prefix=prefix)


def test_many_services_at_once(start_core, redis_server, prefix):
    start_core()

    async def main():
        async with aclient(redis_server, prefix) as client:
            ids = await asyncio.gather(*(client.submit(ServiceParamTemplate("true"))
                                         for _ in range(20)))
            finished = [r.service_id async for r in client.as_completed(ids, timeout=60)]
            records = await client.wait_all(ids, timeout=60)
            one = await client.wait(ids[0], timeout=10)
            status = await client.status(ids[1])
            listed = await client.list(service="true", limit=100)
            return ids, finished, records, one, status, listed

    ids, finished, records, one, status, listed = run(main())
    assert sorted(finished) == sorted(ids)
    assert [r.service_id for r in records] == ids and all(r.ok for r in records)
    assert one.ok and status.state == "succeeded"
    assert {r.service_id for r in listed} == set(ids)


def test_events_replay_and_live_match_the_stream(start_core, redis_server, prefix):
    start_core()

    async def main():
        async with aclient(redis_server, prefix) as client:
            sid = await client.submit(ServiceParamTemplate(
                "steps", args={"n": 4, "delay": 0.15}, watch_interval=0.05))
            r = client.redis
            while await r.xlen(Keys(prefix).events(sid)) < 3:  # join while it runs
                await asyncio.sleep(0.02)
            late = [(e["event_id"], e["seq"]) async for e in client.events(sid, timeout=60)]
            past = [(e["event_id"], e["seq"]) async for e in client.events(sid, follow=False)]
            full = [(raw.decode(), e["seq"]) for raw, data in
                    await r.xrange(Keys(prefix).events(sid)) for e in decode_events(data)]
            lines = [line async for line in client.logs(sid)]
            return late, past, full, lines

    late, past, full, lines = run(main())
    assert late == past == full and len(full) > 6
    assert [seq for _, seq in full] == list(range(1, len(full) + 1))
    assert lines == ["step 1", "step 2", "step 3", "step 4"]


def test_cancel_timeout_and_unknown(start_core, redis_server, prefix, monkeypatch):
    monkeypatch.setattr(soaf.client.follow, "UNKNOWN_GRACE", 0.3)
    start_core()

    async def main():
        async with aclient(redis_server, prefix) as client:
            sid = await client.submit(ServiceParamTemplate("sleep", args={"seconds": 30}))
            with pytest.raises(WaitTimeout):
                await client.wait(sid, timeout=0.3)
            said = await client.cancel(sid)
            record = await client.wait(sid, timeout=30)
            for call in (client.status("nope"), client.wait("nope"), client.cancel("nope")):
                with pytest.raises(UnknownService):
                    await call
            return said, record

    said, record = run(main())
    assert said in ("cancelled (it was queued and never started)",
                    "cancel requested; it was running and will end cancelled",
                    "cancel requested; it was building and will end cancelled",
                    "cancel requested; it was preparing and will end cancelled")
    assert record.state == "cancelled"


def test_follow_the_logs_of_many_services_at_once(start_core, redis_server, prefix):
    start_core(SOAF_LOG_INTERVAL="0.05")

    async def main():
        async with aclient(redis_server, prefix) as client:
            ids = await asyncio.gather(*(client.submit(ServiceParamTemplate(
                "steps", args={"n": 3, "delay": 0.1}, watch_interval=0.05)) for _ in range(4)))

            async def lines(sid):
                return [line.text async for line in client.follow_logs(
                    sid, tail=10, streams=["stdout"], timeout=60)]

            followed = await asyncio.gather(*(lines(sid) for sid in ids))
            tails = await asyncio.gather(*(client.log_lines(sid, tail=1) for sid in ids))
            return followed, tails

    followed, tails = run(main())
    assert followed == [["step 1", "step 2", "step 3"]] * 4
    assert all(len(t) == 1 for t in tails)


def test_plugins_nodes_reload(start_core, redis_server, prefix):
    start_core()

    async def main():
        async with aclient(redis_server, prefix) as client:
            while not await client.nodes():
                await asyncio.sleep(0.05)
            nodes = await client.nodes()
            await client.reload()
            while not (await client.plugins())["core-a"]["version"].startswith("2-"):
                await asyncio.sleep(0.05)
            return nodes, await client.plugins()

    nodes, plugins = run(main())
    assert nodes[0]["node"] == "core-a"
    assert "steps" in plugins["core-a"]["services"]


def test_redis_unreachable(tmp_path):
    async def main():
        client = AsyncClient(f"unix://{tmp_path}/no.sock", secret=SECRET)
        try:
            with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
                await client.status("x")
            with pytest.raises(RedisUnavailable):
                await client.submit(ServiceParamTemplate("true"))
        finally:
            await client.close()

    run(main())
