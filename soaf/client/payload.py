"""``soaf.dumps`` and ``soaf.loads``: the payload codec with the secret a client finds.

soaf.protocol.codec signs and verifies with the keys it is given; these find them the way
a ``Client`` does (SOAF_SECRET, SOAF_SECRET_FILE, then the embedded core's state
directory), for scripts that push payloads with plain redis-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soaf.config import find_secrets
from soaf.errors import SignatureError
from soaf.protocol import codec
from soaf.protocol.codec import DEFAULT_MAX_PAYLOAD


def signing_secret(secret: str | bytes | None = None, state_dir: Path | None = None
                   ) -> str | bytes:
    """``secret``, else the first key a client finds (in ``state_dir`` if given);
    SignatureError when there is none."""
    if secret is not None:
        return secret
    found = find_secrets(state_dir)
    if not found:
        raise SignatureError("no secret to sign with: set SOAF_SECRET or run next to an "
                             "embedded core")
    return found[0]


def dumps(obj: Any, secret: str | bytes | None = None) -> bytes:
    """Pickle ``obj`` with dill (classes from ``__main__`` by value) and sign it.

    With no ``secret`` the one a client would find is used (SOAF_SECRET, then the
    embedded core's state directory)."""
    return codec.dumps(obj, signing_secret(secret))


def loads(payload: bytes, secrets: Sequence[str | bytes] | None = None, *,
          max_size: int = DEFAULT_MAX_PAYLOAD) -> Any:
    """Verify and unpickle a payload made by ``dumps``; DecodeError for anything else."""
    return codec.loads(payload, find_secrets() if secrets is None else secrets,
                       max_size=max_size)
