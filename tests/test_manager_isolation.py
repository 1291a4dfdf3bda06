"""The session manager against hostile users' servers, at unit level with
real sockets: the real session proxy (its route API), hostile listeners at
the routes' targets, and a stand-in for the hub's REST API (the one faked
collaborator). What a user's server (or whoever took its port) can get out
of the manager's checks: nothing, not its hub token, not a cookie; what it
can do to the others' sessions: nothing, however it answers. And the
records file is its owner's alone."""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from jupyterhub.utils import url_escape_path, url_path_join

from tests.harness.env import VENV_BIN
from tests.harness.net import free_port, refused_target
from tests.harness.users import as_user
from tests.harness.wait import until
from session_proxy.manager.app import SessionManager
from session_proxy.manager.records import SessionRecord, SessionStore, private_sqlite_file

HUB_TOKEN = "hub-token-" + secrets.token_hex(8)


def server_url(user: str) -> str:
    """The server's URL as JupyterHub gives it (User.base_url)."""
    return url_path_join("/user", url_escape_path(user)) + "/"


@dataclass
class FakeHub:
    """The hub's REST API as the manager uses it: users' servers, stop,
    start. Notes the Authorization headers it gets."""
    servers: dict[str, dict] = field(default_factory=dict)
    authorizations: list[str] = field(default_factory=list)
    listings: int = 0
    url: str = ""

    def add(self, user: str, options: dict | None = None) -> None:
        self.servers[user] = {"name": "", "ready": True, "pending": None,
                              "started": f"t{time.monotonic_ns()}", "url": server_url(user),
                              "user_options": options or {}}

    def app(self) -> web.Application:
        async def users(request: web.Request) -> web.Response:
            self.authorizations.append(request.headers.get("Authorization", ""))
            self.listings += 1
            # The hub sets cookies on some answers: none may reach a user's server.
            response = web.json_response([{"name": u, "servers": {"": m}}
                                          for u, m in self.servers.items()])
            response.set_cookie("jupyterhub-session-id", "hub-cookie-secret")
            return response

        async def one(request: web.Request) -> web.Response:
            self.authorizations.append(request.headers.get("Authorization", ""))
            user = request.match_info["user"]
            servers = {"": self.servers[user]} if user in self.servers else {}
            return web.json_response({"name": user, "servers": servers})

        async def server(request: web.Request) -> web.Response:
            self.authorizations.append(request.headers.get("Authorization", ""))
            user = request.match_info["user"]
            if request.method == "DELETE":
                return web.Response(status=204 if self.servers.pop(user, None) else 400)
            self.add(user, await request.json())
            return web.Response(status=201)

        app = web.Application()
        app.router.add_get("/hub/api/users", users)
        app.router.add_get("/hub/api/users/{user}", one)
        app.router.add_route("*", "/hub/api/users/{user}/server", server)
        return app


@dataclass
class Seen:
    """What a listener standing at a user's target received."""
    requests: list[dict] = field(default_factory=list)
    connections: int = 0
    bytes_sent: int = 0


async def serve(handler: Callable) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await serve_app(app)


async def hostile_listener(seen: Seen) -> tuple[web.AppRunner, str]:
    """Answers every check, and tries what it can to be handed more: a
    cookie, a redirect to a path of its own."""
    async def handler(request: web.Request) -> web.Response:
        seen.requests.append({"path": request.path_qs, "headers": dict(request.headers),
                              "cookies": dict(request.cookies)})
        if len(seen.requests) == 1:
            redirect = web.HTTPFound("/steal?x=1")
            redirect.set_cookie("bait", "1")
            raise redirect
        response = web.json_response({"version": "2.14.0"})
        response.set_cookie("bait", "1")
        return response
    return await serve(handler)


