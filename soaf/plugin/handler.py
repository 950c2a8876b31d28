"""WatcherHandler: the developer's three callbacks that follow one running service.

The watcher thread of a service calls ``before_watch_callback(service)`` once, then
``file_change_callback(service, files)`` every ``watch_interval`` seconds (sooner when a
file in the work dir changes), and ``after_watch_callback(service, files)`` exactly
once per attempt, whatever happened (even when the build failed, the program could
not start, timed out or was cancelled: ``service.outcome`` and ``service.exit`` say
which). ``files`` are sorted paths relative to the work dir. An exception in a
callback is recorded on the service and never stops the core. A callback that hangs
delays neither the program's supervision (timeout, cancel) nor the recording of its
exit; once the program has ended it gets ``after_watch_timeout`` (the core's
``callback_timeout``) before soaf finishes the service without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from soaf.plugin.service import Service


class _Stop:
    """Returned from ``file_change_callback`` to stop watching (the program keeps running
    until it exits; ``after_watch_callback`` still runs then)."""

    _instance: _Stop | None = None

    def __new__(cls) -> _Stop:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "soaf.STOP"

    def __reduce__(self) -> str:
        return "STOP"


STOP = _Stop()


class WatcherHandler:
    """Subclass in the ``handlers/`` package and set ``service`` to the name it watches."""

    #: The service name this handler watches.
    service: ClassVar[str] = ""
    #: Seconds ``after_watch_callback`` may take; None: the core's ``callback_timeout``.
    #: Past it the service ends ``failed`` (failure ``callback``) and the call is abandoned.
    after_watch_timeout: ClassVar[float | None] = None
    #: True: a service whose callbacks raised ends ``failed`` (failure ``callback``) even
    #: if its program succeeded. False (default): it succeeds, and the errors are on its
    #: record as warnings (``record.warnings``, ``soaf status``, ``soaf wait``, ``soaf ls``).
    fail_on_callback_error: ClassVar[bool] = False

    def before_watch_callback(self, service: Service) -> None:
        """Called once, after the program started and before the first file check."""

    def file_change_callback(self, service: Service, files: list[str]) -> Any:
        """Called every interval with the work dir's files; return ``soaf.STOP`` to stop."""

    def after_watch_callback(self, service: Service, files: list[str]) -> None:
        """Called once when the program has ended: collect, upload, clean up."""


class DefaultHandler(WatcherHandler):
    """The handler of a service that has none of its own: records the file count."""

    def file_change_callback(self, service: Service, files: list[str]) -> Any:
        service.set(file_count=len(files))

    def after_watch_callback(self, service: Service, files: list[str]) -> None:
        service.set(file_count=len(files))
