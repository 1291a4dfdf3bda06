"""Real centers' paths: a home (and so a Jupyter runtime directory) far
deeper than a Unix socket address (107 bytes) allows. No socket of a kernel
or of its keeper may depend on that depth: the kernel starts at once, its
websocket works and its output replays after a server kill.

Real parts: jupyter_server as the test user with the persistent-kernel
plugins (tests/harness/servers.py), HOME and JUPYTER_RUNTIME_DIR in a
user-owned directory 120 characters deep, the container kernel and the
host's own python3 kernel on IPC transport; and the whole session through
the hub and the session manager for an account whose home is 120
characters deep on another file system than the store (``chdeep``, made by
scripts/setup-system.sh).
"""
from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import signal
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from chspawner.provisioner.sockets import socket_dir
from chspawner.images.trees import remove_tree
from tests.harness.env import DEEP_USER
from tests.harness.hub import Hub, manager_config, server_state, spawn, stop_server, user_server
from tests.harness.kernel_client import (connect, count_to, execute, kernels_url, read,
                                         reconnect, send, start_cell, start_kernel, warm_up,
                                         without_the_copy)
from tests.harness.net import free_port
from tests.harness.servers import Servers

DEPTH = 120
#: Far less than the 30 s a keeper that can't bind cost each start.
QUICK_START = 15


def deep_dir(base: Path, uid: int, gid: int) -> Path:
    """A user-owned directory whose path is DEPTH characters long."""
    path = base
    while len(str(path)) < DEPTH:
        path = path / ("d" * min(30, DEPTH - len(str(path)) - 1))
        path.mkdir()
        os.chown(path, uid, gid)
    assert len(str(path)) == DEPTH
    return path


@pytest.fixture
def deep_servers(user, user_dir, kernel_store):
    home = deep_dir(user_dir, user.pw_uid, user.pw_gid)
    runtime = home / ".local" / "share" / "jupyter" / "runtime"
    s = Servers(user, user_dir, kernel_store, ["--KernelManager.transport=ipc"],
                env={"HOME": str(home), "JUPYTER_RUNTIME_DIR": str(runtime)})
    s.state_dir = runtime / "chspawner-kernels"  # the default place, 150+ bytes deep
    yield s
    s.close()


def test_a_kernel_in_an_image_starts_at_once_and_replays_with_a_deep_home(deep_servers):
    s = deep_servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            began = time.monotonic()
            kernel = await start_kernel(http, s)
            took = time.monotonic() - began
            keeper = s.records()[kernel]["keeper"]
            session = uuid.uuid4().hex
            ws = await connect(http, s, kernel, session)
            await warm_up(ws)
            # As JupyterLab sends it: the reply to a cell that ends in the gap is
            # rebuilt for its session.
            t = await send(ws, count_to(8, 0.5), session)
            await read(ws, t, lambda t: len(t.numbers) >= 2)
            s.kill()
            await read(ws, t, lambda t: False)  # what was on its way, till it closes
            seen = len(t.numbers)
            await asyncio.to_thread(s.start)
            ws = await connect(http, s, kernel, session)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            await ws.close()
            return took, keeper, t, seen

    took, keeper, t, seen = asyncio.run(scenario())
    assert took < QUICK_START, f"the kernel took {took:.1f} s to start"
    path = keeper.removeprefix("ipc://")
    assert len(path.encode()) <= 107 and not path.startswith(str(s.state_dir)), keeper
    assert without_the_copy(t.numbers, seen) == list(range(1, 9)), t.numbers
    assert t.reply and t.stderr == []


