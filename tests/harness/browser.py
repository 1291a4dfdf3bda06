"""The browser side of the tests: Debian's Chromium driven by Playwright
through the hub to JupyterLab, the steps a user takes (log in, spawn,
open a notebook, run a cell), and what to show when a step fails."""
from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from playwright.sync_api import Locator, Page, expect

from tests.harness.hub import Hub

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright's own builds can't be downloaded
FAILURE_SCREENSHOT = Path("/tmp/chspawner-browser-failure.png")

# Generous, in milliseconds as Playwright counts: CI machines may have 2
# cores, and JupyterLab's first load there can take tens of seconds.
PAGE_MS, SPAWN_MS, LAB_MS, KERNEL_MS = 30_000, 180_000, 120_000, 120_000


def screenshot(page: Page, name: str) -> None:
    """What the user sees, for the docs (docs/user/img), where the
    environment's CHSPAWNER_SCREENSHOTS says (nothing when unset): once the
    notifications have slid in, JupyterLab's own offer of news declined."""
    directory = os.environ.get("CHSPAWNER_SCREENSHOTS")
    if not directory:
        return
    news = page.locator(".Toastify__toast", has_text="official Jupyter news")
    if news.count():
        news.get_by_role("button", name="No", exact=True).click()
        expect(news).to_have_count(0)
    expect(page.locator(".Toastify__toast.Toastify--animate")).to_have_count(0)
    Path(directory).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(directory, name)))


def log_in(page: Page, hub: Hub, password: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.locator("#username_input").fill(hub.user)
    page.locator("#password_input").fill(password)
    page.locator("#login_submit").click()


def log_in_and_spawn(page: Page, hub: Hub, password: str, image: str = "jupyter",
                     mode: str = "server") -> None:
    log_in(page, hub, password)
    # With no server yet, the hub sends a new login straight to the form.
    expect(page).to_have_url(re.compile(r"/hub/spawn(\?.*)?$"), timeout=PAGE_MS)
    form = page.locator("#spawn_form")
    form.locator('select[name="image"]').select_option(image)
    form.locator(f'input[name="mode"][value="{mode}"]').check()
    form.locator('button[type="submit"]').click()


def watch_progress(page: Page) -> None:
    """ChSpawner's own messages in the spawn-pending page's event log. The
    page reloads itself into JupyterLab once the server answers, seconds
    after the container starts, so this looks as soon as the page is there."""
    expect(page).to_have_url(re.compile(r"/hub/spawn-pending/"), timeout=PAGE_MS)
    expect(page.locator("#progress-log")).to_contain_text(
        re.compile(r"starting the server mode with image jupyter.*"
                   r"container started on .+, image jupyter", re.DOTALL),
        timeout=SPAWN_MS)


def open_notebook(page: Page, hub: Hub, kernel: str = "Python 3") -> Locator:
    """Open a new notebook of ``kernel`` (its launcher card's text) from a
    Launcher; returns its panel."""
    expect(page).to_have_url(re.compile(rf"/user/{hub.user}/lab"), timeout=SPAWN_MS)
    # A Launcher of our own: JupyterLab restores the user's last layout,
    # which may have none, or several.
    page.get_by_role("menuitem", name="File", exact=True).click(timeout=LAB_MS)
    page.get_by_role("menuitem", name="New Launcher").click()
    page.locator('.jp-LauncherCard[data-category="Notebook"]:visible',
                 has_text=kernel).click()
    return page.locator(".jp-NotebookPanel:visible")


def run_first_cell(page: Page, notebook: Locator, code: str,
                   kernel: str = "Python 3 (ipykernel)") -> Locator:
    """Type ``code`` into the notebook's first cell and run it (once the
    status bar shows ``kernel`` idle); returns the cell's output area."""
    # Run before the notebook's session has its kernel, a cell is silently
    # not run: wait for the status bar's "Idle", which needs the kernel's
    # websocket up (the toolbar's indicator says idle from the start).
    expect(page.locator("#jp-main-statusbar")).to_contain_text(
        f"{kernel} | Idle", timeout=KERNEL_MS)
    return run_cell(page, notebook.locator(".jp-Cell").first, code)


def run_cell(page: Page, cell: Locator, code: str) -> Locator:
    """Type ``code`` into ``cell`` and run it; returns its output area."""
    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.type(code)
    expect(editor).to_have_text(code, timeout=PAGE_MS)
    page.keyboard.press("Shift+Enter")
    return cell.locator(".jp-Cell-outputArea")


async def delete_notebooks(hub: Hub) -> None:
    """Delete the notebooks open on the user's server (this test's: the hub
    is the test's own), through the server's REST API as the tester
    service; the contents API takes the files' checkpoints along."""
    api = f"{hub.url}/user/{hub.user}/api"
    async with hub.session() as http:
        async with http.get(f"{api}/sessions", allow_redirects=False) as r:
            if r.status != 200:
                return  # no server: nothing was opened
            sessions = await r.json()
        for session in sessions:
            if session["type"] == "notebook":
                path = urllib.parse.quote(session["path"])
                async with http.delete(f"{api}/contents/{path}") as r:
                    assert r.status in (204, 404), await r.text()


def explain(failure: Exception, page: Page | None, hub: Hub) -> str:
    """What went wrong, with what the browser and the hub last showed."""
    where = "no page"
    if page is not None:
        try:
            page.screenshot(path=str(FAILURE_SCREENSHOT), full_page=True)
            text = page.locator("body").inner_text(timeout=5_000)
            where = (f"page {page.url} (screenshot {FAILURE_SCREENSHOT}):\n"
                     f"{text[-2000:]}")
        except Exception as e:  # the browser itself may be what failed
            where = f"page {page.url}: could not be read ({e})"
    return f"{failure}\n--- {where}\n--- hub log:\n{hub.log()[-3000:]}"
