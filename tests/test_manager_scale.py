"""The session manager with more servers than the hub lists on one page:
a real JupyterHub with its page size set to 5, a dozen users' stand-in
servers (tests/harness/standin.py), the real session proxy and manager.
Every server is tracked (none taken for stopped), a lost one among them is
recovered, one stopped on purpose stays stopped; and the manager's own
listing of the hub gets every server, page by page."""
from __future__ import annotations

import asyncio
import os
import secrets
import signal
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from chspawner.images.trees import remove_tree
from session_proxy.manager.app import HubClient
from tests.harness.hub import Hub, manager_config, sessions
from tests.harness.net import free_port
from tests.harness.standin import standin_config
from tests.harness.wait import wait_until

PAGE = 5
USERS = [f"paged{i:02d}" for i in range(12)]  # more than two pages


@pytest.fixture(scope="module")
def paged_hub(user):
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    # No images: the servers are stand-ins.
    hub = Hub(str(state / "no-store"), user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port()) + standin_config() + f"""
c.JupyterHub.api_page_default_limit = {PAGE}
c.JupyterHub.api_page_max_limit = {PAGE}
""")
    asyncio.run(start_all(hub))
    yield hub
    asyncio.run(stop_all(hub))
    hub.stop()
    remove_tree(state)


async def start_all(hub: Hub) -> None:
    api = f"{hub.url}/hub/api"
    async with hub.session() as http:
        async with http.post(f"{api}/users", json={"usernames": USERS}) as r:
            assert r.status in (201, 409), await r.text()
        for name in USERS:
            async with http.post(f"{api}/users/{name}/server", json={}) as r:
                assert r.status in (201, 202), await r.text()
        async with asyncio.timeout(120):
            while len(await ready(http, hub)) < len(USERS):
                await asyncio.sleep(0.2)


async def ready(http: aiohttp.ClientSession, hub: Hub) -> dict[str, dict]:
    """{user: server model} of the test's users whose server is ready."""
    found = {}
    for name in USERS:
        async with http.get(f"{hub.url}/hub/api/users/{name}") as r:
            server = (await r.json())["servers"].get("")
            if server and server.get("ready"):
                found[name] = server
    return found


async def stop_all(hub: Hub) -> None:
    async with hub.session() as http:
        async def stop(name: str) -> None:
            async with http.delete(f"{hub.url}/hub/api/users/{name}/server") as r:
                assert r.status in (202, 204, 400), await r.text()
        await asyncio.gather(*(stop(name) for name in USERS))


def records(hub: Hub) -> dict[str, dict]:
    """The manager's newest record of each of the test's users."""
    return {s["user"]: s for s in asyncio.run(sessions(hub)) if s["user"] in USERS}


def kinds(record: dict) -> list[str]:
    return [e["kind"] for e in record["history"]]


def test_the_managers_listing_pages_through_every_server(paged_hub):
    """The hub answers 5 users a request: HubClient.servers() follows the
    pages to the end, also asking for more than the hub gives."""
    async def listing() -> set:
        headers = {"Authorization": f"token {paged_hub.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            client = HubClient(http, f"{paged_hub.url}/hub/api", page_size=200)
            servers = await client.servers()
            assert client.calls >= len(USERS) // PAGE + 1, client.calls
            return {user for user, _ in servers}
    assert set(USERS) <= asyncio.run(listing())


def test_every_server_beyond_one_page_is_tracked_and_recovered(paged_hub):
    hub = paged_hub
    wait_until(lambda: len(records(hub)) == len(USERS)
               and all(kinds(r) == ["started"] and r["state"] == "running"
                       for r in records(hub).values()),
               f"every server recorded running: {records(hub)}", 60)
    # A restarted hub restarts the manager: its first full listing (paged)
    # finds every server still there, none taken for stopped.
    hub.restart()
    wait_until(lambda: len(records(hub)) == len(USERS), "the manager to be back", 60)
    wait_until(lambda: all(r["state"] == "running" for r in records(hub).values()),
               f"every server still running: {records(hub)}", 30)

    # One of the last page lost: recovered, the others untouched.
    lost = USERS[-1]

    async def server_of(name: str) -> dict:
        async with hub.session() as http:
            return (await ready(http, hub)).get(name, {})
    os.kill(asyncio.run(server_of(lost))["state"]["pid"], signal.SIGKILL)
    wait_until(lambda: kinds(records(hub)[lost])[-1:] == ["recovered"],
               f"{lost}'s session to come back: {records(hub)[lost]}", 60)
    assert kinds(records(hub)[lost]) == ["started", "lost", "recovering", "recovered"]
    # One stopped on purpose: stopped, not recovered.
    stopped = USERS[0]

    async def stop(name: str) -> None:
        async with hub.session() as http:
            async with http.delete(f"{hub.url}/hub/api/users/{name}/server") as r:
                assert r.status in (202, 204), await r.text()
    asyncio.run(stop(stopped))
    wait_until(lambda: records(hub)[stopped]["state"] == "stopped",
               f"the stop to be recorded: {records(hub)[stopped]}", 30)
    assert kinds(records(hub)[stopped]) == ["started", "stopped"]
    others = {u: r for u, r in records(hub).items() if u not in (lost, stopped)}
    assert all(kinds(r) == ["started"] and r["state"] == "running"
               for r in others.values()), others


@pytest.mark.unit
def test_a_watch_connection_asks_the_host_after_its_keepalive_idle_time():
    """A node cut off sends no FIN: the watch connection's TCP keepalive
    (probes after watch_keepalive s, 1 s apart, 3 of them) is what notices,
    within seconds, without a request the server would count."""
    import socket

    from session_proxy.manager.app import keep_alive
    with socket.socket() as sock:
        keep_alive(sock, 5.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    with socket.socket() as sock:
        keep_alive(sock, 0)  # off
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
