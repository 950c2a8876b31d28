"""Serve the dashboard with uvicorn: find Redis like a client, settle the token, run.

The token is ``SOAF_DASHBOARD_TOKEN``; when it is unset a new one is made for this run
and handed to the caller to print (whoever sees the dashboard's output may act).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from soaf.client.aio import AsyncClient
from soaf.config import find_secrets
from soaf.dashboard.app import create_app
from soaf.dashboard.auth import new_token

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


@dataclass(frozen=True)
class Token:
    value: str
    #: True: made for this run (SOAF_DASHBOARD_TOKEN was unset).
    generated: bool


def token_from_env() -> Token:
    given = os.environ.get("SOAF_DASHBOARD_TOKEN", "").strip()
    return Token(given, False) if given else Token(new_token(), True)


def serve(*, host: str, port: int, token: str, url: str | None = None,
          prefix: str | None = None, state_dir: Path | None = None) -> None:
    """Run the dashboard until SIGINT/SIGTERM. ConfigError when no Redis is found."""
    client = AsyncClient(url, prefix=prefix, state_dir=state_dir)
    if not find_secrets(state_dir):
        log.warning("no key to sign with (SOAF_SECRET, SOAF_SECRET_FILE or an embedded core's "
                    "state dir): submit, cancel, resubmit and reload will answer 503")
    uvicorn.run(create_app(client, token=token), host=host, port=port, log_level="info",
                access_log=False, timeout_graceful_shutdown=2)
