"""Submit a digest service with URL inputs and an output target; print where results went.

Run it next to a running core: ``python examples/digest_client.py``. So that it needs
no network, it serves examples/data over HTTP itself (a stand-in for any web, FTP or
object store URL the core can reach); the results are copied to ./results/<service id>/.
"""

import functools
import http.server
import json
import sys
import threading
from pathlib import Path

from soaf import Client, ServiceParamTemplate

DATA = Path(__file__).resolve().parent / "data"


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    server = serve(DATA)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    job = ServiceParamTemplate(
        service="digest",
        input_files=[f"{base}/{p.name}" for p in sorted(DATA.glob("*.txt"))],
        output_files=["summary.json", "reports/*.json"],   # required: missing ones fail the run
        optional_outputs=["warnings.txt"],                   # taken when the program writes it
        output_target=str(Path("results").resolve() / "{service_id}"),
        args={"delay": 0.3},
        watch_interval=0.2,
    )
    with Client() as client:
        service_id = client.submit(job)
        print(f"submitted digest as {service_id}")
        record = client.wait(service_id, timeout=120)
    server.shutdown()
    print(f"{record.state} on {record.node}")
    for item in record.inputs:
        print(f"  in   {item['name']:<16} {item['size']:>7} bytes  from {item['source']}")
    for item in record.outputs:
        print(f"  out  {item['name']:<24} {item['size']:>5} bytes  sha256 {item['sha256'][:12]}"
              f"  -> {item.get('url')}")
    if not record.ok:
        print(f"error: {record.error}")
        return 1
    print("summary:", json.dumps(record.fields.get("summary")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
