"""Turn templates into signed bytes and back: dill inside an HMAC-SHA256 envelope.

A pickle runs code while it is loaded, so ``loads`` checks the signature and the size
before dill sees a single byte. The envelope is::

    b"soaf1:" + key_id + b":" + hex(hmac_sha256(secret, b"soaf1:" + key_id + b":" + body)) + b":" + body

``key_id`` is the first 8 hex digits of sha256(secret): it names the key without
revealing it, so several secrets can be accepted at once while a key is rotated.
A template is signed with the time it is signed (``signed_at``, inside the pickle), so a
core can tell a replay of an old payload from work that waits for it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import io
import pickle
import time
import types
from collections.abc import Sequence
from typing import Any

import dill

from soaf.errors import DecodeError, SignatureError, UnsafePayload
from soaf.protocol.template import ServiceParamTemplate
from soaf.protocol.unpickler import restricted_loads

MAGIC = b"soaf1:"
#: Payloads larger than this are refused before any decoding.
DEFAULT_MAX_PAYLOAD = 1024 * 1024


@functools.lru_cache(maxsize=64)  # verify() names every accepted key on every payload
def key_id(secret: str | bytes) -> str:
    """The public name of a secret: 8 hex digits of its sha256."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()[:8]


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(body: bytes, secret: str | bytes) -> bytes:
    """Wrap already-pickled bytes in a signed envelope."""
    head = MAGIC + key_id(secret).encode() + b":"
    mac = hmac.new(_as_bytes(secret), head + body, hashlib.sha256).hexdigest().encode()
    return head + mac + b":" + body


def verify(
    payload: bytes, secrets: Sequence[str | bytes], *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> bytes:
    """Return the body of a correctly signed envelope, or raise.

    Raises DecodeError for oversized or non-envelope input and SignatureError for a bad
    or unknown signature. The secrets never appear in the messages.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_size:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the limit of {max_size}")
    if not payload:
        raise DecodeError("empty payload")
    if not payload.startswith(MAGIC):
        raise SignatureError("payload is not a signed soaf envelope (no 'soaf1:' header)")
    parts = payload[len(MAGIC):].split(b":", 2)
    if len(parts) != 3 or len(parts[0]) != 8 or len(parts[1]) != 64:
        raise SignatureError("signed envelope is truncated or malformed")
    kid, mac, body = parts
    by_id = {key_id(s).encode(): s for s in secrets}
    secret = by_id.get(kid)
    if secret is None:
        raise SignatureError(
            f"payload signed with key id {kid.decode(errors='replace')}, which this core does "
            "not know: the client's SOAF_SECRET differs from the core's (the core accepts "
            f"key id{'s' if len(by_id) > 1 else ''} {b', '.join(by_id).decode() or 'none'})")
    head = MAGIC + kid + b":"
    expected = hmac.new(_as_bytes(secret), head + body, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(expected, mac):
        raise SignatureError("payload signature does not match (forged or corrupted)")
    return body


class _NeedsDill(Exception):
    """Raised inside the plain pickler for what only dill can carry."""


class _PlainPickler(pickle.Pickler):
    """The standard (C) pickler, for payloads that hold only data and importable classes,
    which is what almost every template is: it pickles them the way dill would, about
    ten times faster (dill's pickler is written in Python, and a client pays it on every
    submit). Anything dill must carry by value (a function, a module, or a class or
    instance from ``__main__``) stops it, and dill takes over."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _BY_VALUE):
            raise _NeedsDill
        module = getattr(obj, "__module__", None) if isinstance(obj, type) else \
            getattr(type(obj), "__module__", None)
        if module == "__main__":
            raise _NeedsDill
        return NotImplemented


_BY_VALUE = (types.FunctionType, types.MethodType, types.ModuleType, types.CodeType,
             functools.partial, types.BuiltinFunctionType)


def _pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, protocol=4).dump(obj)
        return buffer.getvalue()
    except (_NeedsDill, pickle.PicklingError, TypeError, AttributeError):
        body: bytes = dill.dumps(obj, protocol=4, recurse=True)
        return body


def dumps(obj: Any, secret: str | bytes) -> bytes:
    """Pickle ``obj`` (with dill where it needs to: classes from ``__main__`` by value)
    and sign it.

    ``soaf.dumps`` (soaf.client.payload) is this with the secret a client would find.
    A template is signed as a copy stamped with the time (``signed_at``); ``obj`` is
    left as it was."""
    if isinstance(obj, ServiceParamTemplate):
        obj = copy.copy(obj)
        try:
            obj.signed_at = time.time()
        except (AttributeError, TypeError):  # a subclass that forbids it: no age
            pass
    try:
        body = _pickle(obj)
    except Exception as e:  # dill raises many kinds for unpicklable objects
        raise DecodeError(f"cannot pickle {type(obj).__name__}: {e}") from e
    return sign(body, secret)


def loads(payload: bytes, secrets: Sequence[str | bytes], *,
          max_size: int = DEFAULT_MAX_PAYLOAD) -> Any:
    """Verify and unpickle a payload made by ``dumps``; DecodeError for anything else."""
    body = verify(payload, secrets, max_size=max_size)
    try:
        return restricted_loads(body)
    except UnsafePayload:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a corrupt pickle may raise anything, SystemExit included
        raise DecodeError(f"signed payload does not unpickle: {describe_exception(e)}") from e


def check_loadable(payload: bytes) -> None:
    """Unpickle a payload made by ``dumps`` the way a core will, so that a client learns
    before sending what the core would refuse (UnsafePayload names the global)."""
    body = payload.split(b":", 3)[3] if payload.startswith(MAGIC) else payload
    try:
        restricted_loads(body)
    except UnsafePayload:
        raise
    except Exception as e:
        raise DecodeError(f"the template does not load back: {describe_exception(e)}") from e


def describe_exception(e: BaseException) -> str:
    """``Type: message`` of an exception raised by untrusted code, bounded in length and
    safe even when its ``__str__`` raises."""
    try:
        return f"{type(e).__name__}: {e}"[:500]
    except Exception:  # an exception with a broken __str__
        return type(e).__name__
