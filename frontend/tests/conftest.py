"""Fixtures for the dashboard tests: static files, seeded data, a real server and a real browser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.harness import ROOT, ConsoleServer

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "correct horse battery"  # the conftest personas' password
OWN_STATIC = ("frontend/app.css", "frontend/app.js", "frontend/device.js", "frontend/plotly.min.js")


@pytest.fixture(scope="session", autouse=True)
def collected_static():
    """Pages use the manifest storage: collect our files if the manifest lacks them."""
    manifest = Path(settings.STATIC_ROOT) / "staticfiles.json"
    try:
        paths = json.loads(manifest.read_text())["paths"]
    except (OSError, ValueError, KeyError):
        paths = {}
    if not all(name in paths for name in OWN_STATIC):
        from django.core.management import call_command

        call_command("collectstatic", "--noinput", verbosity=0)


@pytest.fixture
def clean_series():
    yield
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE telemetry_point, telemetry_rollup_1m, telemetry_rollup_1h, telemetry_late")


@pytest.fixture
def console_server(transactional_db, clean_series):
    server = ConsoleServer(connection.settings_dict).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def browser():
    # A missing browser is a failure, not a skip: these tests are the dashboard's proof.
    assert CHROMIUM.exists(), "Debian's chromium is required: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread; Django's guard would
    # then refuse the tests' own (synchronous) database calls. Lifted only while the browser lives.
    # Package scope: the loop must be gone before other packages' tests call asyncio.run().
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield chromium
        chromium.close()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page_for(browser, console_server):
    """page_for(username) → a logged-in Playwright page (laptop width) on the console server."""
    contexts = []

    def login(username: str, *, width: int = 1280, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height}, timezone_id="Europe/Berlin")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"{console_server.http_url}/login/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{console_server.http_url}/")
        return page

    yield login
    for context in contexts:
        context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
