"""One user's servers are safe from another user, and from each other.

* A server proves it is the user's own before the hub routes to it: another
  user (``other_user``, chtest2) listening first on the port the spawner
  picks gets no connection, let alone the user's browser, and the spawn
  fails with a clear message -- for ChSpawner on the hub's host and for
  SlurmChSpawner on a node (the real one-node Slurm of tests/slurm.py).
* Two named servers of one user have kernels of their own: neither adopts
  the other's, and stopping one leaves the other's kernels running.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import textwrap
from pathlib import Path

import pytest

from chspawner.persist.records import state_dir_name
from chspawner.spawners.listening import MINE, NONE, TAKEN, port_owner, read_report, write_report
from tests.harness.env import AS_USER, VENV_BIN
from tests.harness.hub import Hub, spawn, user_server
from tests.harness.kernel_client import KERNEL, execute, warm_up
from tests.harness.net import free_port
from tests.harness.wait import wait_until

SQUAT = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
while True:
    c, peer = s.accept()
    print("accepted", peer, c.recv(200), flush=True)
    c.close()
"""


class Squatter:
    """Another user's process listening on a port (all addresses), which
    records every connection it gets."""

    def __init__(self, user: str, port: int):
        self.port = port
        self.proc = subprocess.Popen([str(AS_USER), user, "/usr/bin/python3", "-c", SQUAT,
                                      str(port)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "listening"

    def close(self) -> str:
        """Stop it: what it received (nothing, we hope)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return out


@pytest.fixture
def squatter(other_user):
    squatters = []

    def squat(port: int) -> Squatter:
        squatters.append(Squatter(other_user.pw_name, port))
        return squatters[-1]
    yield squat
    for s in squatters:
        if s.proc.poll() is None:
            s.close()


# --------------------------------------------------------- the module ----

def test_port_owner_reads_the_socket_tables(squatter, other_user):
    port = free_port()
    assert port_owner(port, other_user.pw_uid) == NONE
    s = squatter(port)
    assert port_owner(port, other_user.pw_uid) == MINE
    assert port_owner(port, 0) == TAKEN  # (root's own listener would be MINE)
    assert s.close() == ""  # nothing connected to find out
    assert port_owner(port, other_user.pw_uid) == NONE


def test_a_report_counts_only_from_its_owner_and_spawn(tmp_path, user, other_user):
    path = tmp_path / "report.json"
    good = {"nonce": "n1", "node": "x", "port": 1, "status": MINE}
    write_report(path, good)
    os.chown(path, user.pw_uid, user.pw_gid)
    assert read_report(path, user.pw_uid, "n1") == good
    assert read_report(path, user.pw_uid, "n0") is None           # another spawn's
    assert read_report(path, other_user.pw_uid, "n1") is None     # not theirs
    path.chmod(0o622)
    assert read_report(path, user.pw_uid, "n1") is None           # others may write it
    path.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    assert read_report(link, user.pw_uid, "n1") is None           # a link
    os.mkfifo(tmp_path / "fifo")
    assert read_report(tmp_path / "fifo", 0, "n1") is None        # (doesn't block)


def test_the_jobs_check_reports_whose_listener_it_is(tmp_path, user, other_user, squatter):
    """``python -m chspawner.spawners.listening`` as the user: 'taken' for another
    user's listener, 'mine' for their own; the nonce from the environment."""
    reports = Path(pwd.getpwnam(user.pw_name).pw_dir, ".cache/chspawner-test")

    def check(port: int, nonce: str) -> dict | None:
        path = reports / f"{nonce}.json"
        subprocess.run([str(AS_USER), user.pw_name, "env", f"CHSPAWNER_SPAWN_NONCE={nonce}",
                        str(VENV_BIN / "python"), "-m", "chspawner.spawners.listening", "--port",
                        str(port), "--report", str(path), "--timeout", "10"], check=True)
        return read_report(path, user.pw_uid, nonce)
    try:
        port = free_port()
        taken = squatter(port)
        assert check(port, "t1") == {"nonce": "t1", "node": os.uname().nodename,
                                     "port": port, "status": TAKEN}
        assert taken.close() == ""
        own = subprocess.Popen([str(AS_USER), user.pw_name, "/usr/bin/python3", "-c", SQUAT,
                                str(port)], stdout=subprocess.PIPE, text=True)
        try:
            assert own.stdout.readline().strip() == "listening"
            assert check(port, "m1")["status"] == MINE
        finally:
            own.terminate()
            own.wait()
    finally:
        subprocess.run(["rm", "-rf", str(reports)], check=False)


# ------------------------------------------- a port held by another user ----

def failed_spawn(hub: Hub) -> list[str]:
    """Spawn, expecting a failure: the progress events."""
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    if "ready" not in result:
        # It failed before the progress was asked for, and the hub was
        # still cleaning up (it then answers 400 "not starting"): ask again.
        result["events"] = asyncio.run(final_event(hub))
    assert result["events"] and "ready" not in result["events"][-1], \
        (result, hub.log()[-3000:])
    return result["events"]


async def final_event(hub: Hub) -> list[str]:
    api = f"{hub.url}/hub/api/users/{hub.user}/server/progress"
    async with hub.session() as http, asyncio.timeout(30):
        while True:
            async with http.get(api) as r:
                if r.status == 200:
                    return [json.loads(line[5:])["message"] async for line in r.content
                            if line.startswith(b"data:")]
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def port_hub(user, kernel_store):
    """A hub that starts the user's server on a port known in advance."""
    port = free_port()
    hub = Hub(kernel_store, user.pw_name, extra_config=f"\nc.Spawner.port = {port}\n")
    hub.server_port = port
    yield hub
    hub.stop()


def test_local_spawn_refuses_another_users_listener(port_hub, squatter):
    """chtest2 listens first on the user's port: the spawn fails, saying
    so, and chtest2's process gets no connection (before, the hub took it
    for the user's server and sent it the user's requests)."""
    s = squatter(port_hub.server_port)
    events = failed_spawn(port_hub)
    assert events[-1].startswith(f"Spawn failed: port {port_hub.server_port} on "
                                 f"{os.uname().nodename} is taken by another user's "
                                 "process"), events
    assert "ask them to free it" in events[-1]  # (the admin set the port)
    assert not asyncio.run(user_server(port_hub))
    assert s.close() == ""


@pytest.fixture(scope="module")
def slurm_port_hub(user, kernel_store, slurm):
    port = free_port()
    hub = Hub(kernel_store, user.pw_name, extra_config=textwrap.dedent(f"""
        c.JupyterHub.spawner_class = "slurmchspawner"
        c.SlurmChSpawner.slurm_env = {slurm.env!r}
        c.SlurmChSpawner.partitions = ["{slurm.partition}"]
        c.Spawner.port = {port}
    """))
    hub.server_port = port
    yield hub
    hub.stop()


def test_slurm_spawn_refuses_another_users_listener_on_the_node(slurm_port_hub, slurm,
                                                                squatter, user):
    """The same on a compute node: the job's check sees chtest2's listener
    there, the hub routes nothing to it and the job is cancelled."""
    s = squatter(slurm_port_hub.server_port)
    events = failed_spawn(slurm_port_hub)
    assert any(e.startswith("submitted Slurm job") for e in events), events
    assert events[-1].startswith(f"Spawn failed: port {slurm_port_hub.server_port} on node "
                                 f"{slurm.node} is taken by another user's process"), events
    assert not asyncio.run(user_server(slurm_port_hub))
    wait_until(lambda: not slurm.jobs(user.pw_name, "jupyterhub-"), "the job to go")
    assert s.close() == ""


# ------------------------------------------- named servers, own kernels ----

@pytest.fixture(scope="module")
def named_hub(user, kernel_store):
    hub = Hub(kernel_store, user.pw_name,
              extra_config="\nc.JupyterHub.allow_named_servers = True\n")
    yield hub
    for name in ("a", "b"):
        asyncio.run(stop_named(hub, name))
    hub.stop()


async def spawn_named(hub: Hub, name: str) -> None:
    api = f"{hub.url}/hub/api/users/{hub.user}"
    async with hub.session() as http:
        async with http.post(api, json={}) as r:
            assert r.status in (201, 409), await r.text()
        async with http.post(f"{api}/servers/{name}",
                             json={"image": "deb", "mode": "kernels"}) as r:
            assert r.status in (201, 202), await r.text()
        async with asyncio.timeout(180):
            async with http.get(f"{api}/servers/{name}/progress") as stream:
                async for line in stream.content:
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if event.get("failed"):
                            raise AssertionError(event)
                        if event.get("ready"):
                            return


async def stop_named(hub: Hub, name: str) -> None:
    api = f"{hub.url}/hub/api/users/{hub.user}"
    async with hub.session() as http:
        async with http.delete(f"{api}/servers/{name}") as r:
            assert r.status in (202, 204, 404), await r.text()
        async with asyncio.timeout(60):
            while True:
                async with http.get(api) as r:
                    if name not in (await r.json())["servers"]:
                        return
                await asyncio.sleep(0.2)


async def kernels(hub: Hub, name: str) -> list[str]:
    async with hub.session() as http:
        async with http.get(f"{hub.url}/user/{hub.user}/{name}/api/kernels") as r:
            assert r.status == 200, await r.text()
            return [k["id"] for k in await r.json()]


async def new_kernel(hub: Hub, name: str) -> str:
    async with hub.session() as http:
        async with http.post(f"{hub.url}/user/{hub.user}/{name}/api/kernels",
                             json={"name": KERNEL}) as r:
            assert r.status == 201, await r.text()
            return (await r.json())["id"]


async def run_in(hub: Hub, name: str, kernel: str, code: str) -> tuple:
    url = f"{hub.url}/user/{hub.user}/{name}/api/kernels/{kernel}/channels"
    async with hub.session() as http:
        async with http.ws_connect(url.replace("http", "ws")) as ws:
            await warm_up(ws)
            return await execute(ws, code)


def records(user: str, name: str) -> list[str]:
    runtime = Path(pwd.getpwnam(user).pw_dir, ".local/share/jupyter/runtime")
    return [p.stem for p in (runtime / state_dir_name(name)).glob("*.json")]


def test_named_servers_keep_their_kernels_apart(named_hub):
    hub = named_hub
    asyncio.run(spawn_named(hub, "a"))
    ka = asyncio.run(new_kernel(hub, "a"))
    asyncio.run(run_in(hub, "a", ka, "x = 'a'"))
    asyncio.run(spawn_named(hub, "b"))
    # The second server did not take the first one's kernel over.
    assert asyncio.run(kernels(hub, "b")) == []
    kb = asyncio.run(new_kernel(hub, "b"))
    assert asyncio.run(kernels(hub, "a")) == [ka]
    assert records(hub.user, "a") == [ka] and records(hub.user, "b") == [kb]

    # Stopping a shuts its kernel down, and only its.
    asyncio.run(stop_named(hub, "a"))
    wait_until(lambda: not records(hub.user, "a"), "a's kernel to be shut down", 30)
    assert records(hub.user, "b") == [kb]
    assert asyncio.run(kernels(hub, "b")) == [kb]
    assert asyncio.run(run_in(hub, "b", kb, "print('b lives')")) == ("ok", "b lives\n", None)

    # a, started again, has none: b's kernel stays b's.
    asyncio.run(spawn_named(hub, "a"))
    assert asyncio.run(kernels(hub, "a")) == []
    assert asyncio.run(kernels(hub, "b")) == [kb]


def test_a_new_port_for_each_spawn_unless_the_admin_set_one():
    """A port found taken is not tried again by the next spawn."""
    from chspawner.spawners import ChSpawner
    spawner = ChSpawner()
    ports = set()
    for _ in range(5):  # (the system may hand out a freed port again, rarely)
        spawner.pick_port()
        ports.add(spawner.port)
    assert len(ports) > 1
    fixed = ChSpawner(port=8999)
    fixed.pick_port()
    assert fixed.port == 8999


def test_a_users_store_planted_by_another_user_is_not_offered(user, other_user, busybox,
                                                              sticky_store_parent):
    """allow_user_images: the hub (as root) lists the user's store as the
    user's, so a store chtest2 made at chtest's user_storage path offers
    nothing, and choosing an image from it is a one-line 400."""
    from types import SimpleNamespace

    from tornado import web

    from chspawner.spawners import ChSpawner
    planted = sticky_store_parent / f"{user.pw_name}.ch"
    result = subprocess.run([str(AS_USER), other_user.pw_name, str(VENV_BIN / "chspawner"),
                             "import", "-q", "-s", str(planted), str(busybox), "evil"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    spawner = ChSpawner(images=[], allow_user_images=True, modes=["kernels"],
                        user_storage=str(sticky_store_parent / "{username}.ch"))
    spawner.user = SimpleNamespace(name=user.pw_name)  # the one collaborator faked
    assert spawner.offered_images() == {}
    with pytest.raises(web.HTTPError) as refused:
        spawner.validate_user_options({"image": "evil"})
    assert refused.value.status_code == 400
    assert spawner.image == ""


@pytest.fixture
def sticky_store_parent() -> Path:
    """A directory like /var/tmp: anyone may create in it."""
    import tempfile

    from chspawner.images.trees import remove_tree
    path = Path(tempfile.mkdtemp(prefix="chspawner-stores-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
    yield path
    remove_tree(path)
