"""``/api``: the dashboard's JSON and server-sent-event API, for any language.

Reads need nothing; ``submit``, ``cancel``, ``resubmit`` and ``reload`` need
``Authorization: Bearer <SOAF_DASHBOARD_TOKEN>``. Errors are JSON ``{"detail": ...}``
with the status saying what kind (404 unknown id, 422 a bad template field, 409 a
duplicate id, 401 no token, 503 Redis away or no key to sign with). The OpenAPI
description is at ``/api/openapi.json``; docs/dashboard.md has curl examples.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent

from soaf.dashboard import listing
from soaf.dashboard.context import Dash, template_from_json
from soaf.protocol.state import State

#: Shown in the OpenAPI description: which calls need the token.
BEARER = HTTPBearer(auto_error=False, description="SOAF_DASHBOARD_TOKEN")
STATE_TEXT = "only services in this state: " + ", ".join(s.value for s in State)
SUBMIT_TEXT = ("'service' plus any template field (docs/protocol.md, Template fields); any "
               "other name is kept as an extra field, as a subclass would add")
EXAMPLE = {"service": "wordcount", "input_files": ["/data/a.txt"], "args": {"delay": 0.5},
           "requested_by": "curl"}


def token(request: Request, _: Annotated[Any, Depends(BEARER)]) -> None:
    """The dependency of every action: 401 without the bearer token."""
    request.app.state.dash.require_bearer(request)


async def existing(request: Request, service_id: str) -> str:
    """A service id with a record: UnknownService (404) before a stream starts."""
    await request.app.state.dash.client.status(service_id)
    return service_id


Existing = Annotated[str, Depends(existing)]


def router(dash: Dash) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["api"])
    client = dash.client

    @api.get("/services", summary="List services, newest first (paged by cursor)")
    async def services(state: Annotated[str | None, Query(description=STATE_TEXT)] = None,
                       service: str | None = None, node: str | None = None,
                       cursor: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=listing.MAX_PAGE)] = listing.PAGE_SIZE,
                       ) -> dict[str, Any]:
        page = await listing.page(client.redis, client.keys,
                                  listing.Filters(state, service, node), cursor=cursor, size=limit)
        return {"services": page.rows, "next": page.next, "scanned": page.scanned,
                "total": page.total}

    @api.get("/services/{service_id}", summary="One service's record (every field)")
    async def service(service_id: str) -> dict[str, Any]:
        record = await client.status(service_id)
        return {**record.raw, "service_id": record.service_id, "fields": record.fields}

    @api.get("/services/{service_id}/events", response_class=EventSourceResponse,
             summary="Every event of a service, then live ones until its final state (SSE)")
    async def events(service_id: Existing) -> AsyncIterable[ServerSentEvent]:
        async for event in client.events(service_id):
            yield ServerSentEvent(data=event, event="event", id=event.get("event_id"))
        yield ServerSentEvent(data={"final": True}, event="end")

    @api.get("/services/{service_id}/logs", summary="The last lines of a service's output")
    async def logs(service_id: str, tail: Annotated[int, Query(ge=1, le=10_000)] = 100
                   ) -> dict[str, Any]:
        lines = await client.log_lines(service_id, tail=tail)
        return {"lines": [asdict(line) for line in lines]}

    @api.get("/services/{service_id}/logs/stream", response_class=EventSourceResponse,
             summary="The last lines, then each new line until the service is final (SSE)")
    async def log_stream(service_id: Existing,
                         tail: Annotated[int, Query(ge=0, le=1000)] = 50
                         ) -> AsyncIterable[ServerSentEvent]:
        async for line in client.follow_logs(service_id, tail=tail):
            yield ServerSentEvent(data=asdict(line), event="line")
        yield ServerSentEvent(data={"final": True}, event="end")

    @api.get("/live", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}},
             summary="Live updates for every service and core (SSE: 'services', 'nodes')")
    async def live() -> StreamingResponse:
        # Encoded once by the hub for every page, so not a ServerSentEvent per page.
        return StreamingResponse(dash.hub.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/nodes", summary="The cores alive now, with their load")
    async def nodes() -> list[dict[str, Any]]:
        return await client.nodes()

    @api.get("/plugins", summary="Plugin version and last load error of every core")
    async def plugins() -> dict[str, Any]:
        return await client.plugins()

    @api.post("/submit", status_code=201, dependencies=[Depends(token)],
              summary="Submit a template given as JSON; the server validates and signs it")
    async def submit(template: Annotated[dict[str, Any], Body(examples=[EXAMPLE],
                                                              description=SUBMIT_TEXT)]
                     ) -> dict[str, str]:
        return {"service_id": await client.submit(template_from_json(template))}

    @api.post("/services/{service_id}/cancel", dependencies=[Depends(token)],
              summary="Cancel a service")
    async def cancel(service_id: str) -> dict[str, str]:
        return {"result": await client.cancel(service_id)}

    @api.post("/services/{service_id}/resubmit", status_code=201, dependencies=[Depends(token)],
              summary="Submit a service's template again under a new id")
    async def resubmit(service_id: str) -> dict[str, str]:
        await client.status(service_id)
        return {"service_id": await client.resubmit(service_id)}

    @api.post("/reload", dependencies=[Depends(token)], summary="Ask cores to reload plugins")
    async def reload(node: str | None = None) -> JSONResponse:
        await client.reload(node)
        return JSONResponse({"result": f"reload asked of {node or 'every core'}"})

    return api
