"""The exception tree of soaf: every error soaf raises on purpose derives from SoafError.

    SoafError
    ├── ConfigError            settings that cannot work (bad URL, missing secret ...)
    │   └── NodeInUse          another live core already runs under this node name
    ├── EmbeddedRedisError     the embedded redis-server could not be found or started
    ├── DecodeError            a payload that is not a valid, signed, soaf template
    │   ├── SignatureError     unsigned, forged, truncated or signed with an unknown key
    │   └── UnsafePayload      a signed payload that names a global soaf refuses to load
    ├── ValidationError        a template field that cannot be accepted (names the field)
    ├── PluginError            a plugin package failed to load or a plugin raised
    │   └── UnknownServiceError no plugin serves the requested service name
    ├── ProgramError           a service program could not be started
    ├── DataError              data could not be moved into or out of a work dir
    │   ├── FetchError         an input could not be staged (names the source and why)
    │   ├── MissingOutputError expected outputs the program did not write (lists them)
    │   ├── OutputLimitError   output patterns matched too many files or took too long
    │   ├── UploadError        outputs could not be copied to the output target
    │   └── TransferStopped    a cancel or a core stop came while data was moved
    ├── StateError             reading or writing the state store failed
    │   └── RedisUnavailable   Redis could not be reached
    │       └── NotReplicated  a durable write that no replica confirmed in time
    └── ClientError            a client call that cannot be answered
        ├── WaitTimeout        `Client.wait` ran out of time (also a TimeoutError)
        ├── UnknownService     no service has this id
        ├── DuplicateService   a service with this id was already submitted
        ├── NoCoreOffers       `submit(require_core=True)` and no live core offers the service
        ├── LogsUnavailable    a service's output files cannot be read from this machine
        └── PipelineError      a pipeline cannot go on (e.g. a step's output is missing)
            └── StepFailed     a step did not succeed, or was skipped because one it needs did not

Callers catch SoafError to handle anything soaf raises; third-party errors are wrapped
where they are caught (``raise StateError(...) from e``) so the cause stays visible.
"""

from __future__ import annotations


class SoafError(Exception):
    """Root of every error soaf raises on purpose."""


class ConfigError(SoafError):
    """Settings that cannot work; raised once, at start, before anything runs."""


class NodeInUse(ConfigError):
    """Another core that is alive runs under this node name; a core refuses to start then,
    since two cores sharing a name would share (and double-run) its pending work."""


class EmbeddedRedisError(SoafError):
    """The embedded redis-server could not be found or started."""


class DecodeError(SoafError):
    """A payload that is not a valid soaf template; it is never unpickled past this point."""


class SignatureError(DecodeError):
    """A payload that is unsigned, forged, truncated or signed with an unknown key."""


class UnsafePayload(DecodeError):
    """A signed payload that needs a global soaf never loads (``os.system``, ``eval`` ...)."""


class ValidationError(SoafError):
    """A template field that cannot be accepted; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PluginError(SoafError):
    """A plugin package failed to load, or plugin code raised."""


class UnknownServiceError(PluginError):
    """No loaded plugin serves the requested service name."""


class ProgramError(SoafError):
    """A service program could not be started (missing executable, no permission ...)."""


class DataError(SoafError):
    """Data could not be moved into or out of a work dir."""


class FetchError(DataError):
    """An input could not be staged; the message names the source (credentials hidden)
    and the reason, so the submitter can fix the template without reading core logs."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot stage {source}: {reason}")
        self.source = source
        self.reason = reason


class MissingOutputError(DataError):
    """Outputs the template expects (``output_files``) that the program did not write."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"missing outputs: {', '.join(missing)}")
        self.missing = list(missing)


class OutputLimitError(DataError):
    """Matching the output patterns went past a bound (files, entries looked at, seconds);
    see soaf.data.matching."""


class UploadError(DataError):
    """Outputs could not be copied to the template's ``output_target``."""


class TransferStopped(DataError):
    """A cancel or a core stop came while inputs were staged or outputs collected: the
    transfer stopped between two chunks and wrote nothing more."""


class StateError(SoafError):
    """Reading or writing the state store failed."""


class RedisUnavailable(StateError):
    """Redis could not be reached."""


class NotReplicated(RedisUnavailable):
    """A durable write reached the master, but fewer replicas than asked for confirmed it
    in time: a failover now could lose it. Repeating the write is safe (a resubmitted
    template is refused with DuplicateService when the first one survived)."""


class ClientError(SoafError):
    """A client call that cannot be answered."""


class WaitTimeout(ClientError, TimeoutError):
    """`Client.wait` ran out of time before the service reached a final state."""


class UnknownService(ClientError, KeyError):
    """No service has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateService(ClientError):
    """A service with this id was already submitted; it runs once."""


class NoCoreOffers(ClientError):
    """``submit(..., require_core=True)`` of a service no live core offers: nothing was
    queued. Without ``require_core`` it is queued and waits for such a core."""


class LogsUnavailable(ClientError):
    """A service's output files cannot be read from this machine (yet)."""


class PipelineError(ClientError):
    """A pipeline cannot go on: an output is missing, a template cannot be built ..."""


class StepFailed(PipelineError):
    """A pipeline step did not succeed, or was skipped because a step it needs did not.

    ``step`` is the step waited for, ``cause`` the step that really failed (the same
    step when it failed itself), ``record`` the final record of ``step`` when it ran.
    """

    def __init__(self, message: str, *, step: object, cause: object, record: object = None) -> None:
        super().__init__(message)
        self.step = step
        self.cause = cause
        self.record = record
