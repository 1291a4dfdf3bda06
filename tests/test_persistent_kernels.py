"""Persistence level L2 for kernels: a kernel in an image outlives its
Jupyter server, and its output produced while no server (or no browser)
is attached reaches the client on reconnect, all of it, in order (the
client here talks to the server straight, without the session proxy that
drops the copy of a message in flight at a kill: see without_the_copy).

Real parts: jupyter_server as the unprivileged user with
PersistentKernelManager, the replaying websocket connection, the container
kernel ``chspawner-deb--python3``, and a websocket client (aiohttp)
speaking the Jupyter kernel protocol. The server is killed with SIGKILL,
the way a lost container or node takes it.
"""
from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import aiohttp
import pytest

from chspawner.persist.kernel_manager import keeper_info
from tests.harness.kernel_client import (KERNEL, N, Transcript, connect, count_to,
                                         execute, read, send, start_kernel, warm_up,
                                         without_the_copy)
from tests.harness.procs import running
from tests.harness.servers import Servers
from tests.harness.wait import wait_until


@pytest.fixture
def servers(request, user, user_dir, kernel_store):
    marker = request.node.get_closest_marker("server_args")
    s = Servers(user, user_dir, kernel_store, list(marker.args) if marker else [])
    yield s
    s.close()


async def leave_mid_cell(http, s: Servers, code: str, as_lab: bool = False):
    """Run ``code`` (which prints 'start' first) in a new kernel; once it
    has printed, close the websocket and kill the server. Returns the
    kernel, the client session id, the keeper's address and the transcript.
    ``as_lab``: the requests' headers carry the session id, as JupyterLab's do."""
    kernel = await start_kernel(http, s)
    session = uuid.uuid4().hex
    ws = await connect(http, s, kernel, session)
    await warm_up(ws)
    address = s.records()[kernel]["keeper"]
    t = await send(ws, code, session if as_lab else None)
    await read(ws, t, lambda t: "start" in "".join(t.stdout), timeout=30)
    await ws.close()
    s.kill()
    return kernel, session, address, t


# ------------------------------------------------------------- tests ---

async def kill_mid_cell(s: Servers, disconnect_first: bool) -> tuple[Transcript, dict, dict]:
    s.start()
    async with aiohttp.ClientSession(headers=s.headers) as http:
        kernel = await start_kernel(http, s)
        session = uuid.uuid4().hex
        ws = await connect(http, s, kernel, session)
        await warm_up(ws)
        before = s.records()[kernel]
        t = await send(ws, count_to(N, 0.5))
        await read(ws, t, lambda t: len(t.numbers) >= 3)
        if disconnect_first:
            await ws.close()
        s.kill()
        await read(ws, t, lambda t: False)  # whatever was on its way, till it closes
        seen_by_first = len(t.numbers)
        if disconnect_first:  # the whole gap without a browser: output piles up
            address = before["keeper"]
            start = (await keeper_info(address))["last_seq"]
            await asyncio.to_thread(wait_until, lambda: asyncio.run(keeper_info(address))
                                    ["last_seq"] >= start + 4, "output during the gap", 30)
        await asyncio.to_thread(s.start)
        ws = await connect(http, s, kernel, session)
        await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
        await ws.close()
        after = s.records()[kernel]
        return t, before, after | {"seen_by_first": seen_by_first}


def test_kernel_output_survives_a_server_kill(servers):
    """Every number, in order. Straight to the server, as here, the message
    the kill caught between being sent and being recorded as sent comes
    again from the next server: the first one the client gets from it may
    repeat the last one it got before. Through the session proxy, which
    drops that copy, every number comes once (test_session_manager)."""
    t, before, after = asyncio.run(kill_mid_cell(servers, disconnect_first=False))
    assert without_the_copy(t.numbers, after["seen_by_first"]) == list(range(1, N + 1)), \
        t.numbers
    assert t.reply and t.stderr == []
    # The same kernel, re-adopted: same PID, same ports.
    assert after["provisioner_info"]["pid"] == before["provisioner_info"]["pid"]
    assert after["connection_info"] == before["connection_info"]
    assert after["seen_by_first"] < N


def test_nothing_lost_with_the_browser_away_for_the_whole_gap(servers):
    t, _, after = asyncio.run(kill_mid_cell(servers, disconnect_first=True))
    assert t.numbers == list(range(1, N + 1)), t.numbers
    assert t.reply and t.stderr == []
    assert after["seen_by_first"] < N


