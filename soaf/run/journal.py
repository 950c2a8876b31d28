"""The journal of one service run: which lifecycle steps are done, so that a core that
restarts after a crash resumes a run instead of guessing.

The steps are ``built``, ``prepared``, ``running`` (with the program's identity: pid,
start time, process group), ``exited`` (with how it ended) and ``collected``
(``after_watch_callback`` has returned; with the final values). The journal is kept in
two places:

* in Redis, as the ``journal`` field of the service's record, written through the state
  writer with the other changes of the step, so it is fenced by (attempt, seq) like
  them; ``collected`` travels in the same write as the final state;
* on the core's disk, in ``<work root>/.soaf-runs/<node>/<service id>.<attempt>.json``,
  appended synchronously (one JSON line, one ``write``) at the two steps a crash must not
  lose: ``running`` (who the program is) and ``collected`` (the callback has run). A
  step's line holds the whole journal; the lines noting a plugin call under way
  (``calling``) hold only what changed, because a trivial service makes eight of them and
  each must cost one small ``write`` on a file the run keeps open. The journal is the
  last whole line with the later changes applied in order, so a line torn by a crash
  only loses that step. This copy
  survives what the Redis copy may not: a crash while Redis was away and the writer
  still held the changes. It is removed once the final state is in Redis.

The shim's exit file lives next to it, one per attempt, at a path known in advance
(``exit_path``): a program spawned just before a crash, before its journal was saved,
is still found by that path on its command line.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from soaf.process.identity import ProcIdentity
from soaf.protocol.state import encode_json

log = logging.getLogger(__name__)

#: Directory under the work root that holds every node's run journals and exit files.
RUNS_DIR = ".soaf-runs"
STEPS = ("built", "prepared", "running", "exited", "collected")
#: Plugin calls noted on disk while under way: a core that dies inside one twice in a row
#: does not call it a third time (two small appends per call, on the work root's disk).
JOURNALED_CALLS = ("before_watch_callback", "file_change_callback", "after_watch_callback")


def needs_note(name: str, handler: Any) -> bool:
    """Whether plugin call ``name`` is noted on disk while under way: one of the
    JOURNALED_CALLS, made to the plugin's own code. soaf's default callbacks (a handler
    that keeps them) cannot be what kills a core, and a short service makes four calls."""
    return name in JOURNALED_CALLS and (handler is None or _plugin_code(type(handler), name))


def _plugin_code(cls: type, name: str) -> bool:
    module = getattr(getattr(cls, name, None), "__module__", None) or ""
    return not module.startswith("soaf.")
#: A journal file longer than this (appended to by every callback of a long run) is
#: replaced by its last line, atomically.
MAX_JOURNAL_BYTES = 64 * 1024


def runs_dir(work_root: Path, node: str) -> Path:
    return Path(work_root) / RUNS_DIR / node


# (The two below are built as one string, then one Path: every attempt needs both.)
def exit_path(work_root: Path, node: str, service_id: str, attempt: int) -> Path:
    """Where the shim of this attempt writes the exit status."""
    return Path(f"{work_root}/{RUNS_DIR}/{node}/{service_id}.{attempt}.exit")


def journal_path(work_root: Path, node: str, service_id: str, attempt: int) -> Path:
    return Path(f"{work_root}/{RUNS_DIR}/{node}/{service_id}.{attempt}.json")


@dataclass
class Journal:
    """What is known about one attempt of one service."""

    service_id: str
    attempt: int
    node: str
    steps: list[str] = field(default_factory=list)
    work_dir: str | None = None
    exit_file: str | None = None
    process: dict[str, Any] | None = None  # ProcIdentity.to_dict()
    shimmed: bool = False
    running_at: float | None = None
    exit: dict[str, Any] | None = None  # returncode (None: unknown), wall_time ...
    final: dict[str, Any] | None = None  # the final values, once collected
    core: dict[str, Any] | None = None  # ProcIdentity of the core process that ran it
    #: The journaled plugin call under way (JOURNALED_CALLS), and the calls the cores that
    #: ran this attempt died in, in a row: a core that recovers it acts on them.
    in_call: str | None = None
    died_in: list[str] = field(default_factory=list)
    #: The token in the environment of the run's processes (soaf.process.lineage), on
    #: disk only: a restarted core ends what the program left, even if not its children.
    run_token: str | None = None

    @property
    def step(self) -> str | None:
        return self.steps[-1] if self.steps else None

    @property
    def identity(self) -> ProcIdentity | None:
        return ProcIdentity.from_dict(self.process) if self.process else None

    def core_gone(self) -> bool:
        """True if the core process that ran this attempt is verifiably dead (it ran on
        this machine, and its pid now names no process or another one)."""
        core = ProcIdentity.from_dict(self.core) if self.core else None
        return core is not None and core.local and not core.alive()

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy would cost more than the whole step.
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> Journal | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except TypeError:
            return None

    @classmethod
    def from_record(cls, data: Any, *, exit_file: Path) -> Journal | None:
        """The journal as a record in Redis holds it, with only what may be believed of
        it: the steps and how the program ended. Who the program is (``process``) is never
        taken from Redis, which others can write to; it is found again through this
        attempt's own ``exit_file``, a path computed here (see ``exit_path``)."""
        if not isinstance(data, dict):
            return None
        steps = data.get("steps")
        running_at = data.get("running_at")
        try:
            journal = cls(service_id=str(data["service_id"]) if "service_id" in data else "",
                          attempt=int(data["attempt"]), node=str(data.get("node", "")),
                          steps=[s for s in steps if s in STEPS] if isinstance(steps, list)
                          else [],
                          exit_file=str(exit_file), shimmed=data.get("shimmed") is True,
                          running_at=float(running_at) if isinstance(running_at, (int, float))
                          else None)
        except (KeyError, TypeError, ValueError):
            return None
        exit_ = data.get("exit")
        if isinstance(exit_, dict) and isinstance(exit_.get("returncode"), (int, type(None))):
            journal.exit = {"returncode": exit_.get("returncode")}
        return journal

    def shared(self) -> dict[str, Any]:
        """The part written to Redis: the steps and what identifies the program and its
        end (the work dir and the final values are in the record already)."""
        out: dict[str, Any] = {"attempt": self.attempt, "node": self.node,
                               "steps": list(self.steps)}
        for name in ("process", "shimmed", "running_at", "exit"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out


_FIELDS = tuple(f.name for f in fields(Journal))
#: The fields a line of changes (``RunJournal.calling``) may set.
_CHANGES = frozenset({"in_call", "died_in"})


def load(path: Path) -> Journal | None:
    """The journal as of its last whole line and the changes after it, or None. A line
    that does not parse (torn by a crash) is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return None
    merged: dict[str, Any] | None = None
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        if "service_id" in data:  # a whole journal: what came before no longer counts
            merged = data
        elif merged is not None:
            merged.update((k, v) for k, v in data.items() if k in _CHANGES)
    return Journal.from_dict(merged) if merged is not None else None


def local_journals(work_root: Path, node: str) -> list[tuple[Path, Journal]]:
    """Every run journal a node left on this machine."""
    out: list[tuple[Path, Journal]] = []
    base = runs_dir(work_root, node)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        if name.endswith(".json"):
            journal = load(base / name)
            if journal is not None:
                out.append((base / name, journal))
    return out


def remove_files(path: Path, journal: Journal | None) -> None:
    """Remove a journal file and its attempt's exit file; missing ones are fine."""
    for p in (path, journal.exit_file if journal and journal.exit_file else None):
        if p is not None:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove %s: %s", p, e)


_SELF: dict[str, Any] = {}


def _this_core() -> dict[str, Any] | None:
    if _SELF.get("pid") != os.getpid():
        me = ProcIdentity.of(os.getpid())
        _SELF.clear()
        _SELF.update(me.to_dict() if me else {"pid": os.getpid()})
    return dict(_SELF) if "start_time" in _SELF else None


class RunJournal:
    """The journal of the run in progress: ``step()`` records a step and returns the values
    to write to the record; steps from ``prepared`` on are saved to disk at once."""

    def __init__(self, work_root: Path, node: str, service_id: str, attempt: int,
                 work_dir: Path | None = None, *, journal: Journal | None = None) -> None:
        self.path = journal_path(work_root, node, service_id, attempt)
        self.data = journal or Journal(
            service_id=service_id, attempt=attempt, node=node,
            work_dir=str(work_dir) if work_dir else None,
            exit_file=str(exit_path(work_root, node, service_id, attempt)),
            core=_this_core(),
        )
        # Whoever goes on with a journal owns it from now: its node, and its core process
        # (so a later takeover checks this core's life, not the dead one's).
        self.data.node = node
        self.data.core = _this_core()
        self.collected = False
        self._written = 0  # bytes appended by this core (a compaction starts it again)
        #: The journal file, open for appending from the first save until ``remove()``
        #: (unbuffered: each line is one ``write``; closed with the object otherwise).
        self._file: io.FileIO | None = None
        self._exit_file: tuple[str, Path] | None = None  # (its name, its Path), once asked

    @property
    def exit_file(self) -> Path:
        name = self.data.exit_file
        assert name
        if self._exit_file is None or self._exit_file[0] != name:
            self._exit_file = (name, Path(name))
        return self._exit_file[1]

    def step(self, name: str, *, save: bool = False, **info: Any) -> dict[str, Any]:
        """Record step ``name`` (with ``info`` fields); returns ``{"journal": ...}``.

        With ``save`` the local file is written first; an OSError (disk full, not
        writable) is raised to the caller.
        """
        assert name in STEPS, name
        if name not in self.data.steps:
            self.data.steps.append(name)
        for key, value in info.items():
            setattr(self.data, key, value)
        if save:
            self.save()
        return {"journal": self.data.shared()}

    def try_step(self, name: str, **info: Any) -> dict[str, Any]:
        """``step(save=True)`` that logs instead of raising: once a program runs, a journal
        that cannot be saved must not stop the run (Redis still gets the step)."""
        try:
            return self.step(name, save=True, **info)
        except OSError as e:
            log.warning("service %s: cannot save its journal (%s)", self.data.service_id, e)
            return {"journal": self.data.shared()}

    def calling(self, name: str, *, returned: bool = False) -> None:
        """Note on disk that plugin call ``name`` is under way, or that it ``returned``
        (then a core's deaths in it no longer count as in a row; other calls that return
        in between, such as the before_watch_callback of a re-adopted program, do not
        break the row). A core that dies inside the call leaves this behind."""
        self.data.in_call = None if returned else name
        line = _RETURNED if returned else _CALLING.get(name)
        if returned and name in self.data.died_in:
            self.data.died_in = []
            line = _RETURNED_AFTER_DEATHS
        try:
            if self._written == 0 or self._written > MAX_JOURNAL_BYTES:
                self.save()  # a whole journal first (and to compact a long one)
            else:
                self._append(line or json.dumps({"in_call": name}) + "\n")
        except OSError as e:
            log.warning("service %s: cannot save its journal (%s)", self.data.service_id, e)

    def noting(self, name: str) -> _Calling:
        """A context that notes on disk that plugin call ``name`` is under way (``calling``)."""
        return _Calling(self, name)

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """The journal values that go with the final state (``collected`` if the
        after-watch callback returned), saved to disk first."""
        if self.collected:
            return self.try_step("collected", final=final)
        return {"journal": self.data.shared()}

    def save(self) -> None:
        """Append the whole journal as one line."""
        line = encode_json(self.data.to_dict()) + "\n"
        if self._written > MAX_JOURNAL_BYTES:  # a long run's callbacks: start afresh
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(line)
            os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file
            self._close()  # it names the old file now
            self._written = len(line)
            return
        self._append(line)

    def _append(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        try:
            self._open().write(data)  # unbuffered: one write(2) of the whole line
        except ValueError:  # closed by another thread's compaction: append to the new file
            self._file = None
            self._open().write(data)
        self._written += len(data)

    def _open(self) -> io.FileIO:
        if self._file is None:
            try:
                fd = os.open(self.path, _APPEND, 0o666)
            except FileNotFoundError:  # the first run of this node here (or a wiped dir)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, _APPEND, 0o666)
            # O_APPEND puts every write at the end; FileIO's own "a" mode would also seek
            # there first, one system call more on each run's path.
            self._file = io.FileIO(fd, "w")
        return self._file

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def remove(self) -> None:
        """Remove this attempt's journal and exit file."""
        self._close()
        remove_files(self.path, self.data)


class _Calling:
    """``RunJournal.noting``: ``calling`` before the block, ``calling(returned=True)`` after
    (a plain class: the callbacks of every service pass through it)."""

    __slots__ = ("journal", "name")

    def __init__(self, journal: RunJournal, name: str) -> None:
        self.journal = journal
        self.name = name

    def __enter__(self) -> None:
        self.journal.calling(self.name)

    def __exit__(self, *exc: object) -> None:
        self.journal.calling(self.name, returned=True)


_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC

#: The lines ``calling`` appends, encoded once (each is what json.dumps makes of the change).
_CALLING = {name: (json.dumps({"in_call": name}) + "\n").encode() for name in JOURNALED_CALLS}
_RETURNED = (json.dumps({"in_call": None}) + "\n").encode()
_RETURNED_AFTER_DEATHS = (json.dumps({"in_call": None, "died_in": []}) + "\n").encode()
