"""A user's whole journey in a real browser, end to end, nothing faked.

Headless Chromium (Debian's, driven by Playwright) logs in to a real
JupyterHub with ChSpawner behind its real configurable-http-proxy, picks the
``jupyter`` image and the ``server`` mode in ChSpawner's options form, watches
ChSpawner's progress messages on the hub's spawn-pending page, lands in
JupyterLab, opens a notebook and runs a cell that reads a file only the image
has. The answer proves that the page, the proxy, the hub, the spawner, the
containerized server and its kernel all work together as a user sees them.
And on the multi-node cluster, through a center's hub: a kernel lost with
its node is told in the notebook, in words, and the next cell runs. And
chspawner's JupyterLab extension (@chspawner/jupyterlab-persist) at work in
the JupyterLab kernels mode serves.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    Page,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from tests.harness.browser import (CHROMIUM, KERNEL_MS, LAB_MS, PAGE_MS,
                                   delete_notebooks, explain, log_in, log_in_and_spawn, screenshot,
                                   open_notebook, run_cell, run_first_cell, watch_progress)
from tests.harness.center import shorten
from tests.harness.hub import Hub, stop_server
from tests.harness.wait import wait_until

PASSWORD = secrets.token_hex(8)
# /etc/chspawner-test-image exists only inside the test images.
CODE = "print(open('/etc/chspawner-test-image').read())"
PROOF = "chspawner test image: Debian bookworm"


@pytest.fixture(scope="module")
def hub(user, kernel_store) -> Iterator[Hub]:
    hub = Hub(kernel_store, user.pw_name,
              extra_config=f'c.DummyAuthenticator.password = "{PASSWORD}"\n')
    yield hub
    hub.stop()


def test_log_in_spawn_in_the_image_and_run_a_notebook(hub: Hub) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    page: Page | None = None
    try:
        with sync_playwright() as pw:
            # As root (CI), Playwright's default --no-sandbox lets Chromium start.
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page()
                page.set_default_timeout(PAGE_MS)  # every click, fill and goto
                log_in_and_spawn(page, hub, PASSWORD)
                watch_progress(page)
                output = run_first_cell(page, open_notebook(page, hub), CODE)
                expect(output).to_contain_text(PROOF, timeout=KERNEL_MS)
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        # Outside Playwright's sync API: it keeps an event loop running, and
        # these helpers use asyncio.run.
        asyncio.run(delete_notebooks(hub))  # from the test user's real home
        asyncio.run(stop_server(hub))


def test_a_kernel_lost_with_its_node_is_told_in_the_notebook(center_hub) -> None:
    """On the multi-node cluster, as a center's hub runs it: the user spawns
    in kernels mode, opens a notebook (the image's kernel, in a job of its
    own on another node than the server) and runs a long cell; that node is
    lost. The notebook says so, in words, where the user is looking, and
    the next cell runs on a new kernel."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    hub, cluster = center_hub, center_hub.cluster
    kernel = "Python 3 (ipykernel) — image python"
    page: Page | None = None
    lost: list[str] = []
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page()
                page.set_default_timeout(PAGE_MS)
                log_in_and_spawn(page, hub, hub.password, image="python", mode="kernels")
                notebook = open_notebook(page, hub, kernel="image python")
                output = run_first_cell(
                    page, notebook, "import socket, time; print(socket.gethostname(), "
                    "flush=True); time.sleep(600)", kernel=kernel)
                expect(output).to_contain_text(re.compile(r"-node\d"), timeout=KERNEL_MS)
                node = re.search(r"\S+-node\d+", output.inner_text()).group()
                assert node in cluster.nodes, (node, cluster.nodes)
                lost.append(node)
                cluster.lose(node)
                # Slurm ends the job once it has the node down (SlurmdTimeout),
                # then the kernel is restarted as a new job elsewhere.
                expect(output).to_contain_text(
                    f"on node {node} ended: its node failed (NODE_FAIL)",
                    timeout=KERNEL_MS)
                screenshot(page, "kernel-died.png")
                # JupyterLab's own notice ("Kernel Restarting"), after ours.
                accept = page.locator(".jp-Dialog .jp-mod-accept")
                expect(accept).to_be_visible(timeout=KERNEL_MS)
                accept.click()
                # The open notebook keeps the streams of the kernel that was
                # lost until the page is loaded again (a known gap: see the
                # user guide, persistent kernels); then the new kernel answers.
                page.reload()
                expect(page.locator("#jp-main-statusbar")).to_contain_text(
                    f"{kernel} | Idle", timeout=KERNEL_MS)
                cells = notebook.locator(".jp-Cell")  # (as loaded again: the last, fixed)
                answer = run_cell(page, cells.nth(cells.count() - 1),
                                  "import socket; print(6 * 7, socket.gethostname())")
                expect(answer).to_contain_text(re.compile(r"42 \S+-node\d"),
                                               timeout=KERNEL_MS)
                assert node not in answer.inner_text()
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        for node in lost:
            cluster.restore(node)
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))


