"""The live-update hub without Redis: fan-out, a stalled page, pings, malformed notes."""

from __future__ import annotations

import asyncio
import json

from soaf.dashboard import live


def test_every_page_gets_each_update_and_a_stalled_one_loses_only_its_oldest():
    hub = live.Hub(client=None)
    fast, stalled = hub.subscribe(), hub.subscribe()
    for i in range(live.QUEUE_SIZE + 5):
        hub.publish("services", [{"service_id": f"s{i}", "message": "<b>x</b>\nnext"}])
        fast.get_nowait()
    assert fast.empty()
    assert stalled.qsize() == live.QUEUE_SIZE
    frame = stalled.get_nowait().decode()
    event, data, end = frame.split("\n", 2)
    assert event == "event: services" and end == "\n"  # one data line: JSON escapes newlines
    assert json.loads(data.removeprefix("data: "))[0]["service_id"] == "s5"
    hub.unsubscribe(stalled)
    hub.publish("nodes", [])
    assert stalled.qsize() == live.QUEUE_SIZE - 1 and fast.qsize() == 1


def test_a_quiet_stream_gets_pings_and_leaves_the_hub_when_closed(monkeypatch):
    monkeypatch.setattr(live, "PING", 0.05)
    hub = live.Hub(client=None)

    async def read():
        stream = hub.stream()
        first = await stream.__anext__()
        assert len(hub._queues) == 1
        hub.publish("nodes", [{"node": "a"}])
        second = await stream.__anext__()
        await stream.aclose()
        return first, second

    first, second = asyncio.run(read())
    assert first == b": ping\n\n"
    assert second.startswith(b"event: nodes\ndata: ")
    assert hub._queues == set()


def test_only_well_formed_notes_name_a_service():
    assert live._noted(b'{"id": "abc", "seq": 3}') == ["abc"]
    for bad in (b"garbage", b"[1]", b'{"id": 5}', None, b'{"seq": 1}'):
        assert live._noted(bad) == []
