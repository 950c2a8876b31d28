"""A record read back from its Redis hash: JSON values, and what is not JSON as text."""

from __future__ import annotations

import json
import math

import pytest

from soaf.protocol.state import ServiceRecord, as_json, encode_json


def test_record_fields_decode_as_json_and_anything_else_as_text():
    record = ServiceRecord.from_hash("svc", {
        b"state": b'"succeeded"', b"attempt": b"2", b"progress": b"0.5",
        b"f:items": b'[1, "two"]', b"error": b"not json", b"message": b"\xff\xfe bytes",
        b"node": "n\u00e9".encode(),
    })
    assert record.state == "succeeded" and record.attempt == 2 and record.progress == 0.5
    assert record.fields == {"items": [1, "two"]}
    assert record.error == "not json"
    assert record.message == "\ufffd\ufffd bytes"  # not UTF-8: replaced, not refused
    assert record.node == "n\u00e9"  # UTF-8 text that is not JSON


def test_from_hash_reads_each_value_as_json_loads_would():
    """Values are read by the JSON scanner directly; whatever it does not take whole goes
    to the full decoder, so the record is the same as json.loads makes it (text that is not
    JSON stays text)."""
    values = ['1', '"x"', 'null', '  1 ', '1 2', '', '{"a": [1, 2.5, null]}', 'true',
              '-Infinity', '"\\u00e9"', '[1,', '1795918925.1909568', ' ', 'abc', '"a" b']
    record = ServiceRecord.from_hash("x", {f"k{i}".encode(): v.encode()
                                           for i, v in enumerate(values)})
    for i, text in enumerate(values):
        try:
            expected = json.loads(text)
        except ValueError:
            expected = text
        assert record.raw[f"k{i}"] == expected, text
    nan = ServiceRecord.from_hash("x", {b"v": b"NaN"}).raw["v"]
    assert math.isnan(nan)


def test_values_are_encoded_as_json_dumps_would_and_a_cycle_is_refused():
    values = [{"a": [1, 2.5, None, True, "\u00e9"]}, ["true"], {1: 2}, {"x": b"y"},
              {"n": float("nan")}, [[[]]], {"k": {"z": -0.0}}, (1, 2), {"s": {1}},
              "text", 3, 2.5, None]
    for value in values:
        assert encode_json(value) == as_json(value) == json.dumps(value, default=str)
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError, match="Circular reference"):
        encode_json(cyclic)


def test_records_read_alike_every_time_and_share_no_mutable_value(monkeypatch):
    """Field names and short values nobody can change are kept between records (a client
    reads thousands): a record read again is the same, lists and dicts are its own, and
    what is kept stays bounded."""
    from soaf.protocol import state

    monkeypatch.setattr(state, "_TEXTS", {})
    monkeypatch.setattr(state, "_NAMES", {})
    monkeypatch.setattr(state, "_KEPT", 8)
    data = {b"state": b'"running"', b"f:n": b"3", b"f:items": b"[1]", b"node": b"nope \xff",
            b"error": b"not json", b"ok": b"true", b"big": b"123456"}
    first, second = (ServiceRecord.from_hash("svc", data) for _ in range(2))
    assert first == second and first.raw == {
        "state": "running", "node": "nope \ufffd", "error": "not json", "ok": True,
        "big": 123456}
    assert first.fields == {"n": 3, "items": [1]}
    assert first.fields["items"] is not second.fields["items"]
    for i in range(20):  # one service's own values: what is kept starts afresh when full
        ServiceRecord.from_hash(f"s{i}", {b"service_id": f'"s{i}"'.encode()})
    assert len(state._TEXTS) <= 8 and len(state._NAMES) <= 8
    assert ServiceRecord.from_hash("svc", data) == first
