"""The control thread acts only on signed messages; unknown types are logged once a minute."""

from __future__ import annotations

import logging
import threading

from soaf.core.cancels import Verifier
from soaf.core.control import Control
from soaf.protocol.keys import Keys
from soaf.protocol.signed import sign_control

SECRET = "s3cret"


def test_unsigned_forged_and_unknown_messages_are_ignored(caplog):
    now = [100.0]
    done: list[str] = []
    control = Control(None, Keys("t"), "n1", cancel=done.append,  # type: ignore[arg-type]
                      reload=lambda: done.append("reload"), stopping=threading.Event(),
                      verifier=Verifier([SECRET]), clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    control.handle({b"type": b"cancel", b"id": b"a"})
    control.handle({b"type": b"cancel", b"id": b"a",
                    b"sig": sign_control("cancel", "b", SECRET).encode()})
    control.handle({b"type": b"reload", b"sig": sign_control("reload", "", "other").encode()})
    assert done == []
    control.handle({b"type": b"cancel", b"id": b"a",
                    b"sig": sign_control("cancel", "a", SECRET).encode()})
    control.handle({b"type": b"reload", b"sig": sign_control("reload", "", SECRET).encode()})
    assert done == ["a", "reload"]
    for _ in range(3):
        control.handle({b"type": b"boom"})
    assert caplog.text.count("unknown type 'boom'") == 1
    now[0] += 61
    control.handle({b"type": b"boom"})
    assert caplog.text.count("unknown type 'boom'") == 2
