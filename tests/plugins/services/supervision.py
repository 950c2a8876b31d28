"""Services for the supervision tests: timeouts, cancel, logs, exit status, retries."""

import sys
import time
from pathlib import Path

from soaf import ServiceProgramTemplate

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"


class PythonProgram(ServiceProgramTemplate):
    """Runs tests/programs/<script> with the core's Python; args['argv'] are its arguments."""

    script = ""

    def command(self):
        argv = [str(a) for a in self.template.args.get("argv", [])]
        return [sys.executable, str(PROGRAMS / self.script), *argv]


class Stubborn(PythonProgram):
    name = "stubborn"
    script = "stubborn.py"


class ShortTimeout(PythonProgram):
    """Sleeps (ignoring SIGTERM) past its service default timeout of 1 s."""

    name = "short-timeout"
    script = "stubborn.py"
    timeout = 1


class Forker(PythonProgram):
    name = "forker"
    script = "forker.py"


class Daemon(PythonProgram):
    name = "daemon"
    script = "daemon.py"


class DaemonHold(PythonProgram):
    """Leaves a daemon, then runs until the file ``release`` appears."""

    name = "daemon-hold"
    script = "daemon_hold.py"


class Chatty(PythonProgram):
    name = "chatty"
    script = "chatty.py"


class Lines(PythonProgram):
    name = "lines"
    script = "lines.py"


class MemHog(PythonProgram):
    name = "memhog"
    script = "memhog.py"
    max_memory_mb = 60


class Burner(PythonProgram):
    name = "burner"
    script = "burner.py"


class SlowBuild(ServiceProgramTemplate):
    """build() takes args['build_seconds'] (default 60) and leaves a mark when it starts."""

    name = "slowbuild"

    def build(self):
        (self.work_dir / "build-started").write_text(str(time.time()))
        time.sleep(float(self.template.args.get("build_seconds", 60)))
        (self.work_dir / "build-finished").write_text(str(time.time()))

    def command(self):
        return ["true"]


class ExitThreeIsFine(ServiceProgramTemplate):
    name = "exit3ok"
    success_codes = (0, 3)

    def command(self):
        return ["sh", "-c", "exit 3"]


class NoExec(ServiceProgramTemplate):
    """Its program is a script without execute permission."""

    name = "noexec"

    def build(self):
        (self.work_dir / "script.sh").write_text("#!/bin/sh\necho hello\n")
        (self.work_dir / "script.sh").chmod(0o644)

    def command(self):
        return ["./script.sh"]


class BadCwd(ServiceProgramTemplate):
    name = "badcwd"

    def working_dir(self):
        return self.work_dir / "no-such-subdir"

    def command(self):
        return ["true"]


class SelfSignal(ServiceProgramTemplate):
    name = "selfsignal"

    def command(self):
        return ["sh", "-c", "kill -USR1 $$; sleep 5"]


class Flaky(ServiceProgramTemplate):
    """Fails its first args['fail'] attempts (default 1); 2 retries, fresh dirs."""

    name = "flaky"
    program = "programs/flaky.sh"
    retries = 2
    retry_backoff = 0.3

    def command(self):
        return ["./flaky.sh", str(self.template.args.get("fail", 1))]


class FlakyReuse(Flaky):
    name = "flaky-reuse"
    work_dir_policy = "reuse"


class FlakyNoRetry(Flaky):
    """Same program, no retries unless the template asks."""

    name = "flaky-noretry"
    retries = 0


class Callbacks(ServiceProgramTemplate):
    """Sleeps args['seconds'] (default 1.5) for the misbehaving-callback handlers."""

    name = "cb-raise"

    def command(self):
        return ["sleep", str(self.template.args.get("seconds", 1.5))]


class CallbackAfterRaise(Callbacks):
    name = "cb-after-raise"


class CallbackHang(Callbacks):
    name = "cb-hang"


class CallbackAfterHang(Callbacks):
    name = "cb-after-hang"


class CallbackBeforeHang(Callbacks):
    name = "cb-before-hang"


class FlakyRetriesTimeoutsOnly(Flaky):
    """Retries, but only timeouts: its exit-code failures are final."""

    name = "flaky-timeouts-only"
    retry_on = frozenset({"timeout"})
