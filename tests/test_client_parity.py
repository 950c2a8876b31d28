"""Client and AsyncClient offer the same calls: same names, parameters, defaults and results.

Only the async-ness may differ: a method of ``Client`` is a coroutine on ``AsyncClient``,
and one that returns an iterator there is an async iterator here.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from soaf import AsyncClient, Client

#: Names that only exist because one is sync and the other async.
_SYNC_ONLY = {"__enter__", "__exit__"}
_ASYNC_ONLY = {"__aenter__", "__aexit__"}


def public(cls: type) -> dict[str, Any]:
    return {name: value for name, value in vars(cls).items()
            if not name.startswith("_") and callable(value)}


def shape(sig: inspect.Signature) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]


def result(annotation: Any) -> str:
    """A return annotation with the async-ness taken out."""
    return str(annotation).replace("AsyncIterator[", "Iterator[").replace("AsyncClient", "Client")


def test_same_public_methods():
    assert sorted(public(Client)) == sorted(public(AsyncClient))
    assert set(vars(Client)) >= _SYNC_ONLY
    assert set(vars(AsyncClient)) >= _ASYNC_ONLY


@pytest.mark.parametrize("name", ["__init__", *sorted(public(Client))])
def test_same_signature(name):
    sync, aio = inspect.signature(getattr(Client, name)), inspect.signature(getattr(AsyncClient, name))
    assert shape(sync) == shape(aio), f"{name}: {sync} != {aio}"
    assert result(sync.return_annotation) == result(aio.return_annotation), name


@pytest.mark.parametrize("name", sorted(public(Client)))
def test_iterators_become_async_iterators_and_the_rest_coroutines(name):
    sync, aio = getattr(Client, name), getattr(AsyncClient, name)
    if str(inspect.signature(sync).return_annotation).startswith("Iterator["):
        assert inspect.isasyncgenfunction(aio), f"{name} should be an async iterator"
    else:
        assert inspect.iscoroutinefunction(aio), f"{name} should be a coroutine"


def test_same_documented_attributes(tmp_path):
    kwargs = {"secret": "s" * 32, "prefix": "p", "reconnect_for": 3.0, "max_payload": 1234}
    url = f"unix://{tmp_path}/none.sock"  # never connected to
    sync, aio = Client(url, **kwargs), AsyncClient(url, **kwargs)
    for attr in ("url", "keys", "reconnect_for", "max_payload"):
        assert getattr(sync, attr) == getattr(aio, attr), attr
    assert (sync.reconnect_for, sync.max_payload) == (3.0, 1234)
