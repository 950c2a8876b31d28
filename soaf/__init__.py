"""soaf: run other people's programs as managed services.

Users build a ``ServiceParamTemplate`` and submit it with a ``Client``; developers
write a ``ServiceProgramTemplate`` and a ``WatcherHandler`` per service in the
``services/`` and ``handlers/`` packages; a core (``python start_core.py``) runs them.
"""

from soaf.client import Client
from soaf.codec import dumps, loads
from soaf.errors import (
    ClientError,
    ConfigError,
    DecodeError,
    DuplicateService,
    PluginError,
    ProgramError,
    RedisUnavailable,
    SignatureError,
    SoafError,
    UnknownService,
    UnknownServiceError,
    UnsafePayload,
    ValidationError,
    WaitTimeout,
)
from soaf.handler import STOP, WatcherHandler
from soaf.program import ServiceProgramTemplate
from soaf.service import Service
from soaf.state import FINAL_STATES, ServiceRecord, State
from soaf.template import ServiceParamTemplate

__version__ = "0.1.0"

__all__ = [
    "FINAL_STATES",
    "STOP",
    "Client",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "DuplicateService",
    "PluginError",
    "ProgramError",
    "RedisUnavailable",
    "Service",
    "ServiceParamTemplate",
    "ServiceProgramTemplate",
    "ServiceRecord",
    "SignatureError",
    "SoafError",
    "State",
    "UnknownService",
    "UnknownServiceError",
    "UnsafePayload",
    "ValidationError",
    "WaitTimeout",
    "WatcherHandler",
    "__version__",
    "dumps",
    "loads",
]
