"""Real centers' paths: a home (and so a Jupyter runtime directory) far
deeper than a Unix socket address (107 bytes) allows. No socket of a kernel
or of its keeper may depend on that depth: the kernel starts at once, its
websocket works and its output replays after a server kill.

Real parts: jupyter_server as the test user with the persistent-kernel
plugins (tests/harness/servers.py), HOME and JUPYTER_RUNTIME_DIR in a
user-owned directory 120 characters deep, the container kernel and the
host's own python3 kernel on IPC transport.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from chspawner.provisioner.sockets import socket_dir
from tests.harness.kernel_client import (connect, count_to, execute, read, send,
                                         start_kernel, warm_up, without_the_copy)
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
