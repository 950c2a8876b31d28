"""The dashboard's HTML pages (fleet, services, one service, plugins), sign-in and actions.

Pages are rendered on the server; ``static/live.js`` then keeps them current from the
server-sent events of ``/api`` (writing text, never markup). Actions are forms that POST
here with the session's CSRF token and redirect back with a note; without a session the
pages show no action at all, and a POST without both cookie and CSRF token is refused.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from soaf.dashboard import listing
from soaf.dashboard.auth import COOKIE
from soaf.dashboard.context import Dash
from soaf.dashboard.views import lenient
from soaf.protocol.state import State

#: Events shown on a service's page (the newest).
EVENTS_SHOWN = 200
#: Log lines shown when a service's page opens.
LOG_TAIL = 100


def router(dash: Dash) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    client = dash.client

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.update(request=request, signed_in=dash.signed_in(request),
                       csrf=dash.csrf(request), note=request.query_params.get("note", ""),
                       now=time.time(), page=name.removesuffix(".html"))
        return HTMLResponse(dash.templates.get_template(name).render(context), status)

    async def form(request: Request) -> dict[str, str]:
        """The posted form, after checking its session and CSRF token (403 otherwise)."""
        fields = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if not dash.guard.csrf_ok(request.cookies.get(COOKIE), fields.get("csrf")):
            raise HTTPException(403, "actions need the dashboard token: sign in first "
                                "(and post from the dashboard's own pages)")
        return fields

    def back(to: str, note: str) -> RedirectResponse:
        return RedirectResponse(f"{to}?note={quote(note)}", status_code=303)

    @pages.get("/", response_class=HTMLResponse)
    async def fleet(request: Request) -> HTMLResponse:
        nodes = [lenient(n) for n in sorted(await client.nodes(), key=lambda n: str(n.get("node")))]
        total = int(await client.redis.zcard(client.keys.services))
        return render(request, "fleet.html", nodes=nodes, plugins=await client.plugins(),
                      total=total)

    @pages.get("/services", response_class=HTMLResponse)
    async def services(request: Request, state: str = "", service: str = "", node: str = "",
                       cursor: str = "", limit: int = listing.PAGE_SIZE) -> HTMLResponse:
        filters = listing.Filters(state or None, service or None, node or None)
        page = await listing.page(client.redis, client.keys, filters, cursor=cursor or None,
                                  size=limit)
        return render(request, "services.html", rows=page.rows, result=page, filters=filters,
                      states=[s.value for s in State], limit=limit)

    @pages.get("/services/{service_id}", response_class=HTMLResponse)
    async def service(request: Request, service_id: str) -> HTMLResponse:
        record = await client.status(service_id)
        events = [e async for e in client.events(service_id, follow=False)][-EVENTS_SHOWN:]
        lines = await client.log_lines(service_id, tail=LOG_TAIL)
        raw = lenient(record.raw)
        return render(request, "service.html", record=record, raw=raw, events=events,
                      lines=lines, row={**raw, "service_id": service_id},
                      details={k: v for k, v in sorted(raw.items()) if k not in SHOWN_APART})

    @pages.get("/plugins", response_class=HTMLResponse)
    async def plugins(request: Request) -> HTMLResponse:
        return render(request, "plugins.html", plugins=sorted((await client.plugins()).items()))

    @pages.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", failed=False)

    @pages.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        fields = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if not dash.guard.token_ok(fields.get("token")):
            return render(request, "login.html", status=403, failed=True)
        response = RedirectResponse("/?note=" + quote("signed in: actions are on"), 303)
        response.set_cookie(COOKIE, dash.guard.new_session(), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @pages.post("/logout")
    async def logout(request: Request) -> RedirectResponse:
        await form(request)
        response = back("/", "signed out: read-only")
        response.delete_cookie(COOKIE)
        return response

    @pages.post("/services/{service_id}/cancel")
    async def cancel(request: Request, service_id: str) -> RedirectResponse:
        await form(request)
        return back(f"/services/{quote(service_id)}", await client.cancel(service_id))

    @pages.post("/services/{service_id}/resubmit")
    async def resubmit(request: Request, service_id: str) -> RedirectResponse:
        await form(request)
        await client.status(service_id)  # an unknown id is a 404, not a missing payload
        new = await client.resubmit(service_id)
        return back(f"/services/{quote(new)}", f"resubmitted {service_id} as {new}")

    @pages.post("/plugins/reload")
    async def reload(request: Request) -> RedirectResponse:
        node = (await form(request)).get("node") or None
        await client.reload(node)
        return back("/plugins", f"reload asked of {node or 'every core'}")

    return pages


#: Record fields a service's page shows in sections of their own, not in "all fields".
SHOWN_APART = frozenset({"attempts", "outputs", "inputs", "traceback", "callback_traceback",
                         "command", "journal"})
