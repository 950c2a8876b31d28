"""A pipeline that outlives its client: kill this script, run it again, nothing runs twice.

``Pipeline(client, name=...)`` records each step in Redis before submitting it. Run
the script, stop it hard while a step runs (kill -9, a closed laptop lid), then run it
again with the same name: the steps that succeeded or still run are attached to, not
submitted again; only what never started (or failed) is submitted. Ctrl-C is different:
it cancels the running steps, as for any pipeline.

    .venv/bin/python examples/resumable.py --name nightly-42     # kill it, run it again
    .venv/bin/soaf pipelines                                      # each step's state

Next to a running core (``.venv/bin/python start_core.py``), or in one command:
``python3 .ci/dev.py demo examples/resumable.py``. Once a run has finished, running it
again under the same name attaches to every step and runs nothing; a new ``--name``
starts afresh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diamond import count, merge, tokenize  # the diamond's steps (examples/diamond.py)

from soaf import Client, Pipeline, StepFailed

DATA = Path(__file__).resolve().parent / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="resumable-demo", help="the pipeline's name")
    parser.add_argument("--text", default=str(DATA / "alpha.txt"))
    parser.add_argument("--delay", type=float, default=2.0, help="seconds each program works")
    opts = parser.parse_args()

    with Client() as client, Pipeline(client, name=opts.name) as p:
        steps = [p.run(tokenize(opts.text, opts.delay), name="tokenize")]
        steps.append(p.run(lambda t: count(t, opts.delay), after=steps[-1:], name="count"))
        steps.append(p.run(lambda c: merge(c, delay=opts.delay), after=steps[-1:], name="merge"))
        for step in steps:
            try:
                step.wait()
            except StepFailed as failure:
                print(f"pipeline {opts.name} failed: {failure}\n{p.report()}", file=sys.stderr)
                return 1
            how = "attached to" if step.attached else "submitted"
            print(f"{step.name:<9} {how:<11} {step.service_id} {step.state}", flush=True)
        top = steps[-1].record.fields.get("top") if steps[-1].record else None
        print(f"top words: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