def test_a_reloaded_notebook_finds_its_kernel_on_the_next_server(servers):
    """What a browser does after a reload or a new login, against the
    server that replaced a killed one: it lists the sessions, finds its
    notebook's, and talks to that kernel, whose state is still there."""
    s = servers

    async def scenario() -> tuple[dict, list, str]:
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            async with http.post(f"{s.base}/api/sessions", json={
                    "path": "analysis.ipynb", "name": "analysis.ipynb", "type": "notebook",
                    "kernel": {"name": KERNEL}}) as r:
                assert r.status == 201, await r.text()
                before = await r.json()
            ws = await connect(http, s, before["kernel"]["id"], uuid.uuid4().hex)
            assert (await execute(ws, "answer = 6 * 7"))[0] == "ok"
            await ws.close()
            s.kill()
            await asyncio.to_thread(s.start)
            async with http.get(f"{s.base}/api/sessions") as r:
                after = await r.json()
            # A new page: a client session id of its own.
            ws = await connect(http, s, after[0]["kernel"]["id"], uuid.uuid4().hex)
            status, out, _ = await execute(ws, "print(answer)")
            await ws.close()
            return before, after, out
    before, after, out = asyncio.run(scenario())
    assert [(x["id"], x["path"], x["kernel"]["id"]) for x in after] == [
        (before["id"], "analysis.ipynb", before["kernel"]["id"])]
    assert out.strip() == "42"


@pytest.mark.parametrize("ending", ["ok", "error"])
def test_a_cell_that_ends_while_no_server_runs_still_gets_its_reply(servers, ending):
    """The kernel's reply went to the killed server; the next one rebuilds it
    from the replayed output (count, error), so the notebook marks the cell
    done -- JupyterLab waits for both the reply and the idle status."""
    s = servers
    last = "print('end', flush=True)" if ending == "ok" else "1 / 0"
    code = f"import time\nprint('start', flush=True)\ntime.sleep(3)\n{last}\n"

    async def scenario() -> Transcript:
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel, session, address, t = await leave_mid_cell(http, s, code, as_lab=True)
            # The cell ends while no server runs.
            await asyncio.to_thread(wait_until, lambda: (asyncio.run(keeper_info(address))
                                    ["execution_state"] == "idle"), "the cell to end", 60)
            await asyncio.to_thread(s.start)
            ws = await connect(http, s, kernel, session)
            await read(ws, t, lambda t: t.reply_content is not None and t.idle, timeout=60)
            await ws.close()
            return t
    t = asyncio.run(scenario())
    assert t.reply_content["status"] == ending
    assert t.reply_content["execution_count"] == t.execution_count is not None
    if ending == "error":
        assert t.reply_content["ename"] == "ZeroDivisionError"
    else:
        assert "".join(t.stdout).split() == ["start", "end"]


BURST = 200


def burst_during_gap(s: Servers) -> tuple[Transcript, dict, dict, str]:
    """A cell waits (on a file, with a deadline) until its client is away
    and the server killed, then prints BURST numbers, one message each, and
    ends; then a new server starts and the client comes back. Returns the
    transcript, the keeper's info before and after the return, and the
    client session id."""
    flag = f"burst-{uuid.uuid4().hex}"
    code = (f"import os, time\nprint('start', flush=True)\n"
            f"deadline = time.monotonic() + 60\n"
            f"while not (os.path.exists('/tmp/{flag}') or "
            f"os.path.exists('{s.user_dir}/{flag}')) and time.monotonic() < deadline:\n"
            f"    time.sleep(0.02)\n"
            f"for i in range(1, {BURST + 1}):\n    print(i, flush=True)\n")

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel, session, address, t = await leave_mid_cell(http, s, code)
            (s.user_dir / flag).write_text("")
            os.chmod(s.user_dir / flag, 0o644)
            # The kernel finishes during the gap.
            await asyncio.to_thread(wait_until, lambda: (asyncio.run(keeper_info(address))
                                    ["execution_state"] == "idle"), "the burst to end", 60)
            held = await keeper_info(address)
            await asyncio.to_thread(s.start)
            ws = await connect(http, s, kernel, session)
            await read(ws, t, lambda t: t.idle, timeout=60)
            await ws.close()
            return t, held, await keeper_info(address), session
    return asyncio.run(scenario())


