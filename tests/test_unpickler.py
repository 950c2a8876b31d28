"""The restricted unpickler: textbook exploit pickles are refused even when signed, and
everything a template legitimately carries (classes by value included) still loads.

Each hostile pickle is first loaded with plain dill to prove it really runs its command
(the marker file appears); then soaf must refuse it and the marker must stay absent.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import dill
import dill._dill as dill_impl
import pytest

import soaf.protocol.codec
from soaf.errors import DecodeError, UnsafePayload
from soaf.protocol.codec import loads, sign
from soaf.protocol.unpickler import restricted_loads
from tests.conftest import wait_until

SECRET = "unpickler-test-secret-0123456789"


def exit_now(code: int) -> None:
    raise SystemExit(code)


class Call:
    """Pickles as ``fn(*args)``: the building block of exploit pickles."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, *args):  # pickle insists that the reduce callable be callable
        raise AssertionError("never called here")

    def __reduce__(self):
        return (self.fn, self.args)


def stack_global(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle of ``module.name(arg)`` naming the global with STACK_GLOBAL,
    which allows dotted names (aliases such as ``dill._dill`` + ``os.system``)."""
    def short(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."


def hostile(marker: Path) -> dict[str, bytes]:
    """Pickles that run ``touch marker`` (or worse) when loaded by plain dill."""
    touch = f"touch {marker}"
    return {
        "os.system": pickle.dumps(Call(os.system, touch), protocol=2),
        "os.system protocol 0": b"cos\nsystem\n(V" + touch.encode() + b"\ntR.",
        "posix.system": b"cposix\nsystem\n(V" + touch.encode() + b"\ntR.",
        "subprocess.call": pickle.dumps(Call(subprocess.call, ["touch", str(marker)]), protocol=4),
        "subprocess.Popen": pickle.dumps(Call(subprocess.Popen, ["touch", str(marker)]), protocol=4),
        "builtins.eval": pickle.dumps(
            Call(eval, f"__import__('os').system({touch!r})"), protocol=4),
        "builtins.exec": pickle.dumps(
            Call(exec, f"import os; os.system({touch!r})"), protocol=4),
        "__builtin__.eval protocol 0": b"c__builtin__\neval\n(V__import__('os').system('"
                                       + touch.encode() + b"')\ntR.",
        "builtins.__import__": pickle.dumps(
            Call(Call(getattr, Call(__import__, "os"), "system"), touch), protocol=4),
        "getattr chain through dill's _import_module": pickle.dumps(
            Call(Call(getattr, Call(dill_impl._import_module, "os"), "system"), touch),
            protocol=4),
        "dill._get_attr chain": pickle.dumps(
            Call(Call(dill_impl._get_attr, Call(dill_impl._import_module, "os"), "system"),
                 touch), protocol=4),
        "_import_module of a dotted class": pickle.dumps(
            Call(Call(dill_impl._import_module, "subprocess.Popen"), ["touch", str(marker)]),
            protocol=4),
        "alias dill._dill.os.system": stack_global("dill._dill", "os.system", touch),
        "alias through soaf.protocol.template's imports": stack_global(
            "soaf.protocol.template", "uuid.os.system", touch),
        "dill's _eval_repr": pickle.dumps(
            Call(dill_impl._eval_repr, f"__import__('os').system({touch!r})"), protocol=4),
        "dill's _getattr": pickle.dumps(Call(  # it evals a piece of its third argument
            dill_impl._getattr, object, "__init__",
            f"a'b'c'[__import__(\"os\").system(\"{touch}\"), object][1]'d"), protocol=4),
        "nested dill.loads": pickle.dumps(Call(dill.loads, pickle.dumps(
            Call(os.system, touch), protocol=2)), protocol=4),
        "dill's _create_filehandle": pickle.dumps(Call(
            dill_impl._create_filehandle, str(marker), "w", 0, False, open, False, 0, None),
            protocol=4),
        "pathlib write_text": pickle.dumps(
            Call(Path.write_text, Path(marker), "x"), protocol=4),
        "bound write_text through getattr": pickle.dumps(
            Call(Call(getattr, Path(marker), "write_text"), "x"), protocol=4),
        "builtins.open": pickle.dumps(Call(open, str(marker), "w"), protocol=4),
        "importlib.import_module": pickle.dumps(Call(Call(
            getattr, Call(__import__("importlib").import_module, "os"), "system"), touch),
            protocol=4),
        "operator.methodcaller": pickle.dumps(Call(Call(
            __import__("operator").methodcaller, "system", touch),
            Call(dill_impl._import_module, "os")), protocol=4),
        "shutil.copy": pickle.dumps(Call(__import__("shutil").copy, __file__, str(marker)),
                                    protocol=4),
    }


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker"


@pytest.mark.parametrize("name", sorted(hostile(Path("/x"))))
def test_hostile_pickle_is_refused_and_never_runs(name: str, marker: Path) -> None:
    payload = hostile(marker)[name]
    try:  # the control: plain dill really runs it
        dill.loads(payload)
    except Exception:
        pass
    wait_until(marker.exists, 10, message=f"the control pickle {name!r} to run (else the test "
                                          "proves nothing)")
    marker.unlink()

    with pytest.raises(UnsafePayload) as info:
        loads(sign(payload, SECRET), [SECRET])  # even with a valid signature
    assert "refuses to load" in str(info.value)
    assert not marker.exists()


def test_hostile_pickle_unsigned_is_never_unpickled(marker: Path) -> None:
    from soaf.errors import SignatureError

    for payload in hostile(marker).values():
        with pytest.raises(SignatureError):
            loads(payload, [SECRET])
    assert not marker.exists()


def test_setattr_on_a_module_is_refused() -> None:
    """A payload may not patch soaf (here: replace the signature check)."""
    original = soaf.protocol.codec.verify
    payload = pickle.dumps(Call(
        setattr, Call(dill_impl._import_module, "soaf.protocol.codec"), "verify", len), protocol=4)
    with pytest.raises(UnsafePayload, match="did not create"):
        restricted_loads(payload)
    assert soaf.protocol.codec.verify is original


def test_import_with_side_effects_is_refused() -> None:
    assert "antigravity" not in sys.modules
    payload = stack_global("antigravity", "geohash", "x")
    with pytest.raises(UnsafePayload):
        restricted_loads(payload)
    payload = pickle.dumps(Call(dill_impl._import_module, "antigravity"), protocol=4)
    with pytest.raises(UnsafePayload):
        restricted_loads(payload)
    assert "antigravity" not in sys.modules  # never imported, so no browser was opened


def test_the_core_main_namespace_is_refused() -> None:
    with pytest.raises(UnsafePayload, match="__main__"):
        restricted_loads(b"c__builtin__\n__main__\n.")


def test_method_bound_to_an_instance_is_a_documented_limitation() -> None:
    items: list[int] = []
    with pytest.raises(UnsafePayload, match="bound to objects"):
        restricted_loads(dill.dumps({"cb": items.append}, protocol=4))


def test_system_exit_while_loading_is_a_decode_error() -> None:
    """A signed pickle whose loading raises SystemExit must not stop a core."""
    payload = pickle.dumps(Call(exit_now, 3), protocol=4)
    with pytest.raises(SystemExit):
        pickle.loads(payload)
    with pytest.raises(DecodeError, match="SystemExit"):
        loads(sign(payload, SECRET), [SECRET])


CLIENT_SCRIPT = textwrap.dedent('''
    import abc, collections, datetime, decimal, fractions, functools, json, os, pathlib
    import sys, typing, uuid
    from dataclasses import dataclass, field
    import soaf
    from soaf import ServiceParamTemplate, State

    def helper(x):
        return os.path.join("a", x) + json.dumps(x)

    Point = collections.namedtuple("Point", "x y")

    class Mixin(abc.ABC):
        @abc.abstractmethod
        def f(self): ...

    @dataclass
    class Rich(ServiceParamTemplate, Mixin, typing.Generic[typing.AnyStr]):
        color: str = "none"
        when: datetime.datetime = field(default_factory=datetime.datetime.now)
        path: pathlib.Path = pathlib.Path("a/b")
        state: State = State.QUEUED
        point: tuple = Point(1, 2)
        def f(self): return "f"
        def method(self): return helper(self.color)
        @property
        def prop(self): return 1
        @classmethod
        def cm(cls): return cls.__name__
        @staticmethod
        def sm(): return 2

    def closure():
        y = 5
        def inner(): return y
        return inner

    class Plain:
        def __init__(self): self.a = 1
        def get(self): return self.a

    t = Rich(service="steps", color="uv", args={
        "deque": collections.deque([1]), "dec": decimal.Decimal("1.5"),
        "frac": fractions.Fraction(1, 3), "uuid": uuid.UUID(int=7), "set": {1, 2},
        "bytes": b"x", "bytearray": bytearray(b"y"), "complex": 1j, "range": range(1, 9, 2),
        "slice": slice(1, 2), "ellipsis": ..., "fn": helper, "lam": lambda q: q + 1,
        "closure": closure(), "partial": functools.partial(helper, "z"), "plain": Plain(),
        "bound": Plain().get, "cls": Plain, "none": type(None), "date": datetime.date(2020, 1, 2),
        "tz": datetime.timezone.utc, "from_bytes": int.from_bytes,
    })
    sys.stdout.buffer.write(soaf.dumps(t, sys.argv[1]))
''')


def test_by_value_classes_and_everyday_values_still_load(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), SECRET], capture_output=True,
                         timeout=60, check=True)
    t = loads(out.stdout, [SECRET])
    assert type(t).__name__ == "Rich" and type(t).__module__ == "__main__"
    assert (t.color, t.f(), t.method(), t.prop, t.cm(), t.sm()) == (
        "uv", "f", 'a/uv"uv"', 1, "Rich", 2)
    a = t.args
    assert a["lam"](1) == 2 and a["closure"]() == 5 and a["partial"]() == 'a/z"z"'
    assert a["range"] == range(1, 9, 2) and a["ellipsis"] is Ellipsis
    assert a["plain"].a == 1 and a["bound"]() == 1 and a["none"] is type(None)
    assert str(t.path) == "a/b" and t.state.value == "queued" and t.point == (1, 2)
    assert a["from_bytes"](b"\x01", "big") == 1


class Holder:
    @staticmethod
    def make(text: str) -> str:
        return f"made {text}"


def test_dotted_names_reach_python_functions_but_not_builtin_methods() -> None:
    assert restricted_loads(stack_global("tests.test_unpickler", "Holder.make", "x")) == "made x"
    assert bytearray.fromhex("ff") == b"\xff"  # harmless, but a C method reached via its class
    with pytest.raises(UnsafePayload, match="built-in method reached through its class"):
        restricted_loads(stack_global("builtins", "bytearray.fromhex", "ff"))


def test_payloads_naming_the_modules_of_older_soaf_still_load() -> None:
    """Before soaf had subpackages the template and states lived in ``soaf.template`` and
    ``soaf.state``; a payload from a client of that time names those modules."""
    from soaf import ServiceParamTemplate, State

    # Protocol 2 names globals as text lines ("c<module>\n<name>\n"), easy to rewrite.
    body = dill.dumps((ServiceParamTemplate("old"), State.QUEUED), protocol=2)
    for new, old in ((b"soaf.protocol.template\n", b"soaf.template\n"),
                     (b"soaf.protocol.state\n", b"soaf.state\n")):
        assert new in body
        body = body.replace(new, old)
    template, state = restricted_loads(body)
    assert template.service == "old" and state is State.QUEUED