@pytest.fixture(scope="module")
def proxy():
    """The real session proxy: (its API URL, its token)."""
    token, port, api_port = secrets.token_hex(16), free_port(), free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "chspawner-proxy"), "--ip", "127.0.0.1", "--port", str(port),
         "--api-ip", "127.0.0.1", "--api-port", str(api_port)],
        env={"CONFIGPROXY_AUTH_TOKEN": token, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", api_port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.05)
    yield api, token
    proc.terminate()
    proc.wait(timeout=30)


async def add_route(proxy: tuple[str, str], user: str, target: str) -> None:
    """As JupyterHub's ConfigurableHTTPProxy.add_route does: the user's
    escaped URL appended to the routes API, the server named in the data."""
    api, token = proxy
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as http:
        async with http.post(url_path_join(api, "api/routes", server_url(user)),
                             json={"target": target, "user": user,
                                   "server_name": ""}) as r:
            assert r.status == 201, await r.text()


@asynccontextmanager
async def running_manager(tmp_path: Path, proxy: tuple[str, str], db_url: str = "",
                          **settings) -> AsyncIterator[tuple[SessionManager, FakeHub]]:
    """The manager's own loop (SessionManager.run, with its own HTTP
    sessions) against the fake hub and the real proxy; its records at
    ``db_url``, else in an SQLite file in ``tmp_path``."""
    hub = FakeHub()
    runner, hub.url = await serve_app(hub.app())
    app = SessionManager(db_url=db_url or f"sqlite:///{tmp_path}/sessions.sqlite",
                         hub_api_url=f"{hub.url}/hub/api", api_token=HUB_TOKEN,
                         proxy_api_url=proxy[0], proxy_auth_token=proxy[1],
                         service_url="", interval=0.1, probe_timeout=0.3,
                         # The fake hub lists a server after its route came:
                         # found by the full listings, frequent here.
                         **{"sync_interval": 0.3, "probe_interval": 0.5, **settings})
    app.initialize([])
    task = asyncio.create_task(app.run())
    try:
        yield app, hub
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def history(app: SessionManager, user: str) -> list[str]:
    with app.store.transaction() as db:
        record = app.store.find(db, user, "")
        return [e.kind for e in record.events] if record else []


def record_of(app: SessionManager, user: str) -> dict:
    with app.store.transaction() as db:
        record = app.store.find(db, user, "")
        return record.to_dict() if record else {}


# ------------------------------------------------------------ credentials --

def test_a_users_server_never_gets_the_managers_credentials(tmp_path, proxy):
    """Whoever listens at a user's target (the user, having killed their
    server and taken its port) is asked whether it is there, and gets no
    token (header or query), no cookie, not even the hub's cookie nor its
    own back; and it is judged alive as long as it answers, lost once it
    stops."""
    async def scenario() -> None:
        seen = Seen()
        listener, target = await hostile_listener(seen)
        async with running_manager(tmp_path, proxy, recover=False) as (app, hub):
            await add_route(proxy, "alice", target)
            hub.add("alice")
            await until(lambda: len(seen.requests) >= 5, "five checks of alice's server")
            assert history(app, "alice") == ["started"]  # alive throughout
            assert record_of(app, "alice")["target"] == target
            await listener.cleanup()
            await until(lambda: "lost" in history(app, "alice"), "the loss to be noticed")
            assert history(app, "alice") == ["started", "lost", "recovery-failed"]
        secrets_ = (HUB_TOKEN, proxy[1], "hub-cookie-secret")
        for request in seen.requests:
            assert request["path"] == "/user/alice/api", request  # no redirect followed
            assert "Authorization" not in request["headers"], request
            assert "Cookie" not in request["headers"] and not request["cookies"], request
            assert not any(s in str(request) for s in secrets_), request
        # The hub (and only the hub) got the manager's token.
        assert hub.authorizations and set(hub.authorizations) == {f"token {HUB_TOKEN}"}
    asyncio.run(scenario())


# --------------------------------------------------- one user, all users --

GARBAGE = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
           b"Content-Length: 3\r\n\r\n[1]",
           b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
           b"Content-Length: 5\r\n\r\n{\"a\":",
           b"\x00\xff not http at all \r\n\r\n",
           b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 200_000 + b"\r\n\r\n"]
HUGE = 2 * 1024 ** 3