def palette(page: Page, command: str, label: str | None = None) -> None:
    """Run one of JupyterLab's commands as a user does: the command
    palette, ``command`` typed, the item of that ``label`` clicked."""
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input:visible").fill(command)
    page.locator(".lm-CommandPalette-item:visible",
                 has_text=label or command).first.click(timeout=PAGE_MS)


def test_a_kernel_session_saved_and_restored_from_jupyterlab(center_hub) -> None:
    """The center's hub (kernel_session_state on): a variable made in a
    notebook, the palette's "Save Kernel Session", the variable deleted,
    "Restore Kernel Session": the variable is back, and each step said so
    in a notification, in the kernel's words."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    hub = center_hub
    kernel = "Python 3 (ipykernel) — image python"
    page: Page | None = None
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.set_default_timeout(PAGE_MS)
                log_in_and_spawn(page, hub, hub.password, image="python", mode="kernels")
                notebook = open_notebook(page, hub, kernel="image python")
                made = run_first_cell(page, notebook, "x = 41; print('made')", kernel=kernel)
                expect(made).to_contain_text("made", timeout=KERNEL_MS)
                palette(page, "Save Kernel Session")
                expect(page.locator(".Toastify__toast", has_text="Session saved")) \
                    .to_be_visible(timeout=KERNEL_MS)
                cells = notebook.locator(".jp-Cell")
                empty = run_cell(page, cells.nth(cells.count() - 1),
                                 "del x; print('x' in globals())")
                expect(empty).to_contain_text("False", timeout=KERNEL_MS)
                palette(page, "Restore Kernel Session")
                expect(page.locator(".Toastify__toast", has_text="Session restored")) \
                    .to_be_visible(timeout=KERNEL_MS)
                screenshot(page, "kernel-session-restored.png")
                back = run_cell(page, cells.nth(cells.count() - 1), "print(x + 1)")
                expect(back).to_contain_text("42", timeout=KERNEL_MS)
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))


def server_jobs(hub) -> list[str]:
    """The user's running server jobs."""
    return hub.cluster.run("squeue", "-h", "-u", hub.user, "-t", "RUNNING", "-n",
                           f"jupyterhub-{hub.user}", "-o", "%i").stdout.split()


