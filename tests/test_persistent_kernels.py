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
import json
import os
import re
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from conftest import AS_USER, VENV_BIN
from test_kernel_server import (KERNEL, execute, execute_request, free_port,
                                wait_listening, warm_up)

from chspawner.persist.kernel_manager import keeper_info

N = 40  # numbers printed, one every 0.5 s: 20 s of output


def count_to(n: int, every: float) -> str:
    return (f"import time\nfor i in range(1, {n + 1}):\n"
            f"    print(i, flush=True)\n    time.sleep({every})\n")


class Servers:
    """Successive jupyter_servers as the test user, sharing one state
    directory (as a server and its replacement do)."""

    def __init__(self, user, user_dir: Path, store: str, extra: list[str],
                 env: dict[str, str] | None = None):
        self.user, self.user_dir, self.store, self.extra = user, user_dir, store, extra
        self.env = env or {}
        self.token = secrets.token_hex(16)
        self.mark = uuid.uuid4().hex  # finds every process these servers started
        self.state_dir = user_dir / "state"
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.count = 0

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def start(self) -> str:
        port = free_port()
        self.count += 1
        log = open(self.user_dir / f"server-{self.count}.log", "wb")
        self.proc = subprocess.Popen(
            [str(AS_USER), self.user.pw_name, "env", f"TMPDIR={self.user_dir}",
             f"CHSPAWNER_TEST_MARK={self.mark}", *[f"{k}={v}" for k, v in self.env.items()],
             str(VENV_BIN / "jupyter-server"), "--no-browser", f"--port={port}",
             "--ip=127.0.0.1", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.user_dir}",
             "--ServerApp.kernel_spec_manager_class="
             "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager",
             f"--ContainerKernelSpecManager.storage={self.store}",
             "--ServerApp.kernel_manager_class="
             "chspawner.persist.kernel_manager.PersistentKernelManager",
             "--ServerApp.kernel_websocket_connection_class="
             "chspawner.persist.kernel_connection.ReplayingKernelConnection",
             "--ServerApp.session_manager_class="
             "chspawner.persist.notebook_sessions.PersistentSessionManager",
             f"--PersistentKernelManager.state_dir={self.state_dir}", *self.extra],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_listening(port, self.proc, lambda: self.log()[-3000:])
        self.base = f"http://127.0.0.1:{port}"
        return self.base

    def log(self) -> str:
        return (self.user_dir / f"server-{self.count}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole server (its process group), not its kernels."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Shut every kernel down on purpose (a server that stops would
        leave them running), stop the server, and fail if a process it
        started is left."""
        try:
            if self.proc and self.proc.poll() is None:
                asyncio.run(shutdown_all(self))
        finally:
            self.stop()
            # Keepers notice their record is gone within a second.
            deadline = time.monotonic() + 10
            while (leftovers := self.marked()) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            assert not leftovers, f"processes left running: {leftovers}"

    def records(self) -> dict[str, dict]:
        if not self.state_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in self.state_dir.glob("*.json")}

    def marked(self) -> list[int]:
        """PIDs of live processes started by these servers (marked env)."""
        found, needle = [], f"CHSPAWNER_TEST_MARK={self.mark}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes() and _running(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def servers(request, user, user_dir, kernel_store):
    marker = request.node.get_closest_marker("server_args")
    s = Servers(user, user_dir, kernel_store, list(marker.args) if marker else [])
    yield s
    s.close()


async def shutdown_all(s: Servers) -> None:
    async with aiohttp.ClientSession(headers=s.headers) as http:
        async with http.get(f"{s.base}/api/kernels") as r:
            kernels = await r.json()
        for kernel in kernels:
            async with http.delete(f"{s.base}/api/kernels/{kernel['id']}") as r:
                assert r.status == 204


# ------------------------------------------------------------ client ---

async def start_kernel(http, s: Servers) -> str:
    async with http.post(f"{s.base}/api/kernels", json={"name": KERNEL}) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["id"]


async def connect(http, s: Servers, kernel: str, session: str):
    url = f"{s.base}/api/kernels/{kernel}/channels?session_id={session}"
    return await http.ws_connect(url.replace("http", "ws", 1))


class Transcript:
    """What one execution sent the client: numbers printed, stderr
    notices, whether the reply and the final idle status came."""

    def __init__(self, msg_id: str):
        self.msg_id = msg_id
        self.numbers: list[int] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.order: list[str] = []  # "n" for a number, "e" for stderr
        self.reply = False
        self.reply_content: dict | None = None
        self.execution_count: int | None = None  # from execute_input
        self.idle = False

    def feed(self, msg: dict) -> None:
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            self.stdout.append(content["text"])
            for line in content["text"].splitlines():
                if line.strip().isdigit():
                    self.numbers.append(int(line))
                    self.order.append("n")
        elif kind == "stream" and content["name"] == "stderr":
            self.stderr.append(content["text"])
            self.order.append("e")
        elif kind == "execute_reply":
            self.reply = content["status"] == "ok"
            self.reply_content = content
        elif kind == "execute_input":
            self.execution_count = content["execution_count"]
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle = True


def without_the_copy(numbers: list[int], seen_by_first: int) -> list[int]:
    """``numbers`` less the one copy a client straight on the server (no
    session proxy) may get after a kill: the message sent at the instant
    of the kill, before it was recorded as sent, comes again first from
    the next server. Anything else repeated, missing or out of order stays."""
    numbers = list(numbers)
    cut = seen_by_first
    if 0 < cut < len(numbers) and numbers[cut] == numbers[cut - 1]:
        del numbers[cut]
    return numbers


async def read(ws, transcript: Transcript, until, timeout: float = 60) -> None:
    """Feed ``transcript`` from ``ws`` until ``until(transcript)`` holds or
    the socket closes."""
    async with asyncio.timeout(timeout):
        while not until(transcript):
            frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                return  # closed: the server is gone
            transcript.feed(json.loads(frame.data))


async def send(ws, code: str, session: str | None = None) -> Transcript:
    request = execute_request(code, session)
    await ws.send_str(json.dumps(request))
    return Transcript(request["header"]["msg_id"])


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
            await asyncio.to_thread(wait_for, lambda: asyncio.run(keeper_info(address))
                                    ["last_seq"] >= start + 4, 30, "output during the gap")
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
            await asyncio.to_thread(wait_for, lambda: (asyncio.run(keeper_info(address))
                                    ["execution_state"] == "idle"), 60, "the cell to end")
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
            await asyncio.to_thread(wait_for, lambda: (asyncio.run(keeper_info(address))
                                    ["execution_state"] == "idle"), 60, "the burst to end")
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
            assert _running(record["provisioner_info"]["pid"]) and _running(keeper)
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
    wait_for(lambda: not _running(keeper), 10, "the keeper to exit")
    wait_for(lambda: not _running(record["provisioner_info"]["pid"]), 10, "the kernel to end")
    assert not Path(record["keeper"].removeprefix("ipc://")).exists()
    s.stop()
    wait_for(lambda: not s.marked(), 10, "no process left")


@pytest.mark.parametrize("name", ["", "a", "b", "x" * 200 + " é/.."])
def test_each_named_server_has_a_state_directory_of_its_own(tmp_path, monkeypatch, name):
    """JupyterHub's named servers of one user: the default one keeps the
    directory it always had; each named one gets its own, whatever its
    name, with keeper socket paths short enough for a Unix socket."""
    from chspawner.persist.kernel_manager import PersistentKernelManager
    from chspawner.persist.records import state_dir_name
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", name)
    manager = PersistentKernelManager()
    state = Path(manager.state_dir)
    assert state.parent == tmp_path and state.is_dir()
    assert (state.name == "chspawner-kernels") == (name == "")
    others = {state_dir_name(n) for n in ("", "a", "b", "x" * 200 + " é/..") if n != name}
    assert state.name not in others
    keeper = manager.records.keeper_address(str(uuid.uuid4())).removeprefix("ipc://")
    assert Path(keeper).parent == state
    # A home of 20 characters leaves room in a socket address (107 bytes).
    home = "/home/" + "u" * 14
    assert len(f"{home}/.local/share/jupyter/runtime/{state.name}/"
               f"{Path(keeper).name}") <= 107