async def garbage_server(seen: Seen) -> tuple[asyncio.AbstractServer, str]:
    """Mallory's server: each connection answers differently, badly --
    malformed JSON, no HTTP, endless headers, a 2 GiB body, or one byte
    every now and then, never finishing."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        which = seen.connections % (len(GARBAGE) + 2)
        seen.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            if which < len(GARBAGE):
                writer.write(GARBAGE[which])
            elif which == len(GARBAGE):  # a 2 GiB body, as fast as it is taken
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
                chunk = b"[" * 65536
                while seen.bytes_sent < HUGE:
                    writer.write(chunk)
                    await writer.drain()
                    seen.bytes_sent += len(chunk)
            else:  # a trickle: headers that never end
                for _ in range(1000):
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.1)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_hostile_server_cannot_stop_anyone_elses_recovery(tmp_path, proxy):
    """Mallory's server answers garbage of every kind while Alice's server
    is lost: the manager's rounds go on, Alice's session is recovered, and
    Mallory's 2 GiB body is not read."""
    async def scenario() -> None:
        seen = Seen()
        server, target = await garbage_server(seen)
        async with running_manager(tmp_path, proxy, lost_after=2) as (app, hub):
            await add_route(proxy, "mallory", target)
            await add_route(proxy, "alice", refused_target())
            hub.add("mallory")
            await until(lambda: seen.connections > 2 * (len(GARBAGE) + 2),
                        "mallory's server to be checked through all its answers twice")
            hub.add("alice", {"image": "deb"})
            await until(lambda: "recovered" in history(app, "alice"),
                        f"alice's session to be recovered: {history(app, 'alice')}")
            assert history(app, "alice") == ["started", "lost", "recovering", "recovered"]
            assert hub.servers["alice"]["user_options"] == {"image": "deb"}
            listings = hub.listings
            await until(lambda: hub.listings > listings + 3, "the rounds to go on")
        server.close()
        # What the manager took of the huge body: the socket buffers' worth.
        assert seen.bytes_sent < 64 * 1024 ** 2, seen.bytes_sent
    asyncio.run(scenario())


# ------------------------------------------------------------------ cost --

def test_quiet_rounds_ask_nobody_and_a_kill_is_noticed_by_the_idle_connection(
        tmp_path, proxy):
    """With full listings and checks far apart: the server is found by its
    route (the hub asked about its user alone), rounds with nothing new ask
    neither the hub nor the server anything, and the server's end is
    noticed within a few rounds by the idle connection the manager holds
    to it closing."""
    async def scenario() -> None:
        seen = Seen()
        listener, target = await hostile_listener(seen)
        async with running_manager(tmp_path, proxy, recover=False, sync_interval=3600,
                                   probe_interval=3600) as (app, hub):
            await until(lambda: app.totals["rounds"] >= 1, "the first round")
            hub.add("alice")
            await add_route(proxy, "alice", target)  # as the hub: once it is up
            await until(lambda: history(app, "alice") == ["started"], "alice recorded")
            await until(lambda: "alice" not in app.unsettled and app.watchers,
                        "alice's server watched")
            calls, requests, rounds = app.hub.calls, len(seen.requests), app.totals["rounds"]
            await until(lambda: app.totals["rounds"] >= rounds + 10, "ten quiet rounds")
            assert (app.hub.calls, len(seen.requests)) == (calls, requests)
            assert hub.listings == 1  # the first round's full listing only
            await listener.cleanup()
            await until(lambda: "lost" in history(app, "alice"), "the loss to be noticed",
                        timeout=5)
            assert history(app, "alice") == ["started", "lost", "recovery-failed"]
    asyncio.run(scenario())


# ------------------------------------------------------ escaped user names --

NAMES = ["a+b@x", "jo smith", "zoë"]


def test_names_that_need_escaping_are_matched_to_their_routes(tmp_path, proxy):
    """The hub's server URLs are escaped (``/user/a%2Bb@x/``), the session
    proxy lists its routes decoded: each server is still found at its
    route's target and checked there, at its escaped URL."""
    async def scenario() -> None:
        listeners = []
        seen = {name: Seen() for name in NAMES}
        async with running_manager(tmp_path, proxy, recover=False) as (app, hub):
            targets = {}
            for name in NAMES:
                runner, targets[name] = await hostile_listener(seen[name])
                listeners.append(runner)
                await add_route(proxy, name, targets[name])
                hub.add(name)
            await until(lambda: all(len(s.requests) >= 3 for s in seen.values()),
                        "every server to be checked")
            for name in NAMES:
                assert record_of(app, name)["target"] == targets[name]
                assert history(app, name) == ["started"]
                path = seen[name].requests[-1]["path"]
                assert path == f"{server_url(name)}api", path
        for runner in listeners:
            await runner.cleanup()
    asyncio.run(scenario())