def test_a_session_moved_before_its_time_limit_in_jupyterlab(center_hub) -> None:
    """On the multi-node cluster, as a center's hub runs it: the user ticks
    "Keep my session past the time limit" on the spawn form, opens a
    notebook and runs a cell that counts for a while. The server's job is
    shortened (scontrol, an admin) under the center's move_lead: the
    session moves to a successor job while the cell counts; JupyterLab says
    so, and the cell's output holds every number exactly once."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    hub = center_hub
    kernel = "Python 3 (ipykernel) — image python"
    count = 90  # one every 0.5 s: 45 s, across the move
    page: Page | None = None
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.set_default_timeout(PAGE_MS)
                log_in(page, hub, hub.password)
                expect(page).to_have_url(re.compile(r"/hub/spawn(\?.*)?$"), timeout=PAGE_MS)
                form = page.locator("#spawn_form")
                form.locator('select[name="image"]').select_option("python")
                form.locator('input[name="mode"][value="kernels"]').check()
                form.locator('input[name="keep_session"]').check()
                form.locator('button[type="submit"]').click()
                notebook = open_notebook(page, hub, kernel="image python")
                # (One line: the editor indents a typed newline itself.)
                output = run_first_cell(
                    page, notebook, "import time; _ = [(print(i, flush=True), time.sleep(0.5)) "
                    f"for i in range(1, {count + 1})]", kernel=kernel)
                expect(output).to_contain_text("3", timeout=KERNEL_MS)
                # (From Slurm: the hub's API is async, and Playwright's loop runs here.)
                [old] = server_jobs(hub)
                shorten(hub, old, 300)
                moved = page.locator(".Toastify__toast",
                                     has_text="Your session moved before the time limit")
                expect(moved).to_be_visible(timeout=KERNEL_MS)
                wait_until(lambda: server_jobs(hub) not in ([], [old]),
                           "the old job to end, the successor running", 60)
                expect(page.locator("#jp-main-statusbar")).to_contain_text(
                    re.compile(re.escape(kernel) + r" \| (Busy|Idle)"),
                    timeout=KERNEL_MS)  # (reconnected)
                screenshot(page, "moved.png")
                expect(output).to_contain_text(str(count), timeout=KERNEL_MS)
                numbers = [int(n) for n in output.inner_text().split() if n.isdigit()]
                assert numbers == list(range(1, count + 1)), numbers
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub)) from failure
            finally:
                browser.close()
    finally:
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))


class NumberingServer:
    """Stands in for the server's side of chspawner's delivery protocol
    (docs/user/persistent-kernels.md) on the page's kernel websockets, through
    Playwright's websocket routing: numbers each IOPub message as the server
    does (``metadata.chspawner_seq``) and sends every ``stream`` message
    twice, as a server replaying what it could not know arrived would.
    Everything else goes through untouched, both ways."""

    KERNEL_CHANNELS = re.compile(r"/api/kernels/[^/?]+/channels")

    def __init__(self) -> None:
        self.seq = 1_000_000  # the keeper's numbers are microseconds: large
        self.sockets: list[WebSocketRoute] = []
        self.last_stream = 0
        self.stream_kernel = ""  # the kernel of the last stream message

    @classmethod
    def kernel_of(cls, url: str) -> str:
        return cls.KERNEL_CHANNELS.search(url).group().split("/")[3]

    def route(self, ws: WebSocketRoute) -> None:
        self.sockets.append(ws)
        server = ws.connect_to_server()
        ws.on_message(server.send)
        server.on_message(lambda data: self.to_page(ws, data))

    def to_page(self, ws: WebSocketRoute, data: str | bytes) -> None:
        numbered, msg_type = self.numbered(data)
        ws.send(numbered)
        if msg_type == "stream":
            self.stream_kernel = self.kernel_of(ws.url)
            ws.send(numbered)  # the copy the extension must drop

    def send_foreign(self, kernel_id: str, cell_id: str, count: int, text: str) -> None:
        """What the server sends a page of the output of a cell another page
        ran: replayed (marked with the cell), then live (unmarked)."""
        parent = {"msg_id": f"other-page-{self.seq}", "msg_type": "execute_request",
                  "session": "other-page", "username": "", "date": "", "version": "5.3"}
        for msg_type, content, mark in (
                ("execute_input", {"code": f"print({text!r})", "execution_count": count},
                 {"chspawner_cell": cell_id}),
                ("stream", {"name": "stdout", "text": text + "\n"}, {})):
            header = {**parent, "msg_id": f"{parent['msg_id']}-{msg_type}",
                      "msg_type": msg_type, "session": "kernel"}
            parts = [b"iopub", json.dumps(header).encode(), json.dumps(parent).encode(),
                     json.dumps({"chspawner_seq": self.next(msg_type), **mark}).encode(),
                     json.dumps(content).encode()]
            self.socket_of(kernel_id).send(v1_frame(parts))

    def socket_of(self, kernel_id: str) -> WebSocketRoute:
        """The kernel's latest websocket (the page may have others open:
        JupyterLab restores the notebooks of its last visit)."""
        return [ws for ws in self.sockets if self.kernel_of(ws.url) == kernel_id][-1]

    def numbered(self, data: str | bytes) -> tuple[str | bytes, str]:
        if isinstance(data, str):  # the legacy JSON protocol
            msg = json.loads(data)
            if msg.get("channel") != "iopub":
                return data, ""
            msg["metadata"]["chspawner_seq"] = self.next(msg["header"]["msg_type"])
            return json.dumps(msg), msg["header"]["msg_type"]
        # v1.kernel.websocket.jupyter.org: a count of offsets, the offsets
        # (little-endian uint64), then channel, header, parent header,
        # metadata, content and buffers.
        count = int.from_bytes(data[:8], "little")
        offsets = [int.from_bytes(data[8 * i:8 * i + 8], "little") for i in range(1, count + 1)]
        parts = [data[a:b] for a, b in zip(offsets, offsets[1:])]
        if parts[0] != b"iopub":
            return data, ""
        msg_type = json.loads(parts[1])["msg_type"]
        metadata = json.loads(parts[3])
        metadata["chspawner_seq"] = self.next(msg_type)
        parts[3] = json.dumps(metadata).encode()
        return v1_frame(parts), msg_type

    def next(self, msg_type: str) -> int:
        self.seq += 1
        if msg_type == "stream":
            self.last_stream = self.seq
        return self.seq


def v1_frame(parts: list[bytes]) -> bytes:
    """channel, header, parent header, metadata, content (and buffers) as a
    v1.kernel.websocket.jupyter.org frame."""
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = b"".join(n.to_bytes(8, "little") for n in [len(offsets), *offsets])
    return head + b"".join(parts)


def received_arg(url: str) -> int | None:
    match = re.search(r"[?&]chspawner_received=(\d+)", url)
    return int(match.group(1)) if match else None


def test_the_persist_extension_in_the_served_jupyterlab(hub: Hub) -> None:
    """Kernels mode: the venv's JupyterLab, with chspawner's persist plugins,
    loads chspawner's extension from the wheel (no build step). With the
    server's numbering stood in for (NumberingServer; the server's own is
    another part, tested with it), the page shows each message once though
    each arrives twice; when its kernel websocket is cut, JupyterLab's
    reconnection asks for what follows the last message it got
    (``chspawner_received``); output of a cell another page ran shows in
    that cell; its save records what it holds in the notebook; and the page
    loaded again asks from that record."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup-system.sh")
    kernel = "Python 3 (ipykernel) — image deb"
    numbering = NumberingServer()
    page: Page | None = None
    console: list[str] = []
    try:
        with sync_playwright() as pw:
            browser: Browser = pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page()
                page.set_default_timeout(PAGE_MS)
                page.on("console", lambda m: console.append(m.text))
                page.route_web_socket(NumberingServer.KERNEL_CHANNELS, numbering.route)
                log_in_and_spawn(page, hub, PASSWORD, image="deb", mode="kernels")
                notebook = open_notebook(page, hub, kernel="image deb")
                output = run_first_cell(
                    page, notebook, "for i in range(1, 6): print(i, flush=True)",
                    kernel=kernel)
                # Every number once, though every stream message came twice.
                expect(output).to_have_text("1\n2\n3\n4\n5", timeout=KERNEL_MS)
                assert any("@chspawner/jupyterlab-persist:plugin is active" in line
                           for line in console), console[-20:]
                expect(page.locator("#jp-main-statusbar")).to_contain_text(
                    f"{kernel} | Idle", timeout=KERNEL_MS)

                # The connection cut (4000: not a close JupyterLab takes as
                # final): its reconnection asks for what follows the last
                # message the page got, the cell's idle status at least.
                kernel_id = numbering.stream_kernel
                channels = f"/api/kernels/{kernel_id}/channels"
                first = numbering.socket_of(kernel_id)
                assert received_arg(first.url) is None, first.url  # nothing known yet
                with page.expect_websocket(lambda ws: channels in ws.url,
                                           timeout=KERNEL_MS) as reconnected:
                    sent = numbering.seq
                    first.close(code=4000, reason="cut by the test")
                received = received_arg(reconnected.value.url)
                assert received is not None, reconnected.value.url
                assert numbering.last_stream < received <= sent, (received, numbering.last_stream, sent)

                # After the reconnect: still once each.
                cells = notebook.locator(".jp-Cell")
                answer = run_cell(page, cells.nth(cells.count() - 1), "print('after')")
                expect(answer).to_have_text("after", timeout=KERNEL_MS)
                after = numbering.last_stream

                # The page's save records what it holds of the kernel.
                tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current")
                dirty = re.compile(r"\bjp-mod-dirty\b")
                expect(tab).to_have_class(dirty)  # its outputs are not saved yet
                page.keyboard.press("Control+s")
                # An untitled notebook's first save asks for a name: keep it.
                page.locator(".jp-Dialog .jp-mod-accept", has_text="Save").click()
                expect(tab).not_to_have_class(dirty, timeout=PAGE_MS)
                saved = saved_notebook(page, hub, kernel_id)
                record = saved["metadata"]["chspawner"]["outputs"]
                assert record["kernel_id"] == kernel_id, record
                assert after <= record["seq"] <= numbering.seq, (record, after, numbering.seq)

                # Output of a cell another page ran (the server marks what it
                # replays of it with the cell's id) shows in that cell here,
                # and the next save holds it, and says so.
                numbering.send_foreign(kernel_id, saved["cells"][0]["id"], 42, "from another page")
                first_cell = cells.nth(0)
                expect(first_cell.locator(".jp-Cell-outputArea")).to_have_text(
                    "from another page", timeout=PAGE_MS)
                expect(first_cell.locator(".jp-InputPrompt")).to_contain_text("[42]")
                foreign = numbering.last_stream
                expect(tab).to_have_class(dirty)
                page.keyboard.press("Control+s")
                expect(tab).not_to_have_class(dirty, timeout=PAGE_MS)
                saved = saved_notebook(page, hub, kernel_id)
                record = saved["metadata"]["chspawner"]["outputs"]
                assert foreign <= record["seq"] <= numbering.seq, (record, foreign)
                assert saved["cells"][0]["execution_count"] == 42, saved["cells"][0]
                assert saved["cells"][0]["outputs"] == [
                    {"output_type": "stream", "name": "stdout", "text": "from another page\n"}]

                # The server writes outputs the page has (section 4 of the
                # protocol, stood in for by a write through the contents API)
                # while the page is away; back, with them rendered, the page
                # saves over them without JupyterLab's "File Changed".
                on_disk = json.loads(json.dumps(saved))  # the server's holds a little less
                on_disk["metadata"]["chspawner"]["outputs"]["seq"] -= 1
                write_as_server(page, hub, on_disk)
                with page.expect_console_message(
                        lambda m: "the next save replaces them" in m.text, timeout=KERNEL_MS):
                    numbering.socket_of(kernel_id).close(code=4000, reason="cut by the test")
                with page.expect_response(lambda r: r.request.method == "PUT"
                                          and "/api/contents/" in r.url) as put:
                    page.keyboard.press("Control+s")
                assert put.value.ok, put.value.status
                expect(page.locator(".jp-Dialog")).to_have_count(0)
                record = saved_notebook(page, hub, kernel_id)["metadata"]["chspawner"]["outputs"]

                # A new page asks, on its first connection, from that record.
                with page.expect_websocket(lambda ws: channels in ws.url,
                                           timeout=LAB_MS) as loaded:
                    page.reload()
                assert received_arg(loaded.value.url) == record["seq"], loaded.value.url
            except Exception as failure:
                raise AssertionError(explain(failure, page, hub) + "\n--- browser console:\n"
                                     + "\n".join(console[-40:])) from failure
            finally:
                browser.close()
    finally:
        asyncio.run(delete_notebooks(hub))
        asyncio.run(stop_server(hub))


