"""The keys a core accepts, decided once at start: configured ones, the embedded core's
own (created on first start), or, with ``--insecure`` only, the well-known key."""

from __future__ import annotations

import logging
import os
import secrets as _secrets
from pathlib import Path

from soaf.config import INSECURE_SECRET, SECRET_FILE, Settings
from soaf.errors import ConfigError
from soaf.protocol.codec import key_id

log = logging.getLogger(__name__)

#: Secrets shorter than this get a warning at start (an HMAC of a known message lets
#: anyone holding one signed payload test guesses offline).
MIN_SECRET_LENGTH = 16


def create_secret(state_dir: Path) -> str:
    """Return the state directory's secret, creating it (mode 0600) the first time."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    value = _secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def core_secrets(settings: Settings, shown_url: str, *, embedded: bool) -> list[str]:
    """The keys a core accepts: the configured ones; else, on its embedded Redis, the
    state dir's (created once); else the well-known key if ``insecure`` (with a loud
    warning); else ConfigError, because a shared Redis without a key would let anyone who
    can write to it run code on the core. Logs the accepted key ids, never the keys."""
    if settings.secrets:
        keys = list(settings.secrets)
    elif embedded:
        keys = [create_secret(settings.state_dir)]
    elif settings.insecure:
        bar = "!" * 72
        log.warning(bar)
        log.warning("INSECURE CORE: no secret is set, payloads are checked against a key "
                    "everybody knows.")
        log.warning("Anyone who can write to %s can run any code on this core as user %s.",
                    shown_url, os.environ.get("USER") or os.getuid())
        log.warning("Set SOAF_SECRET (or SOAF_SECRET_FILE) and drop --insecure. See SECURITY.md.")
        log.warning(bar)
        keys = [INSECURE_SECRET]
    else:
        raise ConfigError(
            "no secret configured for a shared Redis: set SOAF_SECRET or SOAF_SECRET_FILE "
            "(or pass --insecure to accept a well-known key; never in production)")
    if any(len(k) < MIN_SECRET_LENGTH for k in keys if k != INSECURE_SECRET):
        log.warning("a configured secret is shorter than %d characters and can be guessed "
                    "from one signed payload; use a long random key", MIN_SECRET_LENGTH)
    log.info("accepting payloads signed with key id%s %s", "s" if len(keys) > 1 else "",
             ", ".join(key_id(k) for k in keys))
    return keys
