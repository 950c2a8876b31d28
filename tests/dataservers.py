"""Real data servers on loopback for the staging tests: HTTP (with a broken route) and FTP.

Import the fixtures into a test module (``from tests.dataservers import http_files, ...``).
Each server runs in a thread of the test process and serves a temp directory; the cores
started by end-to-end tests reach them over 127.0.0.1 like any remote server.
"""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FTP_USER = "soaf"
FTP_PASSWORD = "s3cret-pw"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``/half/<name>`` promises the whole file, sends half, and hangs up;
    ``/slow/<name>`` sends it 1 KiB every 50 ms."""

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            data = (Path(self.directory) / self.path[len("/slow/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for start in range(0, len(data), 1024):
                    self.wfile.write(data[start:start + 1024])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client went away
            return
        if self.path.startswith("/half/"):
            data = (Path(self.directory) / self.path[len("/half/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpFiles:
    """An HTTP server over ``root`` in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FtpFiles:
    """A pyftpdlib server over ``root``: anonymous may read, ``FTP_USER`` may also write."""

    def __init__(self, root: Path) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import FTPServer

        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        self.root = root
        authorizer = DummyAuthorizer()
        authorizer.add_user(FTP_USER, FTP_PASSWORD, str(root), perm="elradfmw")
        authorizer.add_anonymous(str(root))
        handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
        self.server = FTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"timeout": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str, *, user: bool = False) -> str:
        auth = f"{FTP_USER}:{FTP_PASSWORD}@" if user else ""
        return f"ftp://{auth}127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self.server.close_all()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tree(root: Path) -> Path:
    """Files the servers serve: a.txt, b.bin (1 MiB), tree/x.txt, tree/sub/y.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("alpha beta gamma\n")
    (root / "b.bin").write_bytes(bytes(range(256)) * 4096)
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "x.txt").write_text("x\n")
    (root / "tree" / "sub" / "y.txt").write_text("y y\n")
    return root


@pytest.fixture
def served(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "served")


@pytest.fixture
def http_files(served: Path) -> Iterator[HttpFiles]:
    server = HttpFiles(served)
    yield server
    server.close()


@pytest.fixture
def ftp_files(served: Path) -> Iterator[FtpFiles]:
    server = FtpFiles(served)
    yield server
    server.close()
