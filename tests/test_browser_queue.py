"""A server's job waiting in Slurm's queue, seen in a real browser: the
hub's spawn-pending page says why it waits, in words, its place in the
queue and when Slurm expects it to start; the page's own "Stop Server"
button (JupyterHub's stop) cancels the wait, and the job is gone from
Slurm. On the one-node test cluster, through a real JupyterHub with
SlurmChSpawner, headless Chromium.

With CHSPAWNER_SCREENSHOTS set, the waiting page is saved there
(waiting.png), for the docs."""
from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.harness.browser import (CHROMIUM, PAGE_MS, SPAWN_MS, explain, log_in_and_spawn,
                                   screenshot)
from tests.harness.hub import Hub, slurm_spawner_config, user_server
from tests.harness.wait import wait_until

PASSWORD = secrets.token_hex(8)


@pytest.fixture(scope="module")
def hub(user, kernel_store, slurm) -> Iterator[Hub]:
    extra = f'c.DummyAuthenticator.password = "{PASSWORD}"\n'
    hub = Hub(kernel_store, user.pw_name, extra_config=slurm_spawner_config(slurm) + extra)
    yield hub
    hub.stop()


def server_jobs(slurm, user: str) -> list[str]:
    return slurm.run("squeue", "-h", "-o", "%i", "-n", f"jupyterhub-{user}").stdout.split()


@pytest.mark.timeout(600)
def test_a_waiting_spawn_says_why_and_is_cancelled_from_the_page(hub, slurm) -> None:
    """Another job holds the node for 10 minutes: the spawn page says the
    server's job waits for busy nodes (Resources), place 1 of 1, and when
    Slurm expects it to start; "Stop Server" on that page cancels it."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    blocker = slurm.submit("--exclusive", "--time=10", "--job-name=blocker",
                           "--output=/dev/null", "--wrap=sleep 600")
    page: Page | None = None
    try:
        slurm.wait_job(blocker, {"RUNNING"})
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 700})
                page.set_default_timeout(PAGE_MS)
                log_in_and_spawn(page, hub, PASSWORD, image="deb", mode="kernels")
                expect(page).to_have_url(re.compile(r"/hub/spawn-pending/"), timeout=PAGE_MS)
                # (The event log is folded away: the user opens it.)
                details = page.locator("#progress-details")
                if details.count():
                    details.evaluate("d => d.open = true")
                log = page.locator("#progress-log")
                expect(log).to_contain_text(re.compile(
                    r"job \d+ waits: the nodes it needs are busy with other jobs "
                    r"\(Resources\); place 1 of 1 in the queue; Slurm expects it to start "
                    r"at \d\d:\d\d \(in (9|10) min\)"), timeout=SPAWN_MS)
                assert len(server_jobs(slurm, hub.user)) == 1
                screenshot(page, "waiting.png")
                page.locator("#stop-server-btn").click()
                wait_until(lambda: not server_jobs(slurm, hub.user),
                           "the waiting job to be cancelled in Slurm", 60)
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        slurm.run("scancel", str(blocker))
    # The hub agrees: no server, nothing pending.
    wait_until(lambda: asyncio.run(user_server(hub)) == {},
               "the hub to have no server for the user", 60)
