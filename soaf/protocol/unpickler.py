"""Unpickle a verified payload, refusing the short paths from a pickle to a shell or a file.

The signature is the real gate: only a holder of the secret gets bytes this far, and
such a client is trusted to run code on the core (a template may carry classes and
functions by value, and dill must rebuild them, so a signed payload can always run
code it carries). This unpickler is defense in depth against the textbook payloads —
``os.system``, ``subprocess``, ``eval``/``exec``/``__import__``, ``getattr`` chains to
them, opening files or sockets, importing modules with side effects — so that a
leaked key or a copy-pasted exploit is not a one-line compromise. It is not a sandbox;
SECURITY.md says what it does not stop.

How: dill's Unpickler with ``find_class`` overridden. Every global a payload names is
checked before its module is imported and again after it is resolved (so an alias such
as ``dill._dill.os.system`` is caught too). dill's own reflective helpers (``getattr``,
``setattr``, ``_import_module``, ``_eval_repr`` ...) are replaced by guarded versions:
``setattr`` only touches objects this payload created, ``getattr`` never hands out a
private attribute or a method bound to an instance, nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import builtins
import io
import re
import sys
import types
from typing import Any

import dill
import dill._dill as dill_impl

from soaf.errors import UnsafePayload

#: Top-level modules whose functions and classes a template never needs and whose
#: reach is a process, a file, a socket, the interpreter's internals or an import with
#: side effects. Their modules may still appear as values (a by-value function's globals
#: may name ``os``); only what is taken *out* of them is refused.
DENIED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "tty", "termios",
    "shutil", "socket", "_socket", "ssl", "_ssl", "select", "selectors", "asyncio",
    "ctypes", "_ctypes", "cffi", "importlib", "pkgutil", "zipimport", "runpy", "code",
    "codeop", "compileall", "py_compile", "marshal", "pickle", "_pickle", "pickletools",
    "shelve", "dbm", "sqlite3", "_sqlite3", "multiprocessing", "_multiprocessing",
    "concurrent", "threading", "_thread", "signal", "_signal", "faulthandler", "atexit",
    "sys", "gc", "inspect", "tempfile", "io", "_io", "fileinput", "glob", "zipfile",
    "tarfile", "gzip", "bz2", "lzma", "mmap", "fcntl", "resource", "syslog", "logging",
    "webbrowser", "antigravity", "this", "urllib", "http", "ftplib", "smtplib", "poplib",
    "imaplib", "nntplib", "telnetlib", "socketserver", "xmlrpc", "wsgiref", "platform",
    "sysconfig", "site", "pdb", "bdb", "trace", "timeit", "profile", "cProfile", "pstats",
    "doctest", "pydoc", "tkinter", "_tkinter", "turtle", "idlelib", "venv", "ensurepip",
    "pip", "setuptools", "distutils", "operator", "_operator", "pathlib", "codecs",
    "_codecs", "redis", "watchdog", "soaf", "dill",
})
#: Exceptions to DENIED_MODULES: (module, name) pairs that are plain data or harmless.
ALLOWED = frozenset({
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("logging", "getLogger"), ("codecs", "encode"), ("_codecs", "encode"),
    ("operator", "getitem"), ("_operator", "getitem"),  # subscripted generics: Generic[T]
})
#: soaf modules a template may legitimately refer to (its own class, states, errors).
SOAF_MODULES = frozenset({"soaf.protocol.template", "soaf.protocol.state", "soaf.errors"})
#: Where those modules lived before soaf had subpackages: payloads pickled by an older
#: client name them so, and still load.
MOVED_MODULES = {"soaf.template": "soaf.protocol.template", "soaf.state": "soaf.protocol.state"}
#: dill helpers a payload may call. The rest of dill (``loads`` would unpickle without
#: these checks; ``_create_filehandle`` opens files; ``_create_capsule`` takes raw pointers;
#: ``_getattr``/``_getattribute`` reach anything) is refused.
DILL_ALLOWED = frozenset({
    "_create_type", "_create_function", "_create_code", "_create_cell", "_create_ftype",
    "_create_typing_tuple", "_create_lock", "_create_rlock", "_create_stringi",
    "_create_stringo", "_create_weakref", "_create_weakproxy", "_create_array",
    "_create_dtypemeta", "_create_namedtuple", "_load_type", "_get_attr", "_import_module",
    "_eval_repr", "_setitems", "_setattr", "_delattr",
})
DENIED_BUILTINS = frozenset({
    "eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "help", "exit",
    "quit", "globals", "locals", "vars", "delattr", "__build_class__", "memoryview",
})
#: Dunder globals pickle itself uses.
DUNDER_OK = frozenset({("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__")})

_DENIED_BUILTIN_IDS = frozenset(id(getattr(builtins, n)) for n in DENIED_BUILTINS
                                if hasattr(builtins, n))
_RANGE = re.compile(r"^range\((-?\d{1,19})(?:, (-?\d{1,19}))?(?:, (-?\d{1,19}))?\)$")


def _refuse(what: str, why: str) -> UnsafePayload:
    return UnsafePayload(f"payload needs {what}, which soaf refuses to load ({why})")


def _root(module: str) -> str:
    return module.split(".", 1)[0]


def _module_denied(module: str, name: str) -> bool:
    if (module, name) in ALLOWED:
        return False
    if _root(module) == "soaf":
        return module not in SOAF_MODULES
    if _root(module) == "dill":
        return module not in ("dill", "dill._dill", "dill._shims") or (
            module != "dill" and name not in DILL_ALLOWED)
    return _root(module) in DENIED_MODULES


def _owner(obj: Any) -> tuple[str, str]:
    """(module, qualified name) of whatever ``obj`` came from, for the deny checks."""
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, types.BuiltinFunctionType) and isinstance(obj.__self__, types.ModuleType):
        return obj.__self__.__name__, obj.__name__
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        module = getattr(obj, "__module__", None)
        self_ = getattr(obj, "__self__", None)
        if module is None and self_ is not None:
            cls = self_ if isinstance(self_, type) else type(self_)
            return cls.__module__, f"{cls.__qualname__}.{obj.__name__}"
        return str(module), getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
    objclass = getattr(type(obj), "__objclass__", None) or getattr(obj, "__objclass__", None)
    if isinstance(objclass, type):  # method descriptors such as ``str.join``
        return objclass.__module__, f"{objclass.__qualname__}.{getattr(obj, '__name__', '?')}"
    cls = type(obj)
    return cls.__module__, cls.__qualname__


class RestrictedUnpickler(dill.Unpickler):  # type: ignore[misc]  # dill ships no types
    """dill's Unpickler that refuses dangerous globals; one instance per payload."""

    def __init__(self, file: Any) -> None:
        # ignore=True: never re-point a by-value class at a same-named global of the
        # core's own __main__ (dill does that by default).
        super().__init__(file, ignore=True)
        self._made: dict[int, Any] = {}  # objects this payload created: setattr targets
        self._given: dict[str, Any] = {}  # stand-ins handed out, so their identity holds

    # -- the one hook the C unpickler offers --------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("__builtin__", "NoneType"):
            return type(None)
        if module == "dill.dill":
            module = "dill._dill"
        module = MOVED_MODULES.get(module, module)
        where = f"{module}.{name}"
        if (module, name) == ("__builtin__", "__main__"):
            raise _refuse(where, "the core's own __main__ namespace")
        parts = name.split(".")
        if (module, name) not in DUNDER_OK and any(p.startswith("__") for p in parts):
            raise _refuse(where, "interpreter internals")
        if _module_denied(module, name):
            raise _refuse(where, f"nothing from {module} is needed to rebuild a template")
        obj = super().find_class(module, parts[0])
        for part in parts[1:]:  # through classes only, never through a module
            if not isinstance(obj, type):
                raise _refuse(where, "only nested classes may be named with dots")
            obj = getattr(obj, part)
        if len(parts) > 1 and callable(obj) and not isinstance(obj, (type, types.FunctionType)):
            raise _refuse(where, "a built-in method reached through its class")
        return self._vet(obj, where)

    def _vet(self, obj: Any, where: str | None = None) -> Any:
        """``obj`` (or its guarded stand-in) if it may be handed to the payload."""
        if isinstance(obj, types.ModuleType):
            return obj  # inert by itself; what is taken out of it is vetted
        stand_in = _STAND_INS.get(id(obj))
        if stand_in is not None:
            return self._stand_in(stand_in)
        if id(obj) in _DENIED_BUILTIN_IDS:
            raise _refuse(where or f"builtins.{getattr(obj, '__name__', '?')}",
                          "it evaluates code, imports, or opens files")
        module, qualname = _owner(obj)
        if _module_denied(module, qualname.split(".", 1)[0]) and (module, qualname) not in ALLOWED:
            raise _refuse(where or f"{module}.{qualname}",
                          "it can run commands, touch files or sockets, or reach internals")
        return obj

    def _stand_in(self, name: str) -> Any:
        given = self._given.get(name)
        if given is None:
            given = self._given[name] = getattr(self, name)
        return given

    # -- guarded stand-ins for dill's reflective helpers --------------------------------

    def _getattr(self, obj: Any, name: str, *default: Any) -> Any:
        dill_helper = obj is dill_impl and name in DILL_ALLOWED  # how dill names its shims
        if not isinstance(name, str) or (
                name.startswith("_") and name != "__func__" and not dill_helper):
            raise _refuse(f"getattr(..., {name!r})", "private attributes")
        value = getattr(obj, name, *default)
        if any(value is given for given in self._given.values()):  # a default already ours
            return value
        self_ = getattr(value, "__self__", None)
        if (isinstance(value, (types.MethodType, types.BuiltinMethodType))
                and self_ is not None and not isinstance(self_, (type, types.ModuleType))):
            raise _refuse(f"{type(self_).__name__}.{name} of an instance",
                          "methods bound to objects are not rebuilt")
        return self._vet(value, f"getattr(..., {name!r})")

    def _get_attr(self, obj: Any, name: str) -> Any:
        value = self._getattr(obj, name, None)
        return value if value is not None else self._getattr(builtins, name)

    def _setattr(self, obj: Any, name: str, value: Any) -> None:
        if id(obj) not in self._made:
            raise _refuse(f"setattr on {type(obj).__name__}", "it changes an object the "
                          "payload did not create")
        setattr(obj, name, value)

    def _delattr(self, obj: Any, name: str) -> None:
        if id(obj) not in self._made:
            raise _refuse(f"delattr on {type(obj).__name__}", "it changes an object the "
                          "payload did not create")
        delattr(obj, name)

    def _made_here(self, obj: Any) -> Any:
        self._made[id(obj)] = obj
        return obj

    def _create_type(self, *args: Any) -> Any:
        return self._made_here(dill_impl._create_type(*args))

    def _create_function(self, *args: Any, **kwargs: Any) -> Any:
        return self._made_here(dill_impl._create_function(*args, **kwargs))

    def _create_cell(self, *args: Any) -> Any:
        return self._made_here(dill_impl._create_cell(*args))

    def _new_class(self, *args: Any, **kwargs: Any) -> Any:  # generic by-value classes
        return self._made_here(types.new_class(*args, **kwargs))

    def _load_type(self, name: str) -> Any:
        return self._vet(dill_impl._load_type(name), f"dill type {name}")

    @staticmethod
    def _eval_repr(text: str) -> Any:
        return _eval_repr(text)

    def _import_module(self, import_name: str, safe: bool = False) -> Any:
        if not isinstance(import_name, str):
            raise _refuse(f"import of {import_name!r}", "not a module name")
        if import_name not in sys.modules and _module_denied(import_name, ""):
            raise _refuse(f"import of {import_name}", "importing it has side effects")
        return self._vet(dill_impl._import_module(import_name, safe), f"import of {import_name}")

    def _create_namedtuple(self, name: str, fieldnames: Any, modulename: str,
                           defaults: Any = None) -> Any:
        if not isinstance(modulename, str) or (
                modulename not in sys.modules and _module_denied(modulename, "")):
            raise _refuse(f"namedtuple from {modulename!r}", "importing it has side effects")
        cls = dill_impl._create_namedtuple(name, fieldnames, modulename, defaults)
        return self._vet(cls, f"namedtuple {modulename}.{name}")