# ------------------------------------------------- a restarted manager --

def left_running(records_url: str) -> None:
    """Alice's record as a manager that went down left it: running."""
    store = SessionStore(records_url)
    with store.transaction() as db:
        record = SessionRecord(user="alice", server_name="", url=server_url("alice"),
                               user_options={"image": "deb"}, target=refused_target())
        db.add(record)
        store.add_event(record, "started")
    store.engine.dispose()


def test_a_loss_while_the_manager_was_down_is_recovered_not_taken_for_a_stop(
        tmp_path, proxy, records_url):
    """The records say running, the hub no longer lists the server, and
    nothing says it was stopped on purpose: the manager, starting, records
    a loss and starts the server again."""
    left_running(records_url)

    async def scenario() -> None:
        async with running_manager(tmp_path, proxy, records_url) as (app, hub):
            await until(lambda: "recovered" in history(app, "alice"),
                        f"alice's session to be recovered: {history(app, 'alice')}")
            assert history(app, "alice") == ["started", "lost", "recovering", "recovered"]
            with app.store.transaction() as db:
                lost = app.store.find(db, "alice", "").events[1].detail
            assert "while the session manager was down" in lost, lost
            assert hub.servers["alice"]["user_options"] == {"image": "deb"}
    asyncio.run(scenario())


def test_a_stop_the_restarted_manager_sees_under_way_stays_a_stop(tmp_path, proxy,
                                                                 records_url):
    """The hub stopping the server when the manager starts is evidence of
    a stop by request: recorded as one, not started again."""
    left_running(records_url)

    async def scenario() -> None:
        async with running_manager(tmp_path, proxy, records_url) as (app, hub):
            hub.add("alice")
            hub.servers["alice"].update(pending="stop", ready=False)
            await until(lambda: hub.listings >= 2, "the manager to see the stop")
            del hub.servers["alice"]
            await until(lambda: history(app, "alice")[-1:] == ["stopped"],
                        f"the stop to be recorded: {history(app, 'alice')}")
            assert history(app, "alice") == ["started", "stopped"]
            assert "alice" not in hub.servers
    asyncio.run(scenario())


# ------------------------------------------------------ the records file --

@pytest.fixture
def shared():
    """A directory everyone can enter (as /var/lib/jupyterhub often is):
    only the file's own mode keeps others out."""
    path = Path(tempfile.mkdtemp(prefix="chspawner-records-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_the_records_file_is_its_owners_alone(shared, other_user):
    """Created 0600 (so are SQLite's -wal and -shm), an existing looser one
    tightened: another user can't read anyone's options and targets."""
    path = shared / "sessions.sqlite"
    store = SessionStore(f"sqlite:///{path}")
    with store.engine.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")
    with store.transaction() as db:
        db.add(SessionRecord(user="alice", server_name="", user_options={"secret": 1}))
        db.flush()  # written to the WAL, not yet checkpointed
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
    result = as_user(other_user.pw_name, "cat", str(path), check=False)
    assert result.returncode != 0 and "secret" not in result.stdout
    store.engine.dispose()

    loose = shared / "loose.sqlite"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    Path(f"{loose}-journal").touch()
    Path(f"{loose}-journal").chmod(0o644)
    # (SessionStore would then let SQLite remove the empty journal.)
    private_sqlite_file(f"sqlite:///{loose}")
    for name in (loose, Path(f"{loose}-journal")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
    SessionStore(f"sqlite:///{loose}").engine.dispose()


@pytest.mark.unit
def test_a_records_file_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "sessions.sqlite").symlink_to(target)
    with pytest.raises(OSError):
        SessionStore(f"sqlite:///{tmp_path}/sessions.sqlite")
