"""soaf: run other people's programs as managed services.

Users build a ``ServiceParamTemplate`` and submit it with a ``Client``; developers
write a ``ServiceProgramTemplate`` and a ``WatcherHandler`` per service in the
``services/`` and ``handlers/`` packages; a core (``python start_core.py``) runs them.
``Pipeline`` chains services on the client; ``AsyncClient`` is the asyncio flavour.
``confine`` keeps a path a plugin writes inside its work dir; ``probes`` declare how a
service's progress shows, for the core to measure.
"""

from soaf.client.aio import AsyncClient
from soaf.client.payload import dumps, loads
from soaf.client.pipeline import Pipeline, Step
from soaf.client.sync import Client
from soaf.data.workdir import confine
from soaf.errors import (
    ClientError,
    ConfigError,
    DataError,
    DecodeError,
    DuplicateService,
    FetchError,
    LogsUnavailable,
    MissingOutputError,
    NoCoreOffers,
    NotReplicated,
    PipelineError,
    PluginError,
    ProgramError,
    RedisUnavailable,
    SignatureError,
    SoafError,
    StepFailed,
    UnknownService,
    UnknownServiceError,
    UnsafePayload,
    UploadError,
    ValidationError,
    WaitTimeout,
)
from soaf.plugin import probes
from soaf.plugin.handler import STOP, WatcherHandler
from soaf.plugin.program import ServiceProgramTemplate
from soaf.plugin.service import Service
from soaf.protocol.state import FINAL_STATES, ServiceRecord, State
from soaf.protocol.template import ServiceParamTemplate, output_ref

__version__ = "0.1.0"

__all__ = [
    "FINAL_STATES",
    "STOP",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "DataError",
    "DecodeError",
    "DuplicateService",
    "FetchError",
    "LogsUnavailable",
    "MissingOutputError",
    "NoCoreOffers",
    "NotReplicated",
    "Pipeline",
    "PipelineError",
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
    "Step",
    "StepFailed",
    "UnknownService",
    "UnknownServiceError",
    "UnsafePayload",
    "UploadError",
    "ValidationError",
    "WaitTimeout",
    "WatcherHandler",
    "__version__",
    "confine",
    "dumps",
    "loads",
    "output_ref",
    "probes",
]
