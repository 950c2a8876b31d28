"""An AsyncClient seen through blocking calls, so one behaviour test runs against both clients.

The client lives on an event loop of its own in a background thread; each coroutine
method is run there and waited for, each async iterator becomes a plain iterator that
pulls one item at a time. Several test threads may call it at once, as they may a
``Client``.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from soaf import AsyncClient

T = TypeVar("T")

#: Seconds any one call may take before the test fails instead of hanging.
CALL_TIMEOUT = 120.0


class BlockingAsyncClient:
    """``AsyncClient(*args, **kwargs)`` with the calling conventions of ``Client``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="blocking-async-client")
        self._thread.start()
        try:
            self.aio: AsyncClient = self._run(self._make(args, kwargs))
        except BaseException:
            self._stop()
            raise

    @staticmethod
    async def _make(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncClient:
        return AsyncClient(*args, **kwargs)  # its connections belong to this loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await agen.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.aio, name)
        if inspect.isasyncgenfunction(getattr(type(self.aio), name, None)):
            def iterate(*args: Any, **kwargs: Any) -> Iterator[Any]:
                return self._iterate(attr(*args, **kwargs))
            return iterate
        if inspect.iscoroutinefunction(attr):
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._run(attr(*args, **kwargs))
            return call
        return attr

    def close(self) -> None:
        if self._loop.is_closed():
            return  # closed already, as a Client may be
        try:
            self._run(self.aio.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flavours() -> dict[str, Callable[..., Any]]:
    """The client classes behaviour tests run against, by name."""
    from soaf import Client

    return {"sync": Client, "async": BlockingAsyncClient}
