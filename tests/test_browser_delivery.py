"""No output lost, in a real JupyterLab, whatever breaks (issue 16).

One user, one page, one notebook through the hub, chspawner's session
proxy and session manager, a persistent kernel in the ``deb`` image, and
chspawner's JupyterLab extension as the wheel ships it. Each fault gets a
cell of its own that prints 1..N; the fault strikes while it prints. In
every case the notebook in the browser ends with every number exactly once
and the cell finished (its execution count shown), and the notebook saved
on the server holds the complete output.

The faults: the session proxy SIGKILLed (the hub starts it again); the
page's kernel websocket cut (Playwright's websocket routing closes it) and
refused for a moment, or for two minutes as a closed laptop's would be;
the kernel's keeper SIGKILLed; the page reloaded mid-cell (the notebook
saved first, as a user's reload brings back the saved file); the notebook
closed mid-cell (saved, as JupyterLab asks) and opened, once the cell
ended, in another browser.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import secrets
import signal
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, WebSocketRoute, expect, sync_playwright

from tests.harness.hub import Hub, manager_config, stop_server
from tests.harness.net import free_port
from tests.harness.wait import wait_until
from tests.harness.browser import (CHROMIUM, KERNEL_MS, PAGE_MS, delete_notebooks, explain,
                                   log_in, log_in_and_spawn, open_notebook, run_cell)

PASSWORD = secrets.token_hex(8)
KERNEL = "Python 3 (ipykernel) — image deb"
N, EVERY = 30, 0.5  # 15 s of output per cell
CELL_MS = 180_000


@pytest.fixture(scope="module")
def hub(user, kernel_store) -> Iterator[Hub]:
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()) + textwrap.dedent(f"""
            c.DummyAuthenticator.password = "{PASSWORD}"
            # A killed proxy is started again within a second.
            c.ConfigurableHTTPProxy.check_running_interval = 1
        """))
    yield hub
    hub.stop()


class KernelSockets:
    """The page's kernel websockets, through Playwright's routing: each is
    passed on to the server as it is, and can be cut and refused for a
    while. A cut is what a dropped network does: the page's side ends
    abnormally (1006), the server's side is left open, unanswered, and what
    the server still writes to it is lost; the server finds out when the
    page comes back (jupyter_server replaces the stale connection). A page
    closing its websocket itself is passed on as it closed it."""

    def __init__(self) -> None:
        self.open: list[tuple[WebSocketRoute, dict]] = []
        self.refuse_until = 0.0
        self.connections = 0

    def route(self, ws: WebSocketRoute) -> None:
        if time.monotonic() < self.refuse_until:
            ws.close(code=1006, reason="network down")
            return
        self.connections += 1
        try:
            server = ws.connect_to_server()
        except Exception:  # the server can't be reached (the proxy restarting)
            ws.close(code=1006, reason="no server")
            return
        # Messages: Playwright's own forwarding (it holds the page's first
        # ones until the server's side is open). Closes: ours, so that a
        # cut stays the page's side alone.
        link = {"cut": False}
        ws.on_close(lambda code, reason: link["cut"] or server.close(code=code, reason=reason))
        server.on_close(lambda code, reason: link["cut"] or ws.close(code=code, reason=reason))
        self.open.append((ws, link))

    def cut(self, refuse_for: float = 0.0) -> None:
        self.refuse_until = time.monotonic() + refuse_for
        for ws, link in self.open:
            if not link["cut"]:
                link["cut"] = True
                ws.close(code=1006, reason="network down")
        self.open.clear()


def count_line(n: int, every: float) -> str:
    """Print 1..n, one every ``every`` seconds, as one line (typed into
    CodeMirror, which would indent the lines of a loop a second time)."""
    return (f"import time; _ = [(print(i, flush=True), time.sleep({every})) "
            f"for i in range(1, {n + 1})]")


def numbers(text: str) -> list[int]:
    return [int(line) for line in text.splitlines() if line.strip().isdigit()]


def saved_numbers(hub: Hub, path: str, marker: str) -> list[int]:
    """The numbers in the saved notebook's cell whose source has ``marker``
    (none while it has no such cell)."""
    home = Path(pwd.getpwnam(hub.user).pw_dir)
    try:
        notebook = json.loads((home / path).read_text())
    except ValueError:
        return []  # caught mid-write (jupyter_server rewrites the file in place)
    for cell in notebook["cells"]:
        if marker in "".join(cell["source"]):
            text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                           if o.get("output_type") == "stream")
            return numbers(text)
    return []  # (not saved yet)


def finished(cell: Locator, rendered: bool = True) -> bool:
    """The cell's prompt shows an execution count, not [*] (as rendered,
    or in the DOM for a cell JupyterLab has not laid out)."""
    prompt = cell.locator(".jp-InputPrompt")
    prompt = prompt.inner_text() if rendered else prompt.text_content()
    return re.search(r"\[\d+\]", prompt) is not None


def save(page: Page, first: bool) -> None:
    """Save the notebook as a user does (the notebook's Save button); the
    first save of an untitled notebook asks for a name: the same one."""
    page.locator('.jp-NotebookPanel:visible .jp-Toolbar [data-command="docmanager:save"]').click()
    if first:
        rename = page.locator(".jp-Dialog", has_text="Rename file")
        rename.locator(".jp-mod-accept").click()


def keeper_pids(user: str, kernel_id: str) -> list[int]:
    """The keepers of kernel ``kernel_id`` (its id is in the keeper's
    record path, on its command line)."""
    uid = pwd.getpwnam(user).pw_uid
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"chspawner.persist.keeper" in argv and \
                any(kernel_id.encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def proxy_pid(hub: Hub) -> int:
    return int((hub.dir / "proxy.pid").read_text())


# Six faults of ~20 s each, one of them two minutes long, after a spawn.
@pytest.mark.timeout(900)
def test_every_number_exactly_once_whatever_breaks(hub: Hub) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    page: Page | None = None
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.set_default_timeout(PAGE_MS)
                sockets = KernelSockets()
                page.route_web_socket(re.compile(r"/api/kernels/[^/]+/channels"), sockets.route)
                log_in_and_spawn(page, hub, PASSWORD, image="deb", mode="kernels")
                notebook = open_notebook(page, hub, kernel="image deb")
                expect(page.locator("#jp-main-statusbar")).to_contain_text(
                    f"{KERNEL} | Idle", timeout=KERNEL_MS)
                path, kernel_id = notebook_session(hub)

                saves: list[str] = []
                every = list(range(1, N + 1))

                def cell_of(marker: str) -> Locator:
                    return notebook.locator(".jp-Cell", has_text=marker)

                def start_cell(name: str) -> tuple[str, Locator]:
                    """A new cell printing 1..N, once it printed a few."""
                    marker = f"# fault: {name}"
                    cells = notebook.locator(".jp-Cell")
                    output = run_cell(page, cells.nth(cells.count() - 1),
                                      count_line(N, EVERY) + f"  {marker}")
                    wait_until(lambda: len(numbers(output.inner_text())) >= 3,
                               f"{name}: the cell to print", KERNEL_MS / 1000)
                    return marker, output

                def all_there(name: str, marker: str, cell: Locator) -> None:
                    """Every number once in the cell, finished, and in the
                    notebook on disk once the page saved it."""
                    output = cell.locator(".jp-Cell-outputArea")
                    expect(output).to_contain_text(f"\n{N}", timeout=CELL_MS)
                    wait_until(lambda: finished(cell), f"{name}: the cell to finish",
                               KERNEL_MS / 1000)
                    assert numbers(output.inner_text()) == every, (name, output.inner_text())
                    save(page, first=not saves)
                    saves.append(name)
                    try:
                        wait_until(lambda: saved_numbers(hub, path, marker) == every,
                                   f"{name}: the saved notebook to hold every number", 30)
                    except AssertionError:
                        assert saved_numbers(hub, path, marker) == every, name

                def fault_cell(name: str, fault, saved_first: bool = False) -> None:
                    """A cell printing 1..N, ``fault`` while it prints;
                    the notebook saved first if ``saved_first``."""
                    marker, _output = start_cell(name)
                    if saved_first:
                        save(page, first=not saves)
                        saves.append(name)
                        wait_until(lambda: len(saved_numbers(hub, path, marker)) >= 3,
                                   f"{name}: the notebook saved", 30)
                    fault()
                    all_there(name, marker, cell_of(marker))

                def kill_proxy() -> None:
                    os.kill(proxy_pid(hub), signal.SIGKILL)

                def cut() -> None:
                    sockets.cut(refuse_for=3)

                def kill_keeper() -> None:
                    pids = keeper_pids(hub.user, kernel_id)
                    assert len(pids) == 1, pids
                    os.kill(pids[0], signal.SIGKILL)

                fault_cell("proxy killed", kill_proxy)
                fault_cell("network cut", cut)
                fault_cell("keeper killed", kill_keeper)
                fault_cell("page reloaded", page.reload, saved_first=True)
                fault_cell("laptop closed for 2 minutes", lambda: sockets.cut(refuse_for=120))

                # The notebook closed mid-cell (saved, as JupyterLab asks);
                # once the cell has ended, the server has written the rest
                # into the file, and another browser opens it.
                marker, _output = start_cell("closed, opened later elsewhere")
                page.locator(".jp-mod-current .lm-TabBar-tabCloseIcon").click()
                page.locator(".jp-Dialog", has_text="Save your work").get_by_role(
                    "button", name="Save", exact=True).click()
                expect(notebook).to_have_count(0)
                wait_until(lambda: saved_numbers(hub, path, marker) == every,
                           "the server to write the rest of the output", CELL_MS / 1000)
                page = browser.new_context().new_page()
                page.set_default_timeout(PAGE_MS)
                log_in(page, hub, PASSWORD)
                page.goto(f"{hub.base}/lab/tree/{path}")
                reopened = page.locator(".jp-NotebookPanel:visible .jp-Cell", has_text=marker)
                output = reopened.locator(".jp-Cell-outputArea")
                expect(output).to_contain_text(f"\n{N}", timeout=KERNEL_MS)
                # (its DOM's text: JupyterLab lays out only the cells in
                # view, and an off-screen cell's rendered text reads empty)
                assert numbers(output.text_content()) == every
                assert finished(reopened, rendered=False)
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))


def notebook_session(hub: Hub) -> tuple[str, str]:
    """The path of the page's notebook and its kernel's id, once the server has its session
    (the sessions API; plain urllib: Playwright's sync API holds an event
    loop in this thread)."""
    found: list[tuple[str, str]] = []

    def listed() -> bool:
        request = urllib.request.Request(f"{hub.base}/api/sessions",
                                         headers={"Authorization": f"token {hub.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            found[:] = [(s["path"], s["kernel"]["id"]) for s in json.load(r)
                        if s.get("type") == "notebook"]
        return len(found) == 1

    wait_until(listed, "the notebook's session", 30)
    return found[0]
