"""Who may act: the dashboard's token, browser sessions and their CSRF tokens.

Reading needs nothing; cancelling, resubmitting, reloading and submitting need the token
(``SOAF_DASHBOARD_TOKEN``). A browser proves it once on the login page and gets a session
cookie (HttpOnly, SameSite=Strict) holding a random nonce and its HMAC under the token;
every form it posts carries a CSRF token, another HMAC of that nonce, which a page of
another site cannot read. API calls send ``Authorization: Bearer <token>`` instead; a
browser never adds that header by itself, so they need no CSRF token. Changing the
token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: Name of the session cookie.
COOKIE = "soaf_session"
#: Bytes of randomness in a generated token.
TOKEN_BYTES = 24


def new_token() -> str:
    """A token for a dashboard started without ``SOAF_DASHBOARD_TOKEN``."""
    return secrets.token_urlsafe(TOKEN_BYTES)


class Guard:
    """Checks the token, sessions and CSRF tokens of one dashboard."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the dashboard token must not be empty")
        self._key = token.encode()

    def _mac(self, purpose: str, nonce: str) -> str:
        return hmac.new(self._key, f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._key)

    def bearer_ok(self, header: str | None) -> bool:
        """An ``Authorization`` header carrying the token."""
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(given.strip())

    def new_session(self) -> str:
        """A session cookie value for a browser that gave the token."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._mac('session', nonce)}"

    def session_nonce(self, cookie: str | None) -> str | None:
        """The nonce of a genuine session cookie, else None."""
        nonce, _, mac = (cookie or "").partition(".")
        if nonce and hmac.compare_digest(mac, self._mac("session", nonce)):
            return nonce
        return None

    def csrf_for(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, cookie: str | None, given: str | None) -> bool:
        """A form posted by a signed-in browser from one of the dashboard's own pages."""
        nonce = self.session_nonce(cookie)
        return (nonce is not None and given is not None
                and hmac.compare_digest(given, self.csrf_for(nonce)))
