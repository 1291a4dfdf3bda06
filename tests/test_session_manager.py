"""The session manager under a real JupyterHub, as a hub-managed service:
a lost server comes back by itself at the same URL; a server stopped on
purpose stays stopped; the history says what happened."""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from chspawner.images.trees import remove_tree
from tests.harness.env import VENV_BIN
from tests.harness.hub import (MANAGER, Hub, answers, history, manager_config, server_state,
                               sessions, spawn, stop_server, user_server)
from tests.harness.kernel_client import (N, Transcript, count_to, kernels_url, read,
                                         reconnect, send, start_cell, start_kernel, warm_up)
from tests.harness.net import free_port
from tests.harness.wait import wait_until


@pytest.fixture(scope="module")
def managed_hub(user, kernel_store):
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()))
    yield hub
    hub.stop()
    remove_tree(state)


@pytest.fixture(scope="module")
def managed_slurm_hub(user, kernel_store, slurm):
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()) + textwrap.dedent(f"""
            c.JupyterHub.spawner_class = "slurmchspawner"
            c.SlurmChSpawner.slurm_env = {slurm.env!r}
        """))
    yield hub
    hub.stop()
    remove_tree(state)


@pytest.mark.parametrize("which", ["local", "slurm"])
def test_a_lost_server_comes_back_at_the_same_url(request, which, slurm):
    """Its process killed (local) or its job cancelled (Slurm)."""
    hub = request.getfixturevalue("managed_hub" if which == "local"
                                  else "managed_slurm_hub")
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        wait_until(lambda: history(hub) == ["started"],
                   f"the manager to record it: {hub.log()[-4000:]}", 30)
        before = asyncio.run(user_server(hub))
        state = asyncio.run(server_state(hub))
        lost_at = time.monotonic()
        if which == "local":
            os.kill(state["pid"], signal.SIGKILL)
        else:
            slurm.run("scancel", state["job_id"])
        wait_until(lambda: "lost" in history(hub), "the manager to notice", 30)
        # From now on the proxy holds the session's requests: this one waits
        # for the new server rather than failing.
        assert asyncio.run(answers(hub)) == 200, history(hub)
        wait_until(lambda: "recovered" in history(hub),
                   f"the session to come back: {history(hub)}", 60)
        took = time.monotonic() - lost_at
        assert history(hub) == ["started", "lost", "recovering", "recovered"]
        after = asyncio.run(user_server(hub))
        assert after["url"] == before["url"] and after["ready"]
        assert asyncio.run(server_state(hub)) != state  # a new process, a new job
        assert asyncio.run(answers(hub)) == 200
        assert took < 30, (took, asyncio.run(sessions(hub))[-1]["history"])
        record = asyncio.run(sessions(hub))[-1]
        assert record["state"] == "running" and record["recoveries"] == 1
        assert record["user_options"] == {"image": "deb", "mode": "kernels"}
    finally:
        asyncio.run(stop_server(hub))


def test_a_server_stopped_on_purpose_stays_stopped(managed_hub):
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    assert result.get("ready"), result
    wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)

    async def new_kernel() -> str:
        async with hub.session() as http:
            return await start_kernel(http, hub)
    asyncio.run(new_kernel())  # a server in use
    assert history(hub)[-1:] == ["started"]
    asyncio.run(stop_server(hub))
    wait_until(lambda: history(hub)[-1:] == ["stopped"], "the manager to see the stop", 30)
    record = asyncio.run(sessions(hub))[-1]
    assert record["state"] == "stopped"
    assert not asyncio.run(user_server(hub))


def test_the_sessions_api_wants_a_token(managed_hub):
    async def anonymous() -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{managed_hub.url}/services/{MANAGER}/api/sessions",
                                allow_redirects=False) as r:
                return r.status
    assert asyncio.run(anonymous()) == 403


def test_the_manager_carries_on_after_a_hub_restart(managed_hub):
    """The hub restarts its managed services with it: the manager takes up
    its records again (SQLite) and still brings a lost server back."""
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), result
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        records = len(asyncio.run(sessions(hub)))
        hub.restart()
        wait_until(lambda: asyncio.run(sessions(hub)), "the manager to be back", 30)
        assert len(asyncio.run(sessions(hub))) == records  # the same session, not a new one
        os.kill(asyncio.run(server_state(hub))["pid"], signal.SIGKILL)
        wait_until(lambda: history(hub)[-1:] == ["recovered"],
                   f"the session to come back: {history(hub)}", 60)
        assert asyncio.run(answers(hub)) == 200
    finally:
        asyncio.run(stop_server(hub))


