"""docs/plugin-api.md names every public attribute and method of the plugin API, and
docs/client.md every public method of the Client: a new one fails here until documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from soaf import Client, ServiceParamTemplate, ServiceProgramTemplate, WatcherHandler
from soaf.plugin.service import Service

DOCS = Path(__file__).resolve().parent.parent / "docs"


def public_names(cls: type, instance: object | None = None) -> set[str]:
    """The class's public attributes and methods (not object's), and the instance's."""
    names = {n for n in dir(cls) if not n.startswith("_")} - set(dir(object))
    if instance is not None:
        names |= {n for n in vars(instance) if not n.startswith("_")}
    return names


def section(text: str, title: str) -> str:
    """The part of a markdown page under ``## `title` `` up to the next ``## ``."""
    match = re.search(rf"^## `{title}`\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/plugin-api.md has no section ## `{title}`"
    return match.group(1)


def documented(text: str) -> set[str]:
    """Names written in backticks at the start of a table row: | `name` | or | `name(...)` |."""
    return set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)[(`]", text, re.M))


@pytest.mark.parametrize("cls", [ServiceProgramTemplate, WatcherHandler, Service])
def test_every_public_attribute_is_on_the_plugin_api_page(cls: type, tmp_path: Path) -> None:
    template = ServiceParamTemplate("x")
    instance: object = {
        ServiceProgramTemplate: lambda: ServiceProgramTemplate(template, tmp_path,
                                                               plugin_root=tmp_path),
        WatcherHandler: WatcherHandler,
        Service: lambda: Service(template, tmp_path, attempt=1, node="n", plugin_version="v",
                                 emit=lambda values: None),
    }[cls]()
    text = section((DOCS / "plugin-api.md").read_text(), cls.__name__)
    body = text + ("\nHelper: `program_path()`" if cls is ServiceProgramTemplate else "")
    missing = public_names(cls, instance) - documented(text) - set(
        re.findall(r"`([a-z_]+)\(\)`", body))
    assert missing == set(), f"docs/plugin-api.md does not describe {cls.__name__}.{sorted(missing)}"


def test_the_check_notices_a_missing_name(tmp_path: Path) -> None:
    class Extended(WatcherHandler):
        brand_new_option = 1

    text = section((DOCS / "plugin-api.md").read_text(), "WatcherHandler")
    assert public_names(Extended) - documented(text) == {"brand_new_option"}


def test_every_client_method_is_in_the_client_page() -> None:
    text = (DOCS / "client.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)\(", text, re.M))
    methods = {n for n in public_names(Client) if callable(getattr(Client, n))}
    assert methods - listed - {"close"} == set()
    assert "follow_logs" in listed
