"""The dashboard's HTTP API and pages against a real core and a real ``soaf dashboard``."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from soaf import ServiceParamTemplate
from tests.conftest import wait_until
from tests.e2e.dashboard import TOKEN, api, bearer, dashboard  # noqa: F401 - fixtures

XSS = '<img src=x onerror="document.title=\'pwned\'">'


def sse(api: httpx.Client, path: str) -> list[tuple[str, dict]]:
    """Every (event, data) of a server-sent-event stream, until its 'end' event."""
    found: list[tuple[str, dict]] = []
    event = "message"
    with api.stream("GET", path) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                found.append((event, json.loads(line.split(":", 1)[1])))
                if event == "end":
                    return found
    return found


def test_submit_as_json_then_read_everything_back(start_core, api, client):
    start_core()
    sent = {"service": "steps", "args": {"n": 2, "delay": 0.05}, "watch_interval": 0.05,
            "color": "red"}  # an extra field, as a subclass would add
    reply = api.post("/api/submit", json=sent, headers=bearer())
    assert reply.status_code == 201, reply.text
    sid = reply.json()["service_id"]
    events = sse(api, f"/api/services/{sid}/events")
    states = [data.get("state") for name, data in events if name == "event"]
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert events[-1][0] == "end"

    record = api.get(f"/api/services/{sid}").json()
    assert record["state"] == "succeeded" and record["service"] == "steps"
    assert record["fields"]["extra_before"] == "red"  # the plugin saw the extra field
    lines = api.get(f"/api/services/{sid}/logs").json()["lines"]
    assert [x["text"] for x in lines if x["stream"] == "stdout"] == ["step 1", "step 2"]
    listed = api.get("/api/services", params={"service": "steps"}).json()
    assert [r["service_id"] for r in listed["services"]] == [sid]
    assert api.get("/api/nodes").json()[0]["node"] == "core-a"
    assert "steps" in api.get("/api/plugins").json()["core-a"]["services"]
    spec = api.get("/api/openapi.json").json()
    assert {"/api/submit", "/api/services", "/api/services/{service_id}/events"} <= set(spec["paths"])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
def test_actions_need_the_bearer_token(api, client, headers):
    reply = api.post("/api/submit", json={"service": "steps"}, headers=headers)
    assert reply.status_code == 401
    assert "Authorization: Bearer" in reply.json()["detail"]
    assert api.post("/api/reload", headers=headers).status_code == 401
    assert client.list() == []  # nothing was submitted


@pytest.mark.parametrize("body, field", [
    ({"args": {}}, "service"),
    ({"service": "steps", "timeout": -5}, "timeout"),
    ({"service": "steps", "__class__": "x"}, "__class__"),
    ({"service": "steps", "validate": 1}, "validate"),
    ({"service": "steps", "signed_at": 1.0}, "signed_at"),
    (["steps"], "template"),
])
def test_a_bad_template_is_refused_naming_the_field(api, body, field):
    reply = api.post("/api/submit", json=body, headers=bearer())
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"].startswith(f"{field}:")


def test_duplicates_unknown_ids_cancel_and_resubmit(start_core, api, client):
    sid = api.post("/api/submit", json={"service": "sleep", "service_id": "api-one"},
                   headers=bearer()).json()["service_id"]
    assert sid == "api-one"
    again = api.post("/api/submit", json={"service": "sleep", "service_id": "api-one"},
                     headers=bearer())
    assert again.status_code == 409 and "already submitted" in again.json()["detail"]
    assert api.get("/api/services/nope").status_code == 404
    assert api.get("/api/services/nope/events").status_code == 404
    assert api.post("/api/services/api-one/cancel").status_code == 401
    cancelled = api.post("/api/services/api-one/cancel", headers=bearer())
    assert cancelled.json()["result"].startswith("cancelled")
    start_core()
    new = api.post("/api/services/api-one/resubmit", headers=bearer())
    assert new.status_code == 201
    wait_until(lambda: client.status(new.json()["service_id"]).state == "running", 20)
    assert client.status(new.json()["service_id"]).service == "sleep"
    client.cancel(new.json()["service_id"])


def test_what_a_handler_or_a_user_chose_is_escaped_on_every_page(start_core, api, client):
    start_core()
    sid = client.submit(ServiceParamTemplate(
        "show", args={"n": 1, "delay": 0.01, "message": XSS, "label": "<script>x()</script>"},
        output_files=["result.txt"], watch_interval=0.05))
    assert client.wait(sid, timeout=30).message == XSS
    for path in (f"/services/{sid}", "/services"):
        html = api.get(path).text
        assert "&lt;img src=x onerror=" in html, path
        assert "<img src=x" not in html and "<script>x()" not in html, path
    assert "&lt;script&gt;x()&lt;/script&gt;" in api.get(f"/services/{sid}").text
    page = api.get(f"/services/{sid}")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert re.search(r"<code class=\"hash\">[0-9a-f]{64}</code>", page.text)  # output checksum


def test_page_actions_need_a_session_and_its_csrf_token(start_core, api, client):
    sid = client.submit(ServiceParamTemplate("sleep"))
    assert api.post(f"/services/{sid}/cancel", data={"csrf": "x"}).status_code == 403
    assert api.post("/login", data={"token": "wrong"}).status_code == 403
    assert api.post("/login", data={"token": TOKEN}).status_code == 303
    assert "soaf_session" in api.cookies
    page = api.get(f"/services/{sid}").text
    assert 'id="cancel"' in page
    assert api.post(f"/services/{sid}/cancel", data={"csrf": "forged"}).status_code == 403
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    done = api.post(f"/services/{sid}/cancel", data={"csrf": csrf})
    assert done.status_code == 303
    assert client.status(sid).state == "cancelled"
    api.cookies.clear()
    assert 'id="cancel"' not in api.get(f"/services/{sid}").text


def test_the_plugins_page_shows_the_last_load_error_with_file_and_line(
        start_core, api, client, plugin_dir):
    start_core()
    (plugin_dir / "handlers" / "broken_now.py").write_text("x = 1\nclass Broken(:\n    pass\n")
    client.reload()
    wait_until(lambda: client.plugins()["core-a"]["error"], 20)
    html = api.get("/plugins").text
    assert re.search(r"<code class=\"where\">[^<]*handlers/broken_now\.py:2</code>", html)
    assert api.get("/api/plugins").json()["core-a"]["error_line"] == 2
    fleet = api.get("/").text
    assert "core-a" in fleet and "1 core alive" in fleet


def test_live_updates_reach_every_open_stream(start_core, api, client):
    start_core()
    seen: list[set[str]] = [set(), set()]
    streams = [api.stream("GET", "/api/live") for _ in seen]
    responses = [s.__enter__() for s in streams]
    try:
        sid = client.submit(ServiceParamTemplate("steps", args={"n": 3, "delay": 0.1}))
        for found, response in zip(seen, responses):
            event = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "services":
                    rows = json.loads(line.split(":", 1)[1])
                    found.update(r["state"] for r in rows if r["service_id"] == sid)
                    if "succeeded" in found:
                        break
        assert all("succeeded" in found for found in seen), seen
    finally:
        for s in streams:
            s.__exit__(None, None, None)


def test_without_a_configured_token_one_is_made_printed_and_required(core_env, tmp_path):
    from tests.e2e.dashboard import DashboardProcess

    env = {k: v for k, v in core_env.items() if k != "SOAF_DASHBOARD_TOKEN"}
    process = DashboardProcess(env, tmp_path / "dashboard.log")
    try:
        found = re.search(r"this run's token: (\S+)", process.log())
        assert found, process.log()
        with httpx.Client(base_url=process.url, timeout=20) as http:
            refused = http.post("/api/submit", json={"service": "steps"}, headers=bearer())
            assert refused.status_code == 401  # the test token is not this run's
            made = http.post("/api/submit", json={"service": "steps"},
                             headers=bearer(found.group(1)))
            assert made.status_code == 201
    finally:
        process.stop()


def test_a_dashboard_without_the_cores_key_reads_but_cannot_sign(core_env, tmp_path):
    from tests.e2e.dashboard import DashboardProcess

    env = {k: v for k, v in core_env.items() if k != "SOAF_SECRET"}
    env.update(SOAF_DASHBOARD_TOKEN=TOKEN, SOAF_STATE_DIR=str(tmp_path / "empty"))
    process = DashboardProcess(env, tmp_path / "dashboard.log")
    try:
        assert "no key to sign with" in process.log()
        with httpx.Client(base_url=process.url, timeout=20) as http:
            assert http.get("/api/services").status_code == 200
            reply = http.post("/api/submit", json={"service": "steps"}, headers=bearer())
            assert reply.status_code == 503 and "SOAF_SECRET" in reply.json()["detail"]
    finally:
        process.stop()


def test_reload_through_the_api_and_the_plugins_page(start_core, api, client):
    start_core()
    wait_until(lambda: "core-a" in client.plugins(), 20)
    number = client.plugins()["core-a"]["number"]
    assert api.post("/api/reload", headers=bearer()).status_code == 200
    wait_until(lambda: client.plugins()["core-a"]["number"] == number + 1, 20)
    api.post("/login", data={"token": TOKEN})
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', api.get("/plugins").text).group(1)
    assert api.post("/plugins/reload", data={"csrf": "forged"}).status_code == 403
    assert api.post("/plugins/reload", data={"csrf": csrf}).status_code == 303
    wait_until(lambda: client.plugins()["core-a"]["number"] == number + 2, 20)


def test_records_and_heartbeats_edited_by_hand_still_render(api, client):
    r, keys = client.redis, client.keys
    r.hset(keys.service("odd"), mapping={
        "state": '"<b>odd</b>"', "progress": '"lots"', "attempts": '"x"', "outputs": "5",
        "inputs": '[1, "a", {"name": "<i>n</i>"}]', "command": "7", "submitted_at": '"soon"',
        "running_at": "[]", "f:weird": "{not json"})
    r.zadd(keys.services, {"odd": 1})
    r.set(keys.node("bad"), "not json")
    r.set(keys.node("list"), "[1, 2]")
    r.set(keys.node("odd"), json.dumps({"node": "odd", "running": "many", "max_services": 0,
                                        "labels": 5, "memory_mb": "x"}))
    r.sadd(keys.nodes, "bad", "list", "odd")
    r.hset(keys.plugins, mapping={"bad": "{", "odd": json.dumps({"version": "<v>"})})
    for path in ("/", "/services", "/services?state=running", "/services/odd", "/plugins"):
        page = api.get(path)
        assert page.status_code == 200, (path, page.text[-2000:])
        assert "<b>odd</b>" not in page.text and "<i>n</i>" not in page.text
    assert [n["node"] for n in api.get("/api/nodes").json()] == ["odd"]
    assert list(api.get("/api/plugins").json()) == ["odd"]
    assert api.get("/api/services/odd").json()["fields"]["weird"] == "{not json"
