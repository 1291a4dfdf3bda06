"""Output written into the notebook on the server while no page holds the
kernel (issue 16, protocol section 4): the page closes mid-cell, the cell
goes on printing, and the saved notebook on disk ends up with every line
of the cell exactly once, its execution count, and the kernel's seq it
holds up to -- also across a server killed and replaced mid-cell with no
page; and the admin's bound on stored outputs says, in the cell, what it
dropped.

Real parts: jupyter_server as the unprivileged user with the persist
plugins (kernel manager, websocket connection, notebook sessions), the
container kernel ``chspawner-deb--python3`` and its keeper, the server's
contents manager writing the notebook; the page is a websocket client
(aiohttp) speaking the Jupyter kernel protocol as JupyterLab does (the
cell's id in the execute_request's ``metadata.cellId``).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp
import nbformat
import pytest

from chspawner.persist.kernel_manager import keeper_info
from tests.harness.kernel_client import (KERNEL, Transcript, connect, count_to,
                                         execute_request, read, warm_up)
from tests.harness.servers import Servers
from tests.harness.wait import wait_until


@pytest.fixture
def servers(request, user, user_dir, kernel_store):
    marker = request.node.get_closest_marker("server_args")
    s = Servers(user, user_dir, kernel_store, list(marker.args) if marker else [])
    yield s
    s.close()


async def open_notebook(http: aiohttp.ClientSession, s: Servers, name: str,
                        sources: list[str]) -> tuple[str, list[str]]:
    """A notebook made through the contents API and a session (kernel) for
    it, as JupyterLab opens one: the kernel's id and the cells' ids."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in sources])
    async with http.put(f"{s.base}/api/contents/{name}", json={
            "type": "notebook", "format": "json", "content": nb}) as r:
        assert r.status in (200, 201), await r.text()
    async with http.post(f"{s.base}/api/sessions", json={
            "path": name, "name": name, "type": "notebook", "kernel": {"name": KERNEL}}) as r:
        assert r.status == 201, (await r.text()) + s.log()[-4000:]
        kernel = (await r.json())["kernel"]["id"]
    return kernel, [c["id"] for c in nb.cells]


async def run_cell(ws, code: str, cell_id: str, session: str) -> Transcript:
    """An execute_request as JupyterLab sends it: the cell's id in its metadata."""
    request = execute_request(code, session)
    request["metadata"] = {"cellId": cell_id, "deletedCells": [], "recordTiming": False}
    await ws.send_str(json.dumps(request))
    return Transcript(request["header"]["msg_id"])