def test_a_loss_while_the_manager_is_down_is_recovered(managed_hub):
    """The hub (and with it its managed manager) stopped, the server killed
    meanwhile, the hub started again (it finds the server gone and drops
    it): the manager, starting, has no evidence of a stop by request, so
    records a loss, not a stop, and brings the session back."""
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), result
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        pid = asyncio.run(server_state(hub))["pid"]
        records = len(asyncio.run(sessions(hub)))
        hub._terminate()
        os.kill(pid, signal.SIGKILL)
        hub.start()
        wait_until(lambda: history(hub)[-1:] == ["recovered"],
                   f"the session to come back: {history(hub)}", 90)
        found = asyncio.run(sessions(hub))
        assert len(found) == records, found  # the same session, not a new one
        assert history(hub)[-3:] == ["lost", "recovering", "recovered"]
        assert "while the session manager was down" in found[-1]["history"][-3]["detail"]
        assert asyncio.run(answers(hub)) == 200
    finally:
        asyncio.run(stop_server(hub))


@pytest.mark.parametrize("which, browser", [("local", "connected"),
                                             ("local", "away for the whole gap"),
                                             ("slurm", "connected")])
def test_kernel_output_survives_losing_the_server(request, which, browser, slurm):
    """The whole of L1 + L2 through the hub: a cell prints 1..N over 20 s;
    the server is killed (local) or its job cancelled (Slurm) mid-way; the
    manager brings the session back at the same URL, the new server takes
    the kernel over, and the client, reconnecting with its session id, gets
    every number exactly once -- also when it left before the kill and
    comes back only once the session is back (all that was printed
    meanwhile waits in the kernel's keeper). On Slurm the kernel runs in a
    job of its own, which the cancel leaves alone, and which stopping the
    server on purpose ends."""
    hub = request.getfixturevalue("managed_hub" if which == "local"
                                  else "managed_slurm_hub")
    away = browser != "connected"
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def scenario() -> Transcript:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            if away:
                await ws.close()
            state = await server_state(hub)
            if which == "local":
                os.kill(state["pid"], signal.SIGKILL)
            else:
                kernel_jobs.update(await asyncio.to_thread(user_kernel_jobs, slurm, hub))
                await asyncio.to_thread(slurm.run, "scancel", state["job_id"])
            await read(ws, t, lambda t: False)  # what was on its way, till it closes
            assert len(t.numbers) < N
            if away:
                await asyncio.to_thread(wait_until, lambda: "recovered" in history(hub)[-1:],
                                        "the session to come back", 60)
            ws = await reconnect(http, url)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            await ws.close()
            if which == "slurm":  # the same kernel job throughout
                assert await asyncio.to_thread(user_kernel_jobs, slurm, hub) == kernel_jobs
            async with http.delete(f"{kernels_url(hub)}/{kernel}") as r:
                assert r.status == 204
            return t
    kernel_jobs: dict[str, str] = {}
    try:
        assert result.get("ready"), result
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        t = asyncio.run(scenario())
        assert t.numbers == list(range(1, N + 1)), t.numbers
        assert t.reply and t.stderr == []
        assert history(hub)[-3:] == ["lost", "recovering", "recovered"]
        if which == "slurm":
            assert list(kernel_jobs.values()) == ["RUNNING"]
            # Stopping the server on purpose ends the kernel jobs it holds.
            async def kernel_left_running() -> None:
                async with hub.session() as http:
                    await start_kernel(http, hub)
            asyncio.run(kernel_left_running())
            assert len(user_kernel_jobs(slurm, hub)) == 1
            asyncio.run(stop_server(hub))
            wait_until(lambda: not user_kernel_jobs(slurm, hub), "the kernel job to end", 30)
    finally:
        asyncio.run(stop_server(hub))


def user_kernel_jobs(slurm, hub: Hub) -> dict[str, str]:
    """{job id: state} of the hub user's kernel jobs."""
    return slurm.jobs(hub.user, "chspawner-kernel-")


def test_output_survives_a_hub_restart_that_restarts_its_proxy(managed_hub):
    """JupyterHub starting the proxy itself restarts it with the hub, which
    drops open websockets: the client reconnects, and the replay fills the
    gap, every number once."""
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def scenario() -> tuple[Transcript, int]:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            await asyncio.to_thread(hub.restart)
            # The old proxy is gone: the socket closes (the cell still runs).
            await read(ws, t, lambda t: t.reply and t.idle)
            cut_at = len(t.numbers)
            ws = await reconnect(http, url)
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            await ws.close()
            async with http.delete(f"{kernels_url(hub)}/{kernel}") as r:
                assert r.status == 204
            return t, cut_at
    try:
        assert result.get("ready"), result
        t, cut_at = asyncio.run(scenario())
        assert cut_at < N  # the websocket did drop mid-cell
        assert t.numbers == list(range(1, N + 1)), t.numbers
        # A plain client (no chspawner_received) whose websocket broke is
        # told that what was written just before may be missing (it isn't:
        # the proxy's record dropped nothing), never silently short.
        assert t.reply and all(line.startswith("[chspawner] up to ") for line in t.stderr), \
            t.stderr
    finally:
        asyncio.run(stop_server(hub))


