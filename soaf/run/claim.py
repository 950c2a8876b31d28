"""Claim: what the intake learned when it claimed a stream entry for this core."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Claim:
    """What the intake learned when it claimed a stream entry for this core."""

    entry_id: str
    attempt: int
    seq: int
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts' records
    #: The run writes the claim's ``building`` event (number ``seq``) with its next changes.
    building: bool = False

    @classmethod
    def from_reply(cls, entry_id: str, reply: Any) -> Claim:
        """The claim a ``run`` verdict of the CLAIM (or RECLAIM) script describes."""
        _verdict, _detail, attempt, seq, attempts, building = reply
        return cls(entry_id, int(attempt), int(seq), cls.parse_attempts(attempts), building == b"1")

    @staticmethod
    def parse_attempts(raw: bytes | str) -> list[dict[str, Any]]:
        """The ``attempts`` field a claim returned (JSON text); [] when absent or bad."""
        try:
            value = json.loads(raw) if raw else []
        except ValueError:
            return []
        return [a for a in value if isinstance(a, dict)] if isinstance(value, list) else []
