"""The session's Slurm jobs in JupyterLab, in a real browser: a user's
server spawned through a real JupyterHub with SlurmChSpawner (kernels mode,
each kernel a batch job of its own) on the one-node test cluster, headless
Chromium driving the served JupyterLab with chspawner's extension.

- A kernel whose job waits (its node drained) says so in the notebook, in
  Slurm's reason translated, with its place in the queue, until its job
  runs; then the notice goes and the kernel is there.
- The status bar shows the time left of the server's job; its time limit
  shortened (scontrol, as an administrator would) to cross the admin's
  warning times (15 and 5 min, the defaults) without waiting for them, the
  page warns at each, once, saying what happens then.

With CHSPAWNER_SCREENSHOTS set, what the user sees is saved there for the
docs (time-left.png, warning.png, kernel-waiting.png).
"""
from __future__ import annotations

import asyncio
import math
import re
import secrets
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.harness.browser import (CHROMIUM, KERNEL_MS, LAB_MS, PAGE_MS, SPAWN_MS,
                                   delete_notebooks, explain, log_in_and_spawn, open_notebook,
                                   screenshot)
from tests.harness.hub import Hub, slurm_spawner_config, stop_server
from tests.harness.wait import wait_until

PASSWORD = secrets.token_hex(8)
KERNEL = "Python 3 (ipykernel) — image deb"
# The page asks often and the server answers from states at most 2 s old:
# each change of the limit shows within seconds (the defaults, 30 s and
# 30 s, are the extension's unit tests' and the endpoint's).
POLL_S, MAX_AGE_S = 3, 2
#: How long the page may take to show a change of a job (its ask, the watch's round).
SHOWN_MS = 60_000


@pytest.fixture(scope="module")
def hub(user, kernel_store, slurm) -> Iterator[Hub]:
    extra = textwrap.dedent(f"""
        c.DummyAuthenticator.password = "{PASSWORD}"
        c.SlurmChSpawner.args = ["--SessionStatus.poll_seconds={POLL_S}",
                                 "--SessionStatus.max_age={MAX_AGE_S}"]
    """)
    hub = Hub(kernel_store, user.pw_name, extra_config=slurm_spawner_config(slurm) + extra)
    yield hub
    hub.stop()


def started_at(slurm, job_id: str) -> float:
    """The job's start (epoch), from Slurm."""
    start = slurm.job_info(int(job_id))["StartTime"]
    return time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S"))


def leave_minutes(slurm, job_id: str, minutes: int) -> None:
    """Set the running job's time limit so that between ``minutes`` and
    ``minutes`` + 1 are left (a limit is whole minutes from the start)."""
    elapsed = time.time() - started_at(slurm, job_id)
    limit = math.ceil(elapsed / 60) + minutes
    slurm.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}")


@pytest.mark.timeout(900)
def test_time_left_warnings_and_a_waiting_kernel_in_jupyterlab(hub, slurm, user) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    # JupyterLab restores the user's last layout: a notebook an earlier test
    # left open (its file since deleted) would come back, asking for a kernel.
    for workspace in Path(user.pw_dir, ".jupyter/lab/workspaces").glob("*"):
        workspace.unlink()
    notebooks_before = set(Path(user.pw_dir).glob("*.ipynb"))
    page: Page | None = None
    drained = False
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(PAGE_MS)
                log_in_and_spawn(page, hub, PASSWORD, image="deb", mode="kernels")
                expect(page).to_have_url(re.compile(rf"/user/{hub.user}/lab"),
                                         timeout=SPAWN_MS)
                [server_job] = slurm.jobs(user.pw_name, "jupyterhub-")
                status = page.locator("#jp-main-statusbar .chspawner-SessionStatus")
                # The server's job, its time left (the form's default: 1 h).
                expect(status).to_contain_text(
                    re.compile(rf"Job {server_job}: (59|1 h 00) min left"), timeout=LAB_MS)
                expect(status).to_have_attribute(
                    "title", re.compile(rf"Your server: Slurm job {server_job} on node "
                                        rf"{slurm.node}: .* left \(until "
                                        # (a day named when it ends on another)
                                        r"(\w{3} \d\d \w{3} )?\d\d:\d\d\): your "
                                        "server stops then: save your work\\."))

                # A kernel whose job can't start: its node takes no new jobs.
                slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=drain",
                          "reason=chspawner-test")
                drained = True
                open_notebook(page, hub, kernel="image deb")
                kernel_job = wait_until(
                    lambda: list(slurm.jobs(user.pw_name, "chspawner-kernel-")),
                    "the kernel's job to be submitted", 120)[0]
                waiting = page.locator(".Toastify__toast",
                                       has_text=f"Kernel job {kernel_job} waits: ")
                expect(waiting).to_contain_text(
                    "nodes it needs are not available (down, drained or reserved); "
                    "place 1 of 1 in the queue", timeout=SHOWN_MS)
                expect(status).to_contain_text(f"Kernel job {kernel_job} waits: nodes it")
                # The status bar's title has the whole of it, Slurm's word too.
                expect(status).to_have_attribute("title", re.compile(
                    rf"job {kernel_job} waits: nodes it needs are not available \(down, "
                    r"drained or reserved\) \(\w+.*\); place 1 of 1 in the queue"))
                screenshot(page, "kernel-waiting.png")
                # It runs: the notice goes, the kernel is there.
                slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=resume")
                drained = False
                expect(waiting).to_have_count(0, timeout=KERNEL_MS)
                expect(page.locator("#jp-main-statusbar")).to_contain_text(
                    f"{KERNEL} | Idle", timeout=KERNEL_MS)
                expect(status).to_contain_text(
                    re.compile(rf"Kernel job {kernel_job}: (59|1 h 00) min left"),
                    timeout=SHOWN_MS)

                # The server's limit cut to 17 min left: shown, no warning yet.
                warnings = page.locator(".Toastify__toast", has_text="Your server's job ends in")
                leave_minutes(slurm, server_job, 17)
                expect(status).to_contain_text(re.compile(rf"Job {server_job}: 1[78] min left"),
                                               timeout=SHOWN_MS)
                expect(warnings).to_have_count(0)
                screenshot(page, "time-left.png")
                # 7 min left: the 15-minute warning, saying what happens then.
                leave_minutes(slurm, server_job, 7)
                expect(warnings).to_have_count(1, timeout=SHOWN_MS)
                expect(warnings).to_contain_text(re.compile(
                    r"Your server's job ends in [78] min \(at \d\d:\d\d\): your server stops "
                    r"then: save your work\."))
                screenshot(page, "warning.png")
                # 4 min left: the 5-minute one, once (the 15-minute one not again).
                leave_minutes(slurm, server_job, 4)
                expect(warnings).to_have_count(2, timeout=SHOWN_MS)
                expect(page.locator(".Toastify__toast", has_text=re.compile(
                    r"Your server's job ends in [45] min"))).to_have_count(1)
                expect(status).to_contain_text(re.compile(rf"Job {server_job}: [45] min left"))
                # (The kernel's job, an hour long, warned of nothing.)
                expect(page.locator(".Toastify__toast", has_text="The job of")).to_have_count(0)
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        if drained:
            slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=resume")
        # Outside Playwright's sync API (it keeps an event loop running).
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))
        # A notebook whose kernel never started has no session to find it by.
        for notebook in set(Path(user.pw_dir).glob("*.ipynb")) - notebooks_before:
            notebook.unlink()
