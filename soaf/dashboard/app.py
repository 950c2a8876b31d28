"""``create_app``: the dashboard as an ASGI application (FastAPI), served by uvicorn.

Wires the pages (soaf.dashboard.pages) and ``/api`` (soaf.dashboard.api) to one
``AsyncClient``, starts the live-update hub with the app, maps soaf's errors to HTTP
statuses (JSON under ``/api``, a page elsewhere) and sets headers that keep a browser
from running anything but the dashboard's own script: even a value that slipped past
escaping could not run (Content-Security-Policy without inline scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from soaf.client.aio import AsyncClient
from soaf.dashboard import api, pages
from soaf.dashboard.auth import Guard
from soaf.dashboard.context import Dash
from soaf.dashboard.live import Hub
from soaf.dashboard.views import STATIC, environment
from soaf.errors import (
    ClientError,
    DecodeError,
    DuplicateService,
    RedisUnavailable,
    SignatureError,
    SoafError,
    UnknownService,
    ValidationError,
)

#: Sent with every response: scripts and styles only from the dashboard itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def status_of(error: SoafError) -> int:
    """The HTTP status for a soaf error."""
    if isinstance(error, UnknownService):
        return 404
    if isinstance(error, ValidationError):
        return 422
    if isinstance(error, SignatureError) and str(error).startswith("no secret"):
        return 503  # the dashboard has no key to sign with: its configuration
    if isinstance(error, (DuplicateService, ClientError, DecodeError)):
        return 409
    if isinstance(error, RedisUnavailable):
        return 503
    return 503  # no key to sign with, Redis refused a command: the server's side


def create_app(client: AsyncClient, *, token: str, hub: Hub | None = None) -> FastAPI:
    try:
        soaf_version = version("soaf")
    except PackageNotFoundError:
        soaf_version = "unknown"
    dash = Dash(client, Guard(token), hub or Hub(client), environment())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(dash.hub.run(), name="soaf-dashboard-live")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.close()

    app = FastAPI(title="soaf dashboard API", version=soaf_version, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  description="Read services, events, logs, cores and plugins; submit, cancel, "
                              "resubmit and reload with `Authorization: Bearer <token>`.")
    app.state.dash = dash

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                      ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(SoafError)
    async def soaf_error(request: Request, error: SoafError) -> Response:
        return error_response(dash, request, status_of(error), str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        response = error_response(dash, request, error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'template' if list(e['loc']) == ['body'] else e['loc'][-1]}: {e['msg']}"
            for e in error.errors())
        return error_response(dash, request, 422, problems)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(api.router(dash))
    app.include_router(pages.router(dash))
    return app


def error_response(dash: Dash, request: Request, status: int, detail: str) -> Response:
    if request.url.path.startswith("/api"):
        return JSONResponse({"detail": detail}, status)
    html = dash.templates.get_template("error.html").render(
        request=request, status=status, detail=detail, signed_in=dash.signed_in(request),
        csrf=dash.csrf(request), note="", page="error")
    return HTMLResponse(html, status)