def test_the_servers_own_kernel_on_ipc_works_with_a_deep_runtime_dir(deep_servers):
    s = deep_servers

    async def scenario():
        s.start()
        async with aiohttp.ClientSession(headers=s.headers) as http:
            kernel = await start_kernel(http, s, "python3")
            ws = await connect(http, s, kernel, uuid.uuid4().hex)
            result = await execute(ws, "print('hello from', 6 * 7)")
            await ws.close()
            return result

    status, stdout, ename = asyncio.run(scenario())
    assert (status, ename) == ("ok", None) and "hello from 42" in stdout, (status, stdout)
    # Its sockets are in the user's short private directory, not the runtime dir.
    uid = s.user.pw_uid
    assert any(p.is_socket() and p.name.startswith("kernel-") and p.owner() == s.user.pw_name
               for p in Path(f"/dev/shm/chspawner-{uid}").iterdir())


@pytest.fixture(scope="module")
def deep_hub(kernel_store):
    """The hub with the session manager, for the account whose home is a
    center's: 120 characters deep, on another file system than the store."""
    try:
        deep = pwd.getpwnam(DEEP_USER)
    except KeyError:
        pytest.fail(f"no account {DEEP_USER}: run scripts/setup-system.sh")
    assert len(deep.pw_dir) >= DEPTH, deep.pw_dir
    assert os.stat(deep.pw_dir).st_dev != os.stat(kernel_store).st_dev
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, DEEP_USER, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()))
    yield hub
    hub.stop()
    remove_tree(state)


def test_a_whole_session_through_the_hub_with_a_deep_home(deep_hub):
    """The whole session, as a user of a center with a deep home meets it:
    the spawn (kernels mode), a kernel in the image that starts at once in
    the home's notebook directory, a cell counting while the server is
    killed, the session brought back at the same URL by the session
    manager, every number once."""
    hub = deep_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def scenario():
        async with hub.session() as http:
            began = time.monotonic()
            kernel, url, ws, t = await start_cell(http, hub, count_to(12, 0.5))
            took = time.monotonic() - began
            await read(ws, t, lambda t: len(t.numbers) >= 2)
            pid = (await server_state(hub))["pid"]
            os.kill(pid, signal.SIGKILL)
            await read(ws, t, lambda t: False)  # what was on its way, till it closes
            ws = await reconnect(http, url)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            status, where, _ = await execute(ws, "import os; print(os.getcwd())")
            await ws.close()
            async with http.delete(f"{kernels_url(hub)}/{kernel}") as r:
                assert r.status == 204
            return took, t, status, where.strip()

    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        took, t, status, where = asyncio.run(scenario())
        assert took < QUICK_START, f"the kernel took {took:.1f} s to start"
        assert t.numbers == list(range(1, 13)), t.numbers
        assert t.reply and t.stderr == []
        # Started without a notebook path: in the server's directory, the
        # home, as the container sees it.
        assert (status, where) == ("ok", f"/home/{DEEP_USER}")
        assert asyncio.run(user_server(hub))["ready"]
    finally:
        asyncio.run(stop_server(hub))


@pytest.mark.unit
def test_the_socket_dir_is_short_private_and_refuses_a_squatted_name(request, monkeypatch):
    """A name taken by someone else (here: a symlink, or a directory open
    to others) is passed over, never used."""
    from chspawner.provisioner import sockets
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # (tmp_path is too deep)
    request.addfinalizer(lambda: shutil.rmtree(short))
    first, second = short / "a", short / "b"
    first.mkdir()
    second.mkdir()
    (first / f"chspawner-{os.getuid()}").symlink_to(short)  # planted
    (second / f"chspawner-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(second / f"chspawner-{os.getuid()}", 0o777)  # open to others
    monkeypatch.setattr(sockets, "BASES", (str(first), str(second)))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(sockets.SocketDirError, match="taken by someone else"):
        sockets.socket_dir()
    private = short / "run"
    private.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(private))
    assert sockets.socket_dir() == private
    monkeypatch.setattr(sockets, "BASES", ("/dev/shm",))
    made = socket_dir()
    assert made == Path(f"/dev/shm/chspawner-{os.getuid()}")
    assert made.stat().st_mode & 0o777 == 0o700 and made.stat().st_uid == os.getuid()
