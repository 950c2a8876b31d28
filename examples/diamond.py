"""The seed's diamond: A -> B and C -> D run side by side; E starts once B and D are done.

A and C tokenize two texts, B and D count their words, E merges both counts and lists
the most frequent words. The programs (examples/programs/) know nothing of soaf; the
outputs of one step reach the next as input files.

Run it next to a running core (``.venv/bin/python start_core.py`` in another terminal):

    .venv/bin/python examples/diamond.py

and watch it from a third terminal with ``.venv/bin/soaf wait --all``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soaf import Client, Pipeline, ServiceParamTemplate, Step, StepFailed

DATA = Path(__file__).resolve().parent / "data"


def tokenize(text: str, delay: float) -> ServiceParamTemplate:
    return ServiceParamTemplate("tokenize", input_files={"text.txt": text},
                                output_files=["words.txt"], args={"delay": delay},
                                watch_interval=0.1)


def count(words: Step, delay: float) -> ServiceParamTemplate:
    return ServiceParamTemplate("count", input_files={"words.txt": words.output("words.txt")},
                                output_files=["counts.json"], args={"delay": delay},
                                watch_interval=0.1)


def merge(*counted: Step, delay: float) -> ServiceParamTemplate:
    inputs = {f"counts-{i}.json": step.output("counts.json") for i, step in enumerate(counted)}
    return ServiceParamTemplate("merge", input_files=inputs,
                                output_files=["merged.json", "top.txt"],
                                args={"delay": delay, "top": 5}, watch_interval=0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--left", default=str(DATA / "alpha.txt"))
    parser.add_argument("--right", default=str(DATA / "beta.txt"))
    parser.add_argument("--delay", type=float, default=1.0, help="seconds each program works")
    opts = parser.parse_args()

    with Client() as client, Pipeline(client) as p:
        a = p.run(tokenize(opts.left, opts.delay), name="A")
        c = p.run(tokenize(opts.right, opts.delay * 2), name="C")  # the slow branch
        b = p.run(lambda a: count(a, opts.delay), after=[a], name="B")
        d = p.run(lambda c: count(c, opts.delay), after=[c], name="D")
        e = p.run(lambda b, d: merge(b, d, delay=opts.delay), after=[b, d], name="E")
        print(f"A {a.service_id} and C {c.service_id} submitted; B, D and E follow", flush=True)
        try:
            result = e.wait()
        except StepFailed as failure:
            p.cancel()  # stop the branch that is still running
            print(f"the diamond failed: {failure}\n{p.report()}", file=sys.stderr)
            return 1
        for step in (a, b, c, d, e):
            print(f"{step.name} {step.template.service:<8} {step.service_id} {step.state}")
        print("top words: " + ", ".join(f"{w} ({n})" for w, n in result.fields["top"]))
        print(f"merged counts: {e.output('merged.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
