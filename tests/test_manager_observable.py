"""The session manager made observable: its Prometheus metrics, its health,
its sessions API a page at a time, and ``chspawner sessions`` reading it.

Paging and filters run against the real API handlers and records (the
hub's token check alone stood in for); the rest against the real manager:
as a real JupyterHub's service (metrics count a recovery, health 200, the
CLI), or as its own process whose hub is unreachable (health 503)."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import event
from tornado import web
from tornado.httpserver import HTTPServer

from chspawner.images.trees import remove_tree
from tests.harness.env import VENV_BIN
from tests.harness.hub import (MANAGER, Hub, history, manager_config, server_state, spawn,
                               stop_server)
from tests.harness.net import free_port, refused_target
from tests.harness.procs import stop
from tests.harness.wait import wait_until
from session_proxy.manager.api import ApiSettings, handlers
from session_proxy.manager.metrics import Health, state_registry
from session_proxy.manager.records import SessionRecord, SessionStore

PREFIX = "/services/session-manager/"


# ------------------------------------------------ paging, filters, SQL --

class TokenCheck:
    """The hub's token check (HubAuth.user_for_token), the one part
    stood in for: tokens named after who they are."""

    MODELS = {"admin": {"kind": "user", "name": "root", "admin": True, "scopes": []},
              "alice": {"kind": "user", "name": "alice", "admin": False, "scopes": []}}

    async def user_for_token(self, token: str, use_cache: bool, sync: bool) -> dict | None:
        return self.MODELS.get(token)


# Paging is the database's: on SQLite (the unit layer) and PostgreSQL.
BOTH = pytest.mark.parametrize(
    "records_url", [pytest.param("sqlite", marks=pytest.mark.unit), "postgresql"],
    indirect=True)
SQLITE = pytest.mark.parametrize("records_url", ["sqlite"], indirect=True)


@pytest.fixture
def records(records_url):
    """Records with 250 sessions (alice's every third; every other one
    stopped), and the SQL sent to them."""
    store = SessionStore(records_url)
    with store.transaction() as db:
        for i in range(250):
            record = SessionRecord(user="alice" if i % 3 == 0 else f"user{i}",
                                   url=f"/user/{i}/", state=("running", "stopped")[i % 2])
            db.add(record)
            store.add_event(record, "started", f"number {i}")
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: statements.append(statement))
    yield store, statements
    store.engine.dispose()


@asynccontextmanager
async def serving(store: SessionStore) -> AsyncIterator[str]:
    """The API's handlers on a real port, in the running loop: their URL."""
    settings = ApiSettings(default_limit=100, max_limit=120, authenticate_metrics=True,
                           health_max_age=30)
    app = web.Application(handlers(PREFIX, store=store, auth=TokenCheck(),
                                   settings=settings, health=Health(),
                                   registry=state_registry(store.count_states)))
    server = HTTPServer(app)
    port = free_port()
    server.listen(port, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        server.stop()


async def get(url: str, token: str = "admin") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"token {token}"}) as r:
            return r.status, await r.json(content_type=None)


@BOTH
def test_sessions_are_listed_a_page_at_a_time_in_one_query(records):
    store, statements = records

    async def scenario(url: str) -> None:
        status, page = await get(f"{url}api/sessions")
        assert status == 200
        assert (page["total"], page["offset"], page["limit"], len(page["sessions"]),
                page["next_offset"]) == (250, 0, 100, 100, 100)
        assert page["sessions"][0]["history"][0]["detail"] == "number 0"
        statements.clear()
        status, page = await get(f"{url}api/sessions?offset=240&limit=20")
        assert [s["url"] for s in page["sessions"]] == [f"/user/{i}/"
                                                        for i in range(240, 250)]
        assert page["next_offset"] is None and page["total"] == 250
        # The page, its total and its histories: one statement, paged by
        # the database.
        assert len(statements) == 1, statements
        assert re.search(r"LIMIT .* OFFSET", statements[0]) and "OVER ()" in statements[0]
        status, page = await get(f"{url}api/sessions?user=alice&state=running&limit=10"
                                 "&offset=5")
        assert page["total"] == len([i for i in range(250) if i % 3 == 0 and i % 2 == 0])
        assert {(s["user"], s["state"]) for s in page["sessions"]} == {("alice", "running")}
        assert [s["url"] for s in page["sessions"]][0] == "/user/30/"  # the 6th: 0,6,..,30
        future = (datetime.datetime.now(datetime.timezone.utc)
                  + datetime.timedelta(hours=1)).isoformat()
        past = "2000-01-01T00:00:00Z"
        assert (await get(f"{url}api/sessions?since={past}&state=stopped"))[1]["total"] \
            == 125
        statements.clear()
        status, page = await get(f"{url}api/sessions?since={future.replace('+', '%2B')}")
        assert (status, page["total"], page["sessions"]) == (200, 0, [])
        # Past the end: one more query, for the total.
        assert len(statements) == 2
        status, page = await get(f"{url}api/sessions?history=0&limit=1")
        assert "history" not in page["sessions"][0]
        # A user sees their own only, whatever they ask.
        status, page = await get(f"{url}api/sessions", token="alice")
        assert page["total"] == 84 and {s["user"] for s in page["sessions"]} == {"alice"}
        assert (await get(f"{url}api/sessions?user=user1", token="alice"))[0] == 403
        assert (await get(f"{url}api/sessions", token="nobody"))[0] == 403

    async def run() -> None:
        async with serving(store) as url:
            await scenario(url)
    asyncio.run(run())


