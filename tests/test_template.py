"""ServiceParamTemplate.validate: a specific message naming the field for every kind of
bad value, and nothing but ValidationError whatever the fields hold (fuzzed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soaf import ServiceParamTemplate, ValidationError
from soaf.data.workdir import check_names, confine, create, literal_prefix, work_dir_for


def error(**fields) -> ValidationError:
    t = ServiceParamTemplate("steps", service_id="sid")
    for name, value in fields.items():
        setattr(t, name, value)
    with pytest.raises(ValidationError) as info:
        t.validate()
    return info.value


@pytest.mark.parametrize("fields, field, words", [
    ({"service": ""}, "service", "must be a service name"),
    ({"service": 3}, "service", "got int 3"),
    ({"service": "a b"}, "service", "must be a service name"),
    ({"service_id": None}, "service_id", "got NoneType None"),
    ({"service_id": "../x"}, "service_id", "1-128 letters"),
    ({"service_id": "x" * 129}, "service_id", "1-128 letters"),
    ({"work_path": "../up"}, "work_path", "contains '..'"),
    ({"work_path": "a/../../up"}, "work_path", "contains '..'"),
    ({"work_path": "/etc"}, "work_path", "is absolute"),
    ({"work_path": "."}, "work_path", "names the directory itself"),
    ({"work_path": ""}, "work_path", "must be a non-empty string"),
    ({"work_path": 5}, "work_path", "must be a non-empty string, got int 5"),
    ({"work_path": "a\x00b"}, "work_path", "NUL byte"),
    ({"input_files": ["/data/.."]}, "input_files", "contains '..'"),  # its name would be ..
    ({"input_files": {"/etc/passwd": "/tmp/x"}}, "input_files", "is absolute"),
    ({"input_files": {"../x": "/tmp/x"}}, "input_files", "contains '..'"),
    ({"input_files": {"a": 3}}, "input_files", "source int 3 must be a string"),
    ({"input_files": [None]}, "input_files", "must be a string"),
    ({"input_files": "one-string"}, "input_files", "must be a list of paths/URLs or a dict"),
    ({"output_files": ["../out"]}, "output_files", "contains '..'"),
    ({"output_files": ["/abs/*.txt"]}, "output_files", "is absolute"),
    ({"output_files": "out.txt"}, "output_files", "must be a list of names or globs"),
    ({"args": [1, 2]}, "args", "must be a dict, got list"),
    ({"env": {"A": 1}}, "env", "value of A must be a string, got int 1"),
    ({"env": {"A": None}}, "env", "value of A must be a string"),
    ({"env": {"A": b"bytes"}}, "env", "value of A must be a string, got bytes"),
    ({"env": {"A": "x\x00y"}}, "env", "value of A contains a NUL byte"),
    ({"env": {"A=B": "x"}}, "env", "variable name"),
    ({"env": {3: "x"}}, "env", "variable name int 3 is not valid"),
    ({"env": "A=B"}, "env", "must be a dict of strings"),
    ({"watch_interval": 0}, "watch_interval", "must be a positive number"),
    ({"watch_interval": math.nan}, "watch_interval", "must be a positive number"),
    ({"timeout": -1}, "timeout", "must be a positive number of seconds or None, got int -1"),
    ({"timeout": -0.5}, "timeout", "got float -0.5"),
    ({"timeout": math.inf}, "timeout", "must be a positive number"),
    ({"timeout": "10"}, "timeout", "got str '10'"),
    ({"timeout": True}, "timeout", "must be a positive number"),
    ({"retries": -1}, "retries", "whole number >= 0"),
    ({"retries": 1.5}, "retries", "whole number >= 0"),
    # bounds: nothing that could hang, burn or overflow a core later
    ({"watch_interval": 0.01}, "watch_interval", "from 0.05 to 31622400, got float 0.01"),
    ({"watch_interval": 1e9}, "watch_interval", "from 0.05"),
    ({"retries": 101}, "retries", "at most 100"),
    ({"retries": 10**30}, "retries", "at most 100"),
    ({"retry_backoff": 0}, "retry_backoff", "from 0.1 to"),
    ({"retry_backoff": 0.01}, "retry_backoff", "from 0.1 to"),
    ({"retry_backoff": math.inf}, "retry_backoff", "from 0.1 to"),
    ({"timeout": 1e300}, "timeout", "at most 31622400"),
    ({"max_memory_mb": 1e308}, "max_memory_mb", "got float 1e+308 (at most 1073741824)"),
    ({"max_memory_mb": math.inf}, "max_memory_mb", "must be a positive number"),
    ({"cpus": 0}, "cpus", "must be a positive number of CPUs or None"),
    ({"memory_mb": -1}, "memory_mb", "must be a positive number of MiB or None"),
    ({"cache": 1}, "cache", "must be True or False, got int 1"),
    ({"cache": "yes"}, "cache", "must be True or False"),
    ({"service_id": "abc\n"}, "service_id", "must be 1-128 letters"),
    ({"service": "svc\n"}, "service", "must be a service name"),
    ({"input_files": {"a\nb.txt": "/tmp/x"}}, "input_files", "contains a control character"),
    ({"input_files": {"x\x1b[2J": "/tmp/x"}}, "input_files", "contains a control character"),
    ({"output_files": ["out\r.txt"]}, "output_files", "contains a control character"),
    ({"work_path": "shared\tdir"}, "work_path", "contains a control character"),
    ({"input_files": {"stdout.log": "/tmp/x"}}, "input_files", "soaf writes in the work dir"),
    ({"input_files": ["/data/stderr.log"]}, "input_files", "soaf writes in the work dir"),
    ({"input_files": {"stderr.log/x": "/tmp/x"}}, "input_files", "soaf writes in the work dir"),
    ({"input_files": {".soaf-runs/n/x.exit": "/tmp/x"}}, "input_files", "soaf writes"),
    ({"work_path": ".soaf-runs/core-a"}, "work_path", "are soaf's own"),
    ({"work_path": ".soaf/runs"}, "work_path", "are soaf's own"),
    ({"work_path": ".soafx"}, "work_path", "are soaf's own"),
    ({"output_target": "memory://results/{service_id}"}, "output_target",
     "lives in the core's own memory"),
    ({"output_target": "MEMORY://x"}, "output_target", "lives in the core's own memory"),
])
def test_each_bad_field_gets_a_specific_message(fields, field, words) -> None:
    e = error(**fields)
    assert e.field == field
    assert words in str(e)
    assert str(e).startswith(f"{field}: ")


def test_a_good_template_passes() -> None:
    ServiceParamTemplate("steps", work_path="shared/run-1", input_files={"in/a.txt": "/x"},
                         output_files=["out/*.txt"], env={"A": "b"}, timeout=5,
                         retries=2).validate()


def test_a_subclass_that_deleted_a_field() -> None:
    @dataclass
    class Broken(ServiceParamTemplate):
        def __post_init__(self):
            del self.env

    with pytest.raises(ValidationError, match=r"^env: is missing \(a subclass deleted it"):
        Broken("steps").validate()


def test_a_subclass_whose_field_raises_when_read() -> None:
    class Raising(ServiceParamTemplate):
        @property
        def timeout(self):
            raise RuntimeError("no timeout for you")

        @timeout.setter
        def timeout(self, value):
            pass

    with pytest.raises(ValidationError, match=r"^timeout: reading it raised RuntimeError: no"):
        Raising("steps").validate()


def test_a_subclass_that_overrides_validate_cannot_skip_the_base_checks() -> None:
    class Lax(ServiceParamTemplate):
        def validate(self):
            pass

    t = Lax("steps", timeout=-1)
    t.validate()  # its own override lets it through ...
    with pytest.raises(ValidationError, match=r"^timeout:"):
        ServiceParamTemplate.validate(t)  # ... the base check (what core and client run) does not


def test_a_mapping_that_breaks_while_checked() -> None:
    class Exploding(dict):
        def items(self):
            raise OSError("boom")

    with pytest.raises(ValidationError, match=r"^env: cannot be checked: OSError: boom"):
        ServiceParamTemplate("steps", env=Exploding(A="b")).validate()


# -- symlinks under the work root ------------------------------------------------------


def test_symlinks_that_lead_out_of_the_work_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inside").mkdir()
    (root / "alias").symlink_to(root / "inside")
    with pytest.raises(ValidationError, match=r"^work_path: 'escape/run' resolves to .*outside"):
        work_dir_for(root, ServiceParamTemplate("steps", work_path="escape/run"))
    with pytest.raises(ValidationError, match=r"^work_path: 'escape' resolves to"):
        create(root, ServiceParamTemplate("steps", work_path="escape"))
    assert work_dir_for(root, ServiceParamTemplate("steps", work_path="alias")) == (
        root / "inside").resolve()  # a link that stays inside is fine
    (root / "self").symlink_to(root)
    with pytest.raises(ValidationError, match="itself, not an entry in it"):
        confine(root, "self", field="work_path")
    assert not any(outside.iterdir())


def test_check_names_sees_links_made_after_validation(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    t = ServiceParamTemplate("steps", service_id="sid", input_files={"data/in.txt": "/x"},
                             output_files=["results/*.csv", "log.txt"])
    work_dir = create(root, t)
    check_names(root, work_dir, t)  # nothing there yet: fine
    (work_dir / "data").symlink_to(outside)  # what a hostile build() could do
    with pytest.raises(ValidationError, match=r"^input_files: 'data/in.txt' resolves to .*outside"):
        check_names(root, work_dir, t)
    (work_dir / "data").unlink()
    (work_dir / "results").symlink_to(outside)  # or the program itself
    with pytest.raises(ValidationError, match=r"^output_files: 'results' resolves to"):
        check_names(root, work_dir, t, outputs_only=True)
    (work_dir / "results").unlink()
    work_dir.rmdir()
    work_dir.symlink_to(outside)  # the work dir itself replaced by a link
    with pytest.raises(ValidationError, match=r"^service_id: 'sid' resolves to"):
        check_names(root, work_dir, t)


def test_literal_prefix() -> None:
    assert literal_prefix("out/*.txt") == "out"
    assert literal_prefix("a/b/c.txt") == "a/b/c.txt"
    assert literal_prefix("*.txt") == ""
    assert literal_prefix("a/[xy]/z") == "a"


# -- fuzzing: nothing but ValidationError ----------------------------------------------


class Weird(str):
    """A str subclass whose methods lie."""

    def startswith(self, *args):
        raise RuntimeError("lying str")


class ExplodingDict(dict):
    def items(self):
        raise OSError("items exploded")

    def __iter__(self):
        raise OSError("iter exploded")


class Unprintable:
    def __repr__(self):
        raise RuntimeError("no repr")

    def __bool__(self):
        raise RuntimeError("no bool")


def values() -> st.SearchStrategy:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
        st.text(max_size=40), st.binary(max_size=20),
        st.sampled_from(["steps", "../x", "/abs", ".", "a/../b", "x\x00y", "*.txt", "http://h/",
                         "http://h/?q", "ok/name", "", " ", "a" * 300]),
        st.builds(Weird, st.text(max_size=5)), st.just(object()), st.just(math.inf),
        st.builds(ExplodingDict, st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
        st.builds(Unprintable),
    )
    return st.one_of(scalars, st.recursive(  # top-level scalars often, containers too
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.tuples(inner, inner),
            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()),
                            inner, max_size=4),
            st.frozensets(st.one_of(st.text(max_size=4), st.integers()), max_size=3),
        ),
        max_leaves=8,
    ))


FIELDS = ["service", "service_id", "work_path", "input_files", "output_files", "args", "env",
          "watch_interval", "timeout", "retries"]


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(FIELDS), values(), max_size=6),
       st.lists(st.sampled_from(FIELDS), max_size=2))
def test_fuzz_validate_raises_only_validation_error(fields, deleted) -> None:
    t = ServiceParamTemplate("steps")
    for name, value in fields.items():
        setattr(t, name, value)
    for name in deleted:
        t.__dict__.pop(name, None)
    try:
        t.validate()
    except ValidationError as e:
        assert e.field in FIELDS and str(e).startswith(e.field + ": ")


@pytest.mark.parametrize("name", ["cpus", "memory_mb"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "2", True])
def test_declared_needs_are_finite_and_positive(name, value):
    with pytest.raises(ValidationError, match=name):
        ServiceParamTemplate("x", **{name: value}).validate()
