"""The dashboard in a real browser: the OS's headless chromium, driven by Playwright.

Screenshots of every page go to tests/artifacts/ (git-ignored), to be looked at.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from soaf import ServiceParamTemplate
from tests.e2e.dashboard import TOKEN, dashboard  # noqa: F401 - fixture

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
XSS = '<img src=x onerror="document.title=\'pwned\'">'
#: Generous: the machine is shared and may be loaded.
WAIT_MS = 30_000
expect.set_options(timeout=WAIT_MS)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium: install the OS package (apt-get install -y chromium); "
                    ".ci/dev.py test installs it when it runs as root")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"
            and not re.search(r"status of 40[13]", m.text) else None)  # refusals are asked for
    yield page
    context.close()
    assert dialogs == [], f"a page opened dialogs: {dialogs}"
    assert errors == [], f"the pages logged errors: {errors}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def progress_of(page: Page, selector: str) -> float:
    return float(page.locator(selector).get_attribute("value") or 0)


def test_watch_a_service_follow_its_log_and_cancel_it_with_the_token(
        start_core, dashboard, client, page):
    start_core()
    sid = client.submit(ServiceParamTemplate(
        "show", args={"n": 120, "delay": 0.25, "message": "crunching numbers", "label": "demo"},
        watch_interval=0.1))
    done = client.submit(ServiceParamTemplate(
        "show", args={"n": 2, "delay": 0.01, "message": "a finished one"},
        output_files=["result.txt"], watch_interval=0.05))
    client.wait(done, timeout=30)

    page.goto(dashboard.url + "/")
    expect(page.locator(".node h2")).to_contain_text("core-a")
    shot(page, "fleet")

    # 1. The services page: the running service's bar moves, live, with no reload.
    page.goto(dashboard.url + "/services")
    row = f'tr[data-id="{sid}"]'
    expect(page.locator(f"{row} [data-field=state]")).to_have_text("running")
    expect(page.locator("#live-status")).to_have_text("live")
    first = progress_of(page, f"{row} progress")
    page.wait_for_function(
        "([sel, v]) => Number(document.querySelector(sel).value) > v",
        arg=[f"{row} progress", first], timeout=WAIT_MS)
    expect(page.locator(f"{row} [data-field=eta]")).to_contain_text("left")
    client.submit(ServiceParamTemplate("sleep", args={"seconds": 0.1}))
    expect(page.locator("#fresh")).to_contain_text("1 new service")
    shot(page, "services")

    # 2. The service's page: log lines arrive while it runs.
    page.click(f'{row} a[href="/services/{sid}"]')
    expect(page.locator("#service h1")).to_contain_text(sid)
    lines = page.locator("#log span").count()
    page.wait_for_function("n => document.querySelectorAll('#log span').length > n",
                           arg=lines, timeout=WAIT_MS)
    expect(page.locator("#log")).to_contain_text("step")
    assert page.locator("#cancel").count() == 0  # not signed in: no action at all
    shot(page, "service")

    # 3. Signed in with the token, cancel it and see it cancelled.
    page.goto(dashboard.url + "/login")
    shot(page, "login")
    page.fill("input[name=token]", TOKEN)
    page.click("form.login button")
    expect(page.locator("#note")).to_contain_text("signed in")
    page.goto(f"{dashboard.url}/services/{sid}")
    page.click("#cancel")
    expect(page.locator("#note")).to_contain_text("cancel")
    expect(page.locator("#service > h1 [data-field=state]")).to_have_text("cancelled")
    assert client.wait(sid, timeout=30).state == "cancelled"
    shot(page, "service-cancelled")

    page.goto(f"{dashboard.url}/services/{done}")
    expect(page.locator("code.hash")).to_have_count(1)  # outputs with their checksums
    shot(page, "service-finished")
    page.goto(dashboard.url + "/plugins")
    expect(page.locator("#reload")).to_be_visible()
    shot(page, "plugins")


def test_without_the_token_there_is_no_way_to_cancel(start_core, dashboard, client, page):
    start_core()
    sid = client.submit(ServiceParamTemplate("sleep", args={"seconds": 60}))
    page.goto(f"{dashboard.url}/services/{sid}")
    expect(page.locator("#service > h1 [data-field=state]")).to_have_text("running")
    assert page.locator("#cancel").count() == 0
    assert page.locator("form[action$='/cancel']").count() == 0
    answers = page.evaluate("""async (sid) => {
        const form = await fetch(`/services/${sid}/cancel`, {method: 'POST',
            headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'csrf=x'});
        const api = await fetch(`/api/services/${sid}/cancel`, {method: 'POST'});
        const forged = await fetch(`/api/services/${sid}/cancel`, {method: 'POST',
            headers: {'Authorization': 'Bearer not-the-token'}});
        return [form.status, api.status, forged.status];
    }""", sid)
    assert answers == [403, 401, 401]
    assert client.status(sid).state == "running"
    shot(page, "service-read-only")
    client.cancel(sid)


def test_a_handler_message_with_markup_runs_nothing(start_core, dashboard, client, page):
    start_core()
    sid = client.submit(ServiceParamTemplate(
        "show", args={"n": 1, "delay": 0.01, "message": XSS, "label": "<b>bold</b>"},
        watch_interval=0.05))
    client.wait(sid, timeout=30)
    for path in (f"/services/{sid}", "/services"):
        page.goto(dashboard.url + path)
        expect(page.locator("[data-field=message]").first).to_have_text(XSS)
        assert page.locator("img").count() == 0
        assert page.locator("b", has_text="bold").count() == 0
        assert page.title() != "pwned" and "pwned" not in page.title()
    expect(page.locator("table.services")).to_be_visible()
    page.goto(f"{dashboard.url}/services/{sid}")
    expect(page.locator("table.kv").first).to_contain_text("<b>bold</b>")
    shot(page, "service-escaped")