#: Globals a payload gets a guarded stand-in for (the RestrictedUnpickler method named).
_STAND_INS: dict[int, str] = {
    id(builtins.getattr): "_getattr",
    id(dill_impl._get_attr): "_get_attr",
    id(builtins.setattr): "_setattr",
    id(dill_impl._import_module): "_import_module",
    id(dill_impl._eval_repr): "_eval_repr",
    id(dill_impl._create_type): "_create_type",
    id(dill_impl._create_function): "_create_function",
    id(dill_impl._create_cell): "_create_cell",
    id(dill_impl._create_namedtuple): "_create_namedtuple",
    id(dill_impl._load_type): "_load_type",
    id(types.new_class): "_new_class",
}
for _name, _stand_in in (("_setattr", "_setattr"), ("_delattr", "_delattr")):
    _shim = getattr(dill_impl, _name, None)  # present on old Pythons only
    if _shim is not None and id(_shim) not in _STAND_INS:
        _STAND_INS[id(_shim)] = _stand_in


def _eval_repr(text: str) -> Any:
    """dill rebuilds ``range``, ``Ellipsis`` and ``NotImplemented`` from their repr with
    ``eval``; here they are parsed instead, and nothing else is accepted."""
    if text == "Ellipsis":
        return Ellipsis
    if text == "NotImplemented":
        return NotImplemented
    match = _RANGE.match(text) if isinstance(text, str) else None
    if match is None:
        raise _refuse(f"eval of {str(text)[:60]!r}", "dill's repr evaluation is limited to "
                      "range, Ellipsis and NotImplemented")
    return range(*(int(g) for g in match.groups() if g is not None))


def restricted_loads(body: bytes) -> Any:
    """Unpickle ``body`` (already verified) with the checks above."""
    return RestrictedUnpickler(io.BytesIO(body)).load()
