"""Dash: what every route of the dashboard uses, built once per app and passed to routers.

Also the JSON template of ``POST /api/submit``, turned into a ``ServiceParamTemplate``
that ``AsyncClient.submit`` validates and signs like any other.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import HTTPException, Request

from soaf.client.aio import AsyncClient
from soaf.dashboard.auth import COOKIE, Guard
from soaf.dashboard.live import Hub
from soaf.errors import ValidationError
from soaf.protocol.template import ServiceParamTemplate

#: Template fields a JSON submission may set (``signed_at`` is the server's).
TEMPLATE_FIELDS = frozenset(f.name for f in dataclasses.fields(ServiceParamTemplate)) - {"signed_at"}
#: An extra field's name: what a subclass attribute could be called.
EXTRA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass
class Dash:
    client: AsyncClient
    guard: Guard
    hub: Hub
    templates: jinja2.Environment

    def signed_in(self, request: Request) -> bool:
        return self.guard.session_nonce(request.cookies.get(COOKIE)) is not None

    def csrf(self, request: Request) -> str | None:
        nonce = self.guard.session_nonce(request.cookies.get(COOKIE))
        return self.guard.csrf_for(nonce) if nonce is not None else None

    def require_bearer(self, request: Request) -> None:
        """401 unless the request carries ``Authorization: Bearer <token>``."""
        if not self.guard.bearer_ok(request.headers.get("authorization")):
            raise HTTPException(401, "this call needs the dashboard token: send "
                                "'Authorization: Bearer <SOAF_DASHBOARD_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})


def template_from_json(data: Any) -> ServiceParamTemplate:
    """A template from a JSON object: template fields by name, any other name an extra
    attribute (as a subclass would add). ValidationError naming the field for anything
    that cannot be one; the field values are checked by ``submit``."""
    if not isinstance(data, dict):
        raise ValidationError("template", "must be a JSON object, e.g. {\"service\": \"name\"}")
    if "signed_at" in data:
        raise ValidationError("signed_at", "is set by the server when it signs; leave it out")
    if not isinstance(data.get("service"), str) or not data["service"]:
        raise ValidationError("service", "is missing: name the service to run")
    for name in data:
        if name not in TEMPLATE_FIELDS and (not EXTRA_NAME.match(name)
                                            or hasattr(ServiceParamTemplate, name)):
            raise ValidationError(name, "is neither a template field nor a possible extra field "
                                        "(a letter, then letters, digits or '_'; not a method)")
    known = {k: v for k, v in data.items() if k in TEMPLATE_FIELDS
             and not (k == "service_id" and v is None)}  # null: a new id, as by default
    template = ServiceParamTemplate(**known)
    for name, value in data.items():
        if name not in TEMPLATE_FIELDS:
            setattr(template, name, value)
    return template