@pytest.mark.unit
@SQLITE
@pytest.mark.parametrize("query,message", [
    ("limit=0", "limit: an integer of at least 1"),
    ("limit=121", "limit: at most 120"),
    ("offset=-1", "offset: an integer of at least 0"),
    ("offset=x", "offset: an integer of at least 0"),
    ("state=dead", "state: one of running, lost, recovering, stopped"),
    ("since=yesterday", "since: an ISO 8601 time")])
def test_bad_paging_or_filters_are_one_line(records, query, message):
    async def ask() -> tuple[int, dict]:
        async with serving(records[0]) as url:
            return await get(f"{url}api/sessions?{query}")
    status, answer = asyncio.run(ask())
    assert status == 400 and answer["message"].startswith(message), answer
    assert "\n" not in answer["message"]


@pytest.mark.unit
@SQLITE
def test_metrics_want_the_read_metrics_scope(records):
    async def scrape() -> str:
        async with serving(records[0]) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}metrics") as r:
                assert r.status == 403
            async with http.get(f"{url}metrics",
                                headers={"Authorization": "Bearer alice"}) as r:
                assert r.status == 403
            async with http.get(f"{url}metrics",
                                headers={"Authorization": "Bearer admin"}) as r:
                assert r.status == 200
                return await r.text()
    text = asyncio.run(scrape())
    assert 'chspawner_sessions_in_state{state="running"} 125.0' in text
    assert 'chspawner_sessions_in_state{state="recovering"} 0.0' in text
    assert "chspawner_sessions_recoveries_succeeded_total" in text


# ------------------------------------------------------ the real thing --

@pytest.fixture(scope="module")
def observed_hub(user, kernel_store):
    """A real hub with the session proxy and the manager as its service;
    the test's service token may also read metrics (an admin's may)."""
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    port = free_port()
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), port) + f"""
c.JupyterHub.load_roles.append({{"name": "metrics", "services": ["tester"],
                                 "scopes": ["read:metrics"]}})
""")
    hub.manager_url = f"http://127.0.0.1:{port}{PREFIX}"
    yield hub
    hub.stop()
    remove_tree(state)


async def metrics(hub: Hub) -> dict[str, float]:
    """The manager's metrics through the hub's proxy, as Prometheus would
    scrape them: {series: value}."""
    async with hub.session() as http:
        async with http.get(f"{hub.url}/services/{MANAGER}/metrics") as r:
            assert r.status == 200, await r.text()
            text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def health(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}health") as r:
            return r.status, await r.json()


def chspawner_sessions(*args: str, token: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "chspawner"), "sessions", *args],
                          env={"PATH": "/usr/bin:/bin", "JUPYTERHUB_API_TOKEN": token},
                          capture_output=True, text=True, timeout=60)


