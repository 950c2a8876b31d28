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
    ├── StateError             reading or writing the state store failed
    │   └── RedisUnavailable   Redis could not be reached
    └── ClientError            a client call that cannot be answered
        ├── WaitTimeout        `Client.wait` ran out of time (also a TimeoutError)
        ├── UnknownService     no service has this id
        └── DuplicateService   a service with this id was already submitted

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


class StateError(SoafError):
    """Reading or writing the state store failed."""


class RedisUnavailable(StateError):
    """Redis could not be reached."""


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