KILLS = 20


def test_twenty_kills_in_a_row_under_load(managed_hub):
    """The server killed 20 times in a row, each time as soon as its
    successor is streaming a cell's output, while clients keep polling the
    session: every number arrives exactly once, and the session ends up
    running."""
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    count = 1500  # one every 0.1 s: more than the 20 recoveries take
    cuts: list[int] = []  # the last number each lost connection got

    async def poll(http: aiohttp.ClientSession, stop: asyncio.Event, answered: list) -> None:
        """A client polling the session through the proxy; held while it moves."""
        while not stop.is_set():
            try:
                async with http.get(f"{hub.url}/user/{hub.user}/api/status",
                                    allow_redirects=False) as r:
                    answered.append(r.status)
            except aiohttp.ClientError:
                answered.append(None)

    async def scenario() -> tuple[Transcript, list, int]:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(http, hub, count_to(count, 0.1))
            connections = [ws]

            async def follow() -> None:
                """The client: reads, reconnects when its socket closes."""
                while True:
                    await read(connections[-1], t, lambda t: t.reply and t.idle, timeout=600)
                    if t.reply and t.idle:
                        return
                    cuts.append(t.numbers[-1] if t.numbers else 0)
                    connections.append(await reconnect(http, url))

            reader = asyncio.create_task(follow())
            stop, answered = asyncio.Event(), []
            pollers = [asyncio.create_task(poll(http, stop, answered)) for _ in range(4)]
            killed: list[int] = []
            for _ in range(KILLS):
                # The client is on the newest server and output flows through it.
                since = (len(connections), len(t.numbers))
                pid = None
                end = time.monotonic() + 60
                while pid is None or pid in killed or len(t.numbers) < since[1] + 3:
                    assert time.monotonic() < end and not reader.done(), (killed, since)
                    await asyncio.sleep(0.05)
                    pid = (await server_state(hub)).get("pid")
                assert not t.reply, "the cell ended before the kills did"
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            await reader
            stop.set()
            await asyncio.gather(*pollers)
            await connections[-1].close()
            async with http.delete(f"{kernels_url(hub)}/{kernel}") as r:
                assert r.status == 204
            return t, answered, len(connections) - 1
    try:
        assert result.get("ready"), result
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        t, answered, reconnects = asyncio.run(scenario())
        missing = sorted(set(range(1, count + 1)) - set(t.numbers))
        assert not missing and t.numbers == list(range(1, count + 1)), (
            f"missing {missing}, {len(t.numbers)} received; connections cut after {cuts}")
        assert t.reply and t.stderr == []
        # Every kill hit a live server the manager then recovered. Not every
        # kill cuts the client's connection: numbers still in flight from
        # the server killed last count as new, so the next kill can come
        # before the client is back (traced: 17-20 cuts for 20 kills).
        assert reconnects >= 1, cuts
        assert history(hub)[-3 * KILLS:] == ["lost", "recovering", "recovered"] * KILLS
        record = asyncio.run(sessions(hub))[-1]
        assert record["state"] == "running"
        # The pollers were answered throughout, the moves held, not failed.
        assert answered.count(200) > 100 and None not in answered, answered[-50:]
    finally:
        asyncio.run(stop_server(hub))


def test_a_user_cannot_reach_another_users_session(managed_hub):
    hub = managed_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def as_someone_else() -> int:
        api = f"{hub.url}/hub/api/users/mallory"
        async with hub.session() as http:
            async with http.post(api) as r:
                assert r.status in (201, 409), await r.text()
            async with http.post(f"{api}/tokens", json={}) as r:
                assert r.status == 201, await r.text()
                token = (await r.json())["token"]
        async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) \
                as http:
            async with http.get(f"{hub.url}/user/{hub.user}/api/kernels",
                                allow_redirects=False) as r:
                return r.status
    try:
        assert result.get("ready"), result
        assert asyncio.run(as_someone_else()) == 403
    finally:
        asyncio.run(stop_server(hub))