def test_a_recovery_in_metrics_logs_and_chspawner_sessions(observed_hub):
    """Health 200; a server killed and recovered is counted, logged at the
    default level, and listed by ``chspawner sessions``."""
    hub = observed_hub
    status, model = asyncio.run(health(f"{hub.url}{PREFIX}"))
    assert status == 200, model
    assert model["hub"] is True and model["proxy"] is True and model["database"] is True
    assert model["last_check_age"] < 30
    result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
    try:
        assert result.get("ready"), (result, hub.log()[-3000:])
        wait_until(lambda: history(hub) == ["started"], "the manager to record it", 30)
        before = asyncio.run(metrics(hub))
        assert before['chspawner_sessions_in_state{state="running"}'] >= 1
        assert before['chspawner_sessions_checks_total{result="ok"}'] > 0
        assert before["chspawner_sessions_check_duration_seconds_count"] > 0
        assert before['chspawner_sessions_api_requests_total'
                      '{kind="GET /users",party="hub",status="200"}'] > 0
        assert before['chspawner_sessions_api_requests_total'
                      '{kind="GET /api/routes",party="proxy",status="200"}'] > 0
        os.kill(asyncio.run(server_state(hub))["pid"], signal.SIGKILL)
        wait_until(lambda: "recovered" in history(hub),
                   f"the session to come back: {history(hub)}", 60)
        after = asyncio.run(metrics(hub))

        def more(name: str) -> float:
            return after.get(name, 0) - before.get(name, 0)
        assert more("chspawner_sessions_losses_total") == 1
        assert more("chspawner_sessions_recoveries_started_total") == 1
        assert more("chspawner_sessions_recoveries_succeeded_total") == 1
        assert more("chspawner_sessions_recovery_duration_seconds_count") == 1
        assert 0 < more("chspawner_sessions_recovery_duration_seconds_sum") < 60
        assert more('chspawner_sessions_probe_failures_total{reason="unanswered"}') >= 2
        assert more('chspawner_sessions_api_requests_total'
                    '{kind="POST /users/{name}/server",party="hub",status="202"}') \
            + more('chspawner_sessions_api_requests_total'
                   '{kind="POST /users/{name}/server",party="hub",status="201"}') == 1
        # Logged at the default level: the hub's log holds its services'.
        log = hub.log()
        assert re.search(rf"session {hub.user}/ recovering", log), log[-3000:]
        assert re.search(rf"session {hub.user}/ recovered in [0-9.]+ s", log), log[-3000:]
        url = f"{hub.url}{PREFIX}"
        listed = chspawner_sessions("--url", url, token=hub.token)
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        assert header.split() == ["USER", "SERVER", "STATE", "RECOVERIES", "IMAGE",
                                  "TARGET", "UPDATED"]
        assert rows[-1].split()[:5] == [hub.user, "-", "running", "1", "deb"]
        assert listed.stderr == f"1-{len(rows)} of {len(rows)}\n"
        as_json = json.loads(chspawner_sessions(
            "--url", url, "--json", "--user", hub.user, "--state", "running",
            "--limit", "1", token=hub.token).stdout)
        assert as_json["limit"] == 1 and as_json["total"] == 1
        assert [e["kind"] for e in as_json["sessions"][0]["history"]] == [
            "started", "lost", "recovering", "recovered"]
        none = chspawner_sessions("--url", url, "--state", "recovering", token=hub.token)
        assert none.stdout.splitlines()[1:] == [] and none.stderr == "0-0 of 0\n"
    finally:
        asyncio.run(stop_server(hub))


def test_chspawner_sessions_says_what_went_wrong_in_one_line(observed_hub):
    hub = observed_hub
    url = f"{hub.url}{PREFIX}"
    refused = chspawner_sessions("--url", url, token="not-a-token")
    assert refused.returncode == 1
    assert refused.stderr == (f"chspawner sessions: error: {url}api/sessions: HTTP 403 "
                              f"Forbidden: a JupyterHub token is required\n")
    gone = refused_target()
    unreachable = chspawner_sessions("--url", gone, token=hub.token)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith(f"chspawner sessions: error: the session manager "
                                         f"at {gone} is unreachable: ")
    assert unreachable.stderr.count("\n") == 1


def test_health_is_503_when_the_hub_is_unreachable(tmp_path):
    """The real program, its hub's API refusing connections."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "chspawner-session-manager"), f"--db-url=sqlite:///{tmp_path}/s.db",
         f"--proxy-api-url={refused_target()}", "--interval=0.2",
         "--SessionManager.health_max_age=2"],
        env={"PATH": "/usr/bin:/bin", "JUPYTERHUB_API_URL": f"{refused_target()}/hub/api",
             "JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
             "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        def answer() -> tuple[int, dict] | None:
            try:
                return asyncio.run(health(url))
            except aiohttp.ClientError:
                return None
        started = time.monotonic()
        status, model = wait_until(lambda: (a := answer()) and a[1]["hub"] is False and a,
                                   "the manager's health to answer", 30)
        assert status == 503, model
        assert model["last_check_age"] is None and model["database"] is True
        assert "ClientConnectorError" in model["last_check_error"]
        assert time.monotonic() - started < 30
    finally:
        stop(proc, timeout=30)
    # Its log says why, at the default level (INFO shows the start).
    log = proc.stderr.read()
    assert "checking sessions every 0.2 s" in log and "check failed" in log, log


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["--SessionManager.api_page_size=0",
                                     "--SessionManager.api_max_page_size=10",
                                     "--SessionManager.health_max_age=-1"])
def test_bad_api_settings_are_one_line_and_change_nothing(tmp_path, setting):
    started = subprocess.run(
        [str(VENV_BIN / "chspawner-session-manager"), f"--db-url=sqlite:///{tmp_path}/s.db",
         setting], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60)
    assert started.returncode == 1
    most = 10 if "max_page_size" in setting else 1000
    assert started.stderr == (f"chspawner-session-manager: api_page_size must be at least 1 "
                              f"and at most api_max_page_size ({most}), and health_max_age "
                              f"not negative\n")
    assert list(tmp_path.iterdir()) == []
