"""Templates from soaf submit's options and from template files."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from soaf.cli.templatefile import from_options, load_templates, parse_pairs


def options(**kw):
    base = dict(service="svc", args=(), inputs=(), outputs=(), env=(), service_id=None,
                timeout=None, retries=None, watch_interval=None, work_path=None)
    return from_options(**{**base, **kw})


def test_pairs_decode_json_values_when_they_parse():
    assert parse_pairs(("n=3", "flag=true", "xs=[1,2]", "name=x", "empty=", "eq=a=b"), "--arg",
                       decode=True) == {"n": 3, "flag": True, "xs": [1, 2], "name": "x",
                                        "empty": "", "eq": "a=b"}
    assert parse_pairs(("n=3",), "--env", decode=False) == {"n": "3"}
    for bad in ("novalue", "=x"):
        with pytest.raises(click.BadParameter):
            parse_pairs((bad,), "--arg", decode=True)


def test_options_make_a_valid_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = options(args=("n=2",), inputs=("a.txt", "b=sub/c.txt", "https://x.org/d.csv?x=1"),
                outputs=("out*.txt",), env=("MODE=fast",), service_id="my-id", timeout=5.0,
                retries=2, watch_interval=0.5, work_path="shared")
    t.validate()
    assert t.input_files == {"a.txt": str(tmp_path / "a.txt"), "b": str(tmp_path / "sub/c.txt"),
                             "d.csv": "https://x.org/d.csv?x=1"}
    assert (t.args, t.env, t.output_files) == ({"n": 2}, {"MODE": "fast"}, ["out*.txt"])
    assert (t.service_id, t.timeout, t.retries, t.watch_interval, t.work_path) == (
        "my-id", 5.0, 2, 0.5, "shared")


def test_json_file_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "jobs" / "job.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"service": "svc", "input_files": {"x": "in.txt", "u": "http://h/y"}}))
    (t,) = load_templates(path)
    assert t.input_files == {"x": str(path.parent / "in.txt"), "u": "http://h/y"}
    path.write_text(json.dumps([{"service": "a"}, {"service": "b", "no_such_field": 1}]))
    with pytest.raises(click.BadParameter, match="no_such_field"):
        load_templates(path)


def test_python_file_defines_template_or_templates(tmp_path):
    one = tmp_path / "one.py"
    one.write_text("from soaf import ServiceParamTemplate\ntemplate = ServiceParamTemplate('a')\n")
    assert [t.service for t in load_templates(one)] == ["a"]
    many = tmp_path / "many.py"
    many.write_text("from soaf import ServiceParamTemplate as T\ntemplates = [T('a'), T('b')]\n")
    assert [t.service for t in load_templates(many)] == ["a", "b"]
    none = tmp_path / "none.py"
    none.write_text("template = 'not a template'\n")
    with pytest.raises(click.BadParameter, match="defines no 'template'"):
        load_templates(Path(none))
