"""The seed's loop: A (refine) -> B (evaluate) -> check -> back to A, until the check passes.

Each round, ``refine`` improves an estimate of sqrt(TARGET) (one Newton step, a black box
in examples/programs/refine.py) and ``evaluate`` measures its error; the check is plain
Python on the client. The next round's A takes the previous A's output file as input.

Run it next to a running core (``.venv/bin/python start_core.py`` in another terminal):

    .venv/bin/python examples/loop.py [--target 2] [--tolerance 1e-9]

and watch it from a third terminal with ``.venv/bin/soaf wait --all``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soaf import Client, Pipeline, ServiceParamTemplate, Step

START = Path(__file__).resolve().parent / "data" / "newton" / "start.txt"


def refine(estimate: str, target: float, delay: float) -> ServiceParamTemplate:
    """A: one step closer; ``estimate`` is a path or URL of a file holding a number."""
    return ServiceParamTemplate("refine", input_files={"estimate.txt": estimate},
                                output_files=["refined.txt"],
                                args={"target": target, "delay": delay}, watch_interval=0.1)


def evaluate(refined: Step, target: float, delay: float) -> ServiceParamTemplate:
    """B: how good is A's output? Built once A has succeeded, from A's output file."""
    return ServiceParamTemplate("evaluate", input_files={"estimate.txt": refined.output("refined.txt")},
                                output_files=["report.json"],
                                args={"target": target, "delay": delay}, watch_interval=0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--tolerance", type=float, default=1e-9)
    parser.add_argument("--max-rounds", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.8, help="seconds each program works")
    opts = parser.parse_args()

    estimate = str(START)
    with Client() as client, Pipeline(client) as p:
        for round_no in range(1, opts.max_rounds + 1):
            a = p.run(refine(estimate, opts.target, opts.delay))
            b = p.run(lambda a: evaluate(a, opts.target, opts.delay / 2), after=[a])
            print(f"round {round_no}: refine {a.service_id} submitted; evaluate follows it",
                  flush=True)
            report = b.wait()  # StepFailed (with the reason) if A or B failed
            error = report.fields["error"]
            print(f"round {round_no}: evaluate {b.service_id}: estimate "
                  f"{report.fields['estimate']!r}, error {error:.3g}", flush=True)
            if error < opts.tolerance:  # the check passes: done
                print(f"passed after {round_no} rounds: sqrt({opts.target:g}) ~ "
                      f"{report.fields['estimate']!r}")
                return 0
            estimate = a.output("refined.txt")  # back to A, with A's result as input
    print(f"no pass after {opts.max_rounds} rounds", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