@pytest.mark.server_args("--PersistentKernelManager.buffer_messages=30")
def test_a_gap_longer_than_the_buffer_is_reported(servers):
    t, held, after, session = burst_during_gap(servers)
    assert held["held"] == 30
    assert len(t.stderr) == 1 and t.order[0] == "e", t.order
    lost = int(re.search(r"(\d+) kernel output message\(s\) were lost", t.stderr[0])[1])
    assert "keeps only the last 30 messages" in t.stderr[0]
    # What remains is the tail, contiguous, each number once.
    assert t.numbers == list(range(t.numbers[0], BURST + 1)) and t.numbers[0] > 1
    # Lost: from the client's last message to the buffer's oldest when it
    # came back (the server's own kernel_info requests add a few messages).
    acked = held["sessions"][session]
    assert held["oldest_seq"] - acked - 1 <= lost <= after["oldest_seq"] - acked - 1


@pytest.mark.server_args("--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=20")
def test_a_replay_is_not_held_to_the_iopub_rate_limit(servers):
    """BURST messages replayed at once are far above 20 a second: stock
    jupyter_server would drop most of them (and say so); a replay is what
    piled up during a gap, and all of it arrives."""
    t, *_ = burst_during_gap(servers)
    assert t.numbers == list(range(1, BURST + 1)), t.numbers
    assert t.stderr == []


@pytest.mark.server_args("--PersistentKernelManager.keep_kernels_on_shutdown=True")
def test_shutdown_on_purpose_ends_kernel_and_keeper_and_stop_keeps_kernels(servers):
    s = servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s)
            record = s.records()[kernel]
            keeper = (await keeper_info(record["keeper"]))["pid"]
            # A normal stop (SIGTERM) leaves the kernel for the next server.
            await asyncio.to_thread(s.stop)
            assert running(record["provisioner_info"]["pid"]) and running(keeper)
            await asyncio.to_thread(s.start)
            async with http.get(f"{s.base}/api/kernels") as r:
                listed = [k["id"] for k in await r.json()]
            ws = await connect(http, s, kernel, uuid.uuid4().hex)
            await warm_up(ws)
            t = await send(ws, "print(1)")
            # IOPub comes through the keeper, one hop more than the reply.
            await read(ws, t, lambda t: t.reply and t.idle)
            await ws.close()
            async with http.delete(f"{s.base}/api/kernels/{kernel}") as r:
                assert r.status == 204
            return kernel, record, keeper, listed, t

    kernel, record, keeper, listed, t = asyncio.run(scenario())
    assert listed == [kernel] and t.numbers == [1]
    assert kernel not in s.records()
    wait_until(lambda: not running(keeper), "the keeper to exit", 10)
    wait_until(lambda: not running(record["provisioner_info"]["pid"]), "the kernel to end", 10)
    assert not Path(record["keeper"].removeprefix("ipc://")).exists()
    s.stop()
    wait_until(lambda: not s.marked(), "no process left", 10)


@pytest.mark.parametrize("name", ["", "a", "b", "x" * 200 + " é/.."])
def test_each_named_server_has_a_state_directory_of_its_own(tmp_path, monkeypatch, name):
    """JupyterHub's named servers of one user: the default one keeps the
    directory it always had; each named one gets its own, whatever its
    name, with keeper socket paths short enough for a Unix socket."""
    from chspawner.persist.kernel_manager import PersistentKernelManager
    from chspawner.persist.records import KernelRecords, state_dir_name
    from chspawner.provisioner.sockets import socket_dir
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", name)
    manager = PersistentKernelManager()
    state = Path(manager.state_dir)
    assert state.parent == tmp_path and state.is_dir()
    assert (state.name == "chspawner-kernels") == (name == "")
    others = {state_dir_name(n) for n in ("", "a", "b", "x" * 200 + " é/..") if n != name}
    assert state.name not in others
    kernel = str(uuid.uuid4())
    keeper = manager.records.keeper_address(kernel).removeprefix("ipc://")
    # In the user's short private socket directory, whatever the depth of
    # the state directory, and one of its own for each server's kernel.
    assert Path(keeper).parent == socket_dir() and len(keeper.encode()) <= 107
    others = {KernelRecords(tmp_path / state_dir_name(n)).keeper_address(kernel)
              for n in ("", "a", "b", "x" * 200 + " é/..") if n != name}
    assert f"ipc://{keeper}" not in others
