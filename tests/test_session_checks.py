"""How the session manager judges one server from its checks, against
real sockets (no hub): a server that refuses connections is lost after
``lost_after`` checks; one that accepts them and answers nothing is busy,
not lost, until ``stall_timeout``; one that answers is fine."""
from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from session_proxy.manager.app import SessionManager
from session_proxy.manager.records import SessionRecord
from tests.harness.net import refused_target

# Every test on each database of the records (tests/conftest.py's
# records_url): on SQLite no root and no services, part of the fast unit
# layer (pytest -m unit); on PostgreSQL with tests/harness/postgres.py.
pytestmark = pytest.mark.parametrize(
    "records_url", [pytest.param("sqlite", marks=pytest.mark.unit), "postgresql"],
    indirect=True)

KEY = ("alice", "")


@pytest.fixture
def listener():
    """A socket that accepts connections (the kernel does, from its
    backlog) and never answers: a stopped or stuck server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def manager(records_url: str, **settings) -> SessionManager:
    app = SessionManager(db_url=records_url, recover=False,
                         probe_timeout=0.2, **settings)
    app.initialize([])
    with app.store.transaction() as db:
        db.add(SessionRecord(user=KEY[0], server_name=KEY[1], url="/user/alice/"))
    return app


async def check(app: SessionManager, target: str, times: int) -> list[str]:
    """``times`` checks of alice's server at ``target``: the history after."""
    async with app.clients():
        for _ in range(times):
            await app._probe(KEY, "/user/alice/", target)
    with app.store.transaction() as db:
        return [e.kind for e in app.store.find(db, *KEY).events]


def test_a_server_refusing_connections_is_lost_after_lost_after_checks(records_url):
    app = manager(records_url, lost_after=3)
    target = refused_target()
    assert asyncio.run(check(app, target, 2)) == []
    # recover=False: recorded, and left stopped
    assert asyncio.run(check(app, target, 1)) == ["lost", "recovery-failed"]


def test_a_server_that_accepts_but_does_not_answer_is_busy_until_stall_timeout(
        records_url, listener):
    app = manager(records_url, lost_after=2, stall_timeout=60)
    assert asyncio.run(check(app, listener, 4)) == []  # busy, however often asked
    app.stall_timeout = 0  # now it has been stuck long enough
    history = asyncio.run(check(app, listener, 2))
    assert history == ["lost", "recovery-failed"]
    with app.store.transaction() as db:
        detail = app.store.find(db, *KEY).events[0].detail
    assert "accepted connections but answered nothing" in detail, detail


def test_an_answer_clears_the_failures(records_url):
    async def scenario() -> list[str]:
        async def kernels(request: web.Request) -> web.Response:
            return web.json_response([])

        server = web.Application()
        server.router.add_get("/user/alice/api", kernels)
        runner = web.AppRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        answering = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        refused = refused_target()
        async with app.clients():
            for target in (refused, answering, refused, answering, refused):
                await app._probe(KEY, "/user/alice/", target)
        await runner.cleanup()
        with app.store.transaction() as db:
            return [e.kind for e in app.store.find(db, *KEY).events]
    app = manager(records_url, lost_after=2)
    assert asyncio.run(scenario()) == []  # never two failures in a row