def saved(path: Path) -> dict:
    """The notebook as it is on disk ({} while it is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cell_of(nb: dict, cell_id: str) -> dict:
    return next(c for c in nb.get("cells", []) if c.get("id") == cell_id)


def printed(cell: dict, name: str = "stdout") -> list[int]:
    text = "".join("".join(o["text"]) for o in cell["outputs"]
                   if o["output_type"] == "stream" and o["name"] == name)
    return [int(line) for line in text.splitlines() if line.strip().isdigit()]


def holds(nb: dict, kernel: str) -> int:
    outputs = nb.get("metadata", {}).get("chspawner", {}).get("outputs", {})
    return outputs.get("seq", 0) if outputs.get("kernel_id") == kernel else 0


async def until_written_to_the_end(s: Servers, kernel: str, path: Path,
                                   cell: str = "", last: int = 0) -> dict:
    """Once the cell has ended (the keeper saw the kernel idle), until the
    notebook holds the kernel's output up to its last message (and, given
    ``cell``, until that cell's last number printed is ``last``: the kernel
    is also idle for a moment when a new server asks it for its info on
    the control channel, mid-cell)."""
    address = s.records()[kernel]["keeper"]

    def done():
        info = asyncio.run(keeper_info(address))
        nb = saved(path)
        if cell and printed(next((c for c in nb.get("cells", []) if c.get("id") == cell),
                                 {"outputs": []}))[-1:] != [last]:
            return False
        return info and info["execution_state"] == "idle" and \
            holds(nb, kernel) >= info["last_seq"] and nb
    try:
        return await asyncio.to_thread(wait_until, done,
                                       "the notebook written to the cell's end", 90, 0.2)
    except AssertionError as error:
        raise AssertionError(f"{error}; on disk: {saved(path)}; the server's log: "
                             f"{s.log()[-4000:]}") from None


N = 40


@pytest.mark.parametrize("leaving", [
    "closed",  # the tab closed (close code 1000): written at once
    # The connection broken, no close frame (the network cut): written
    # once it has stayed away notebook_write_after seconds.
    pytest.param("broken", marks=pytest.mark.server_args(
        "--PersistentKernelManager.notebook_write_after=2")),
])
def test_a_page_gone_mid_cell_leaves_the_whole_output_in_the_saved_notebook(servers, leaving):
    s = servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel, (cell,) = await open_notebook(http, s, "count.ipynb", [count_to(N, 0.2)])
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            t = await run_cell(ws, count_to(N, 0.2), cell, session)
            await read(ws, t, lambda t: len(t.numbers) >= 3, timeout=60)
            if leaving == "closed":
                await ws.close()  # code 1000, mid-cell
            else:
                ws._conn.transport.abort()  # (aiohttp has no public way to cut it)
            nb = await until_written_to_the_end(s, kernel, s.user_dir / "count.ipynb", cell, N)
            return kernel, cell, t, nb
    kernel, cell, t, nb = asyncio.run(scenario())
    assert len(t.numbers) < N  # (the page left before the end)
    written = cell_of(nb, cell)
    assert printed(written) == list(range(1, N + 1))
    assert written["execution_count"] == t.execution_count is not None
    assert nb["metadata"]["chspawner"]["outputs"]["kernel_id"] == kernel
    assert not any(o.get("name") == "stderr" for o in written["outputs"])
    nbformat.validate(nbformat.from_dict(nb))


def test_a_server_killed_mid_cell_with_no_page_and_the_next_resumes_the_writing(servers):
    """The first server writes part of the cell's output, is killed; the
    next one resumes from what the notebook holds: nothing twice, nothing
    missing."""
    s = servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            code = count_to(N, 0.25)
            kernel, (cell,) = await open_notebook(http, s, "restart.ipynb", [code])
            path = s.user_dir / "restart.ipynb"
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            t = await run_cell(ws, code, cell, session)
            await read(ws, t, lambda t: len(t.numbers) >= 2, timeout=60)
            await ws.close()
            first = await asyncio.to_thread(
                wait_until, lambda: holds(saved(path), kernel) and saved(path),
                "the first server's first write", 60, 0.1)
            s.kill()
            before_kill = printed(cell_of(first, cell))
            await asyncio.to_thread(s.start)
            nb = await until_written_to_the_end(s, kernel, path, cell, N)
            return cell, t, before_kill, nb
    cell, t, before_kill, nb = asyncio.run(scenario())
    assert 0 < len(before_kill) < N, before_kill  # killed mid-cell, after a write
    written = cell_of(nb, cell)
    assert printed(written) == list(range(1, N + 1))
    assert written["execution_count"] == t.execution_count is not None


@pytest.mark.server_args("--PersistentKernelManager.notebook_outputs_per_cell=5")
def test_beyond_the_bound_the_notebook_says_what_was_dropped(servers):
    s = servers
    code = ("import time\nfrom IPython.display import display\nprint('start', flush=True)\n"
            "time.sleep(1)\nfor i in range(20):\n    display(i)\n")

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel, (cell,) = await open_notebook(http, s, "many.ipynb", [code])
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            t = await run_cell(ws, code, cell, session)
            await read(ws, t, lambda t: "start" in "".join(t.stdout), timeout=60)
            await ws.close()
            return cell, await until_written_to_the_end(s, kernel, s.user_dir / "many.ipynb")
    cell, nb = asyncio.run(scenario())
    outputs = cell_of(nb, cell)["outputs"]
    notice = "".join(outputs[0]["text"])
    assert outputs[0]["name"] == "stderr" and notice.startswith("[chspawner] ")
    assert "(16 whole output(s))" in notice and "at most 5 outputs" in notice, notice
    assert ["".join(o["data"]["text/plain"]) for o in outputs[1:]] == [
        "15", "16", "17", "18", "19"]


def test_a_page_that_comes_back_stops_the_writing_and_its_leaving_resumes_it(servers):
    """A reload mid-cell: the first page goes (the server writes), the
    reloaded page (a new client session) connects (the server stops
    writing: the page has the notebook open), and leaves before the cell
    ends; the notebook then holds the whole cell, once."""
    s = servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            code = count_to(N, 0.2)
            kernel, (cell,) = await open_notebook(http, s, "reload.ipynb", [code])
            path = s.user_dir / "reload.ipynb"
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            t = await run_cell(ws, code, cell, session)
            await read(ws, t, lambda t: len(t.numbers) >= 2, timeout=60)
            await ws.close()
            await asyncio.to_thread(wait_until, lambda: holds(saved(path), kernel),
                                    "the first write", 60, 0.1)
            again = await connect(http, s, kernel, uuid.uuid4().hex)  # the reloaded page
            await asyncio.to_thread(
                wait_until, lambda: f"a page holds kernel {kernel} again" in s.log(),
                "the writing to stop", 30, 0.1)
            stopped_at = holds(saved(path), kernel)
            seen = Transcript(t.msg_id)
            await read(again, seen, lambda t: len(t.numbers) >= 1, timeout=60)
            await again.close()
            nb = await until_written_to_the_end(s, kernel, path, cell, N)
            return cell, t, stopped_at, nb
    cell, t, stopped_at, nb = asyncio.run(scenario())
    written = cell_of(nb, cell)
    assert printed(written) == list(range(1, N + 1))
    assert written["execution_count"] == t.execution_count is not None
    assert holds(nb, nb["metadata"]["chspawner"]["outputs"]["kernel_id"]) > stopped_at