def write_as_server(page: Page, hub: Hub, notebook: dict) -> None:
    """Write ``notebook`` over the open one on disk, as the server does when
    it writes outputs into a notebook no page holds."""
    api = f"{hub.url}/user/{hub.user}/api"
    paths = [s["path"] for s in page.request.get(f"{api}/sessions").json()
             if s["type"] == "notebook"
             and s["kernel"]["id"] == notebook["metadata"]["chspawner"]["outputs"]["kernel_id"]]
    xsrf = next(c["value"] for c in page.context.cookies() if c["name"] == "_xsrf")
    answer = page.request.put(f"{api}/contents/{urllib.parse.quote(paths[0])}",
                              data={"type": "notebook", "format": "json", "content": notebook},
                              headers={"X-XSRFToken": xsrf})
    assert answer.ok, (answer.status, answer.text())


def saved_notebook(page: Page, hub: Hub, kernel_id: str) -> dict:
    """The notebook of ``kernel_id``, as saved on disk (through the server's
    contents API, with the page's own login: Playwright's sync API keeps an
    event loop running, so not through the asyncio helpers)."""
    api = f"{hub.url}/user/{hub.user}/api"
    answer = page.request.get(f"{api}/sessions")
    assert answer.ok, answer.status
    paths = [s["path"] for s in answer.json()
             if s["type"] == "notebook" and s["kernel"]["id"] == kernel_id]
    assert len(paths) == 1, paths
    answer = page.request.get(f"{api}/contents/{urllib.parse.quote(paths[0])}")
    assert answer.ok, answer.status
    return answer.json()["content"]


