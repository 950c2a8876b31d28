"""Submit a wordcount service to the core and print its progress until it finishes.

Run it next to a running core: ``python examples/wordcount_client.py``.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from soaf import Client, ServiceParamTemplate

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class WordCountJob(ServiceParamTemplate):
    """A template subclass defined in __main__: its extra field travels with it."""

    requested_by: str = "example"


def main() -> int:
    job = WordCountJob(
        service="wordcount",
        input_files=[str(p) for p in sorted(DATA.glob("*.txt"))],
        args={"delay": 0.7},
        watch_interval=0.2,
        requested_by="the README",
    )
    with Client() as client:
        service_id = client.submit(job)
        print(f"submitted wordcount as {service_id}")
        for event in client.events(service_id, timeout=120):
            parts = []
            if "state" in event:
                parts.append(f"state={event['state']}")
            if "progress" in event:
                parts.append(f"progress={event['progress']:.0%}")
            if "message" in event:
                parts.append(f"message={event['message']!r}")
            if parts:
                print("  " + "  ".join(parts), flush=True)
        record = client.status(service_id)
    print(f"{record.state}: exit code {record.exit_code}, "
          f"{record.fields.get('total_words')} words in {len(job.input_files)} files "
          f"(node {record.node}, plugins {record.plugin_version})")
    return 0 if record.ok else 1


if __name__ == "__main__":
    sys.exit(main())
