"""Templates from the command line: a template file, or ``soaf submit``'s options.

A template file is a Python file that defines ``template`` (or ``templates``, a list),
run as ``__main__`` so that template classes defined in it travel by value like a
script's; or a JSON file holding a template's fields (an object or a list of them),
whose relative input paths are taken from the file's directory. Local input paths
are made absolute, because the core resolves them in its own working directory.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import click

from soaf.protocol.template import ServiceParamTemplate, is_url


def parse_pairs(values: tuple[str, ...], what: str, *, decode: bool) -> dict[str, Any]:
    """``k=v`` options to a dict; values as JSON when ``decode`` and they parse, else text."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        if decode:
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


def absolute(source: str, base: Path) -> str:
    """A local input path made absolute (the core may run elsewhere than here); URLs kept."""
    return source if is_url(source) else str((base / Path(source).expanduser()).resolve())


def load_templates(path: Path) -> list[ServiceParamTemplate]:
    """Templates from a ``.json`` file (an object or a list of objects with template
    fields) or a Python file defining ``template`` or ``templates``."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"cannot read {path}: {e}", param_hint="FILE") from e
        items = data if isinstance(data, list) else [data]
        templates = []
        for item in items:
            if not isinstance(item, dict):
                raise click.BadParameter(f"{path}: expected objects, got {item!r}", param_hint="FILE")
            try:
                template = ServiceParamTemplate(**item)
            except TypeError as e:
                raise click.BadParameter(f"{path}: {e}", param_hint="FILE") from e
            template.input_files = _absolute_inputs(template.input_files, path.parent)
            templates.append(template)
        return templates
    # __main__, so template classes defined in the file travel by value (like a script's).
    namespace = runpy.run_path(str(path), run_name="__main__")
    found = namespace.get("templates", namespace.get("template"))
    if isinstance(found, ServiceParamTemplate):
        return [found]
    if isinstance(found, (list, tuple)) and found and all(
            isinstance(t, ServiceParamTemplate) for t in found):
        return list(found)
    raise click.BadParameter(f"{path} defines no 'template' (a ServiceParamTemplate) or "
                             "'templates' (a list of them)", param_hint="FILE")


def _absolute_inputs(inputs: Any, base: Path) -> Any:
    if isinstance(inputs, dict):
        return {k: absolute(v, base) if isinstance(v, str) else v for k, v in inputs.items()}
    if isinstance(inputs, list):
        return [absolute(v, base) if isinstance(v, str) else v for v in inputs]
    return inputs


def from_options(*, service: str, args: tuple[str, ...], inputs: tuple[str, ...],
                 outputs: tuple[str, ...], env: tuple[str, ...], service_id: str | None,
                 timeout: float | None, retries: int | None, watch_interval: float | None,
                 work_path: str | None) -> ServiceParamTemplate:
    """The template ``soaf submit --service ...`` describes; ``--input [NAME=]PATH|URL``."""
    sources: dict[str, str] = {}
    for item in inputs:
        name, sep, source = item.partition("=")
        if not sep or is_url(item):
            name, source = Path(item.split("?", 1)[0].rstrip("/")).name, item
        sources[name] = absolute(source, Path.cwd())
    template = ServiceParamTemplate(
        service=service, args=parse_pairs(args, "--arg", decode=True), input_files=sources,
        output_files=list(outputs), env=parse_pairs(env, "--env", decode=False),
        work_path=work_path, timeout=timeout,
    )
    if service_id:
        template.service_id = service_id
    if retries is not None:
        template.retries = retries
    if watch_interval is not None:
        template.watch_interval = watch_interval
    return template


def check_local_inputs(templates: list[ServiceParamTemplate]) -> None:
    """Refuse templates whose local input paths do not exist here: the usual slip is a
    typo, found sooner here than as a failed ``preparing`` on the core."""
    for t in templates:
        for name, source in t.input_sources().items():
            if isinstance(source, str) and not is_url(source) and not Path(source).exists():
                raise click.ClickException(
                    f"input {name}: {source} does not exist here. Check the path, or pass "
                    "--no-check if it exists only where the core runs")