@pytest.fixture(scope="module")
def independent_hub(user, kernel_store):
    """The session proxy run as its own service (should_start = False), as
    a site runs it so that restarting the hub drops no connection."""
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    token, port, api_port = secrets.token_hex(16), free_port(), free_port()
    proxy = subprocess.Popen(
        [str(VENV_BIN / "chspawner-proxy"), "--ip", "127.0.0.1", "--port", str(port),
         "--api-ip", "127.0.0.1", "--api-port", str(api_port)],
        env={"CONFIGPROXY_AUTH_TOKEN": token, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=open(state / "proxy.log", "wb"))
    own_proxy = textwrap.dedent(f"""
        c.ConfigurableHTTPProxy.should_start = False
        c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{api_port}"
    """)
    try:
        hub = Hub(kernel_store, user.pw_name, port=port,
                  extra_config=own_proxy + manager_config(state, token, free_port()))
        yield hub
        hub.stop()
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        remove_tree(state)


def test_output_flows_on_through_a_hub_restart(independent_hub):
    """The hub (and its session manager) restarted while a cell prints:
    the browser's websocket, through the separately run session proxy,
    never notices, and gets every number once."""
    hub = independent_hub
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def scenario() -> Transcript:
        base = kernels_url(hub)
        async with hub.session() as http:
            kernel = await start_kernel(http, hub)
            ws = await http.ws_connect(f"{base}/{kernel}/channels".replace("http", "ws", 1))
            await warm_up(ws)
            t = await send(ws, count_to(N, 0.5))
            await read(ws, t, lambda t: len(t.numbers) >= 3)
            await asyncio.to_thread(hub.restart)
            assert not t.reply  # the cell still runs after the restart
            await read(ws, t, lambda t: t.reply and t.idle, timeout=90)
            assert not ws.closed
            await ws.close()
            return t
    try:
        assert result.get("ready"), result
        t = asyncio.run(scenario())
        assert t.numbers == list(range(1, N + 1)), t.numbers
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to be back", 30)
    finally:
        asyncio.run(stop_server(hub))


CULL_AFTER = 8  # the culler's --timeout, seconds


@pytest.fixture(scope="module")
def culled_hub(user, kernel_store):
    """The session manager checking the server every second, and the real
    jupyterhub-idle-culler culling servers idle for CULL_AFTER seconds
    (as the center runs it: docs/admin/center_jupyterhub_config.py), with
    activity reported every 2 s and taken to the second."""
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()) + textwrap.dedent(f"""
            [s for s in c.JupyterHub.services if s["name"] == "{MANAGER}"][0][
                "command"].append("--probe-interval=1")
            c.Spawner.environment = {{"JUPYTERHUB_ACTIVITY_INTERVAL": "2"}}
            c.JupyterHub.activity_resolution = 1
            c.JupyterHub.services.append({{
                "name": "idle-culler",
                "command": ["{VENV_BIN}/python", "-m", "jupyterhub_idle_culler",
                            "--timeout={CULL_AFTER}", "--cull-every=2"]}})
            c.JupyterHub.load_roles.append({{
                "name": "idle-culler", "services": ["idle-culler"],
                "scopes": ["list:users", "read:users:activity", "read:servers",
                           "delete:servers"]}})
        """))
    yield hub
    hub.stop()
    remove_tree(state)


def test_the_culler_spares_a_busy_kernel_and_culls_an_idle_server(culled_hub):
    """A cell sleeping silently, no browser open, while the manager checks
    the server every second: not culled (a busy kernel is activity);
    once the cell is done, the server is idle (the manager's checks are
    not activity) and culled, which the manager records as a stop, not a
    loss."""
    hub = culled_hub
    busy_for = 3 * CULL_AFTER
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))

    async def start_sleeping_cell() -> float:
        async with hub.session() as http:
            kernel, url, ws, t = await start_cell(
                http, hub, f"import time\ntime.sleep({busy_for})\n")
            # (execute_input: the kernel has taken the cell up)
            await read(ws, t, lambda t: t.execution_count is not None)
            await ws.close()  # no browser: nothing reaches the server from now on
            return time.monotonic()

    async def last_activity() -> str:
        async with hub.session() as http:
            async with http.get(f"{hub.url}/hub/api/users/{hub.user}") as r:
                return (await r.json())["servers"][""]["last_activity"]
    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        wait_until(lambda: history(hub)[-1:] == ["started"], "the manager to record it", 30)
        started = asyncio.run(start_sleeping_cell())
        before = asyncio.run(last_activity())
        # Twice the culler's timeout without a request of the user's.
        wait_until(lambda: time.monotonic() - started > 2 * CULL_AFTER
                   or not asyncio.run(user_server(hub)), "the busy time to pass", 60)
        assert asyncio.run(user_server(hub)), f"culled while busy: {hub.log()[-3000:]}"
        assert asyncio.run(last_activity()) > before  # the busy kernel counted
        # The cell done: idle, culled within the timeout and a round or two.
        wait_until(lambda: not asyncio.run(user_server(hub)),
                   f"the idle server to be culled: {asyncio.run(user_server(hub))}",
                   busy_for + 4 * CULL_AFTER)
        assert time.monotonic() - started > busy_for
        wait_until(lambda: history(hub)[-1:] == ["stopped"], "the stop to be recorded", 30)
        assert history(hub) == ["started", "stopped"]
    finally:
        asyncio.run(stop_server(hub))
