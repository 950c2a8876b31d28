"""A record read back from its Redis hash: JSON values, and what is not JSON as text."""

from __future__ import annotations

from soaf.protocol.state import ServiceRecord


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
