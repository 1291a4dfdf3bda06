"""The session manager's database: its schema made and upgraded by the
Alembic migrations it ships (session_proxy/manager/migrations), on SQLite
and on PostgreSQL; a records file made before migrations adopted, a
database newer than the code refused; the queries of a round of checks
counted per round, not per session."""
from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from chspawner.images.trees import remove_tree
from session_proxy.manager import schema
from session_proxy.manager.records import Base, SessionRecord, SessionStore, StoreError
from tests.harness.env import VENV_BIN
from tests.harness.hub import Hub, manager_config, server_state, spawn, stop_server
from tests.harness.net import free_port
from tests.harness.wait import wait_until

# Each test that takes records_url runs on both; on SQLite it needs no
# root and no services (the unit layer).
BOTH = pytest.mark.parametrize(
    "records_url", [pytest.param("sqlite", marks=pytest.mark.unit), "postgresql"],
    indirect=True)

# What the manager's Base.metadata.create_all made in an SQLite file
# before there were migrations (chspawner before issue 14), verbatim.
PRE_MIGRATION_SQLITE = [
    """CREATE TABLE sessions (
        id INTEGER NOT NULL, user VARCHAR(255) NOT NULL,
        server_name VARCHAR(255) NOT NULL, state VARCHAR(32) NOT NULL,
        image VARCHAR(255) NOT NULL, mode VARCHAR(32) NOT NULL,
        user_options JSON NOT NULL, url VARCHAR(1024) NOT NULL,
        target VARCHAR(1024) NOT NULL, instance VARCHAR(64) NOT NULL,
        kernels JSON NOT NULL, recoveries INTEGER NOT NULL,
        created DATETIME NOT NULL, updated DATETIME NOT NULL, PRIMARY KEY (id))""",
    """CREATE TABLE events (
        id INTEGER NOT NULL, session_id INTEGER NOT NULL, time DATETIME NOT NULL,
        kind VARCHAR(32) NOT NULL, detail VARCHAR(2048) NOT NULL, PRIMARY KEY (id),
        FOREIGN KEY(session_id) REFERENCES sessions (id))""",
]


def normal(sql: str) -> str:
    return " ".join(sql.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split())


def revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return schema.current(connection)
    finally:
        engine.dispose()


def differences(store: SessionStore) -> list:
    """Where the database's schema differs from the models' (Alembic's
    autogenerate comparison; alembic_version aside)."""
    with store.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def make_pre_migration(path) -> str:
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in PRE_MIGRATION_SQLITE:
            connection.exec_driver_sql(statement)
        connection.exec_driver_sql(
            "INSERT INTO sessions VALUES (1, 'alice', '', 'running', 'deb', 'local', "
            "'{\"image\": \"deb\"}', '/user/alice/', 'http://127.0.0.1:9', '', '[]', 0, "
            "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000')")
        connection.exec_driver_sql(
            "INSERT INTO events VALUES (1, 1, '2026-01-01 00:00:00.000000', 'started', "
            "'at /user/alice/')")
    engine.dispose()
    return url


# ------------------------------------------------------------ migrations --

@BOTH
def test_a_new_database_is_made_by_the_migrations_to_the_models_schema(records_url):
    store = SessionStore(records_url)
    try:
        assert differences(store) == []
        with store.engine.connect() as connection:
            assert schema.current(connection) == schema.head()
        # and it holds records
        with store.transaction() as db:
            record = SessionRecord(user="alice", server_name="", url="/user/alice/")
            db.add(record)
            store.add_event(record, "started")
        assert [e["kind"] for e in store.all()[0]["history"]] == ["started"]
    finally:
        store.engine.dispose()
    # Opened again (the manager restarted): nothing to do, nothing lost.
    again = SessionStore(records_url)
    assert len(again.all()) == 1
    again.engine.dispose()


@pytest.mark.unit
def test_the_first_revision_makes_exactly_the_pre_migration_schema(tmp_path):
    store = SessionStore(f"sqlite:///{tmp_path}/new.sqlite")
    with store.engine.connect() as connection:
        made = [sql for (sql,) in connection.execute(text(
            "SELECT sql FROM sqlite_master WHERE name IN ('sessions', 'events') "
            "ORDER BY name = 'events'"))]
    store.engine.dispose()
    assert [normal(s) for s in made] == [normal(s) for s in PRE_MIGRATION_SQLITE]


@pytest.mark.unit
def test_a_records_file_made_before_migrations_is_adopted_not_made_again(tmp_path):
    url = make_pre_migration(tmp_path / "sessions.sqlite")
    assert revision(url) is None
    store = SessionStore(url)
    try:
        assert differences(store) == []
        sessions = store.all()
        assert [(s["user"], s["target"], s["user_options"]) for s in sessions] == [
            ("alice", "http://127.0.0.1:9", {"image": "deb"})]
        assert [e["kind"] for e in sessions[0]["history"]] == ["started"]
        assert sessions[0]["created"].startswith("2026-01-01")
    finally:
        store.engine.dispose()
    assert revision(url) == schema.head()


def test_a_postgresql_database_made_before_migrations_is_adopted(postgres):
    """A center already on PostgreSQL: the tables the pre-migration
    manager's create_all made there (its models are today's), a record."""
    url = postgres.database()
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(SessionRecord.__table__.insert().values(
            user="alice", server_name="", state="running", image="deb", mode="",
            user_options={}, url="/user/alice/", target="", instance="", kernels=[],
            recoveries=0, created=datetime.datetime.now(datetime.timezone.utc),
            updated=datetime.datetime.now(datetime.timezone.utc)))
    engine.dispose()
    store = SessionStore(url)
    assert [s["user"] for s in store.all()] == ["alice"]
    assert differences(store) == []
    store.engine.dispose()
    assert revision(url) == schema.head()


def test_managers_starting_together_on_one_new_database_both_start(postgres):
    """Several hubs' managers on one PostgreSQL database, started at once:
    one makes the schema, the others wait for it (an advisory lock)."""
    url = postgres.database()
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: SessionStore(url), range(4)))
    for store in stores:
        assert store.all() == []
        store.engine.dispose()
    assert revision(url) == schema.head()


@BOTH
def test_a_downgrade_to_nothing_and_upgrade_again_round_trips(records_url):
    SessionStore(records_url).engine.dispose()
    engine = create_engine(records_url)
    cfg = schema.config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "base")
    with engine.connect() as connection:
        tables = set(connection.dialect.get_table_names(connection))
    assert not tables & {"sessions", "events"}, tables
    engine.dispose()
    store = SessionStore(records_url)
    assert differences(store) == []
    store.engine.dispose()


@BOTH
def test_a_database_newer_than_the_code_is_refused_in_one_line(records_url):
    SessionStore(records_url).engine.dispose()
    engine = create_engine(records_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    engine.dispose()
    with pytest.raises(StoreError, match="revision f00dcafe, which this") as caught:
        SessionStore(records_url)
    assert "\n" not in str(caught.value)
    # The program: one line on stderr, a failed start, the database untouched.
    line = failed_start(records_url)
    assert "f00dcafe" in line, line
    password = make_url(records_url).password
    assert not password or password not in line  # hidden, not echoed
    assert revision(records_url) == "f00dcafe"


def failed_start(url: str) -> str:
    """The session manager started on ``url``: it must fail, with one line
    on stderr, which is returned."""
    result = subprocess.run(
        [str(VENV_BIN / "chspawner-session-manager"), f"--db-url={url}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.unit
def test_tables_that_are_not_the_managers_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/sessions.sqlite"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(PRE_MIGRATION_SQLITE[0])
    engine.dispose()
    with pytest.raises(StoreError, match="not a database this manager made"):
        SessionStore(url)


@pytest.mark.unit
def test_an_unreachable_database_is_one_line(tmp_path):
    line = failed_start("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "127.0.0.1" in line and "secret" not in line, line


# --------------------------------------------------------------- scale --

@BOTH
def test_a_round_over_a_thousand_sessions_costs_a_few_queries(records_url):
    """What a round of checks asks the store (live records, the newest
    record of every listed server, a history written for each), and the
    API's listing: the same few queries for 1,000 sessions as for one."""
    store = SessionStore(records_url)
    keys = {(f"user{i}", "") for i in range(1000)}
    then = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    with store.transaction() as db:
        for user, name in sorted(keys):
            record = SessionRecord(user=user, server_name=name, url=f"/user/{user}/",
                                   created=then, updated=then)
            db.add(record)
            store.add_event(record, "started")
    selects: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    with store.transaction() as db:
        live = store.live(db)
        newest = store.newest(db, keys)
        for record in live:
            store.add_event(record, "moved", "now elsewhere")
    assert len(live) == 1000 and set(newest) == keys
    assert len(selects) <= 3, selects
    selects.clear()
    listed = store.all()
    assert len(listed) == 1000 and all(len(s["history"]) == 2 for s in listed)
    # the records, then their histories 500 at a time (selectinload's batches)
    assert len(selects) <= 3, selects
    store.engine.dispose()


@pytest.mark.unit
def test_the_database_url_can_come_from_a_config_file(tmp_path):
    """So a PostgreSQL password stays out of the hub's service list."""
    from session_proxy.manager.app import SessionManager
    url = f"sqlite:///{tmp_path}/from-file.sqlite"
    config = tmp_path / "manager_config.py"
    config.write_text(f"c.SessionManager.db_url = {url!r}\nc.SessionManager.interval = 5\n")
    app = SessionManager()
    app.initialize([f"--config={config}", "--interval=2"])
    try:
        assert app.db_url == url and (tmp_path / "from-file.sqlite").exists()
        assert app.interval == 2  # the command line wins
    finally:
        app.store.engine.dispose()


# ------------------------------------------------- under a real JupyterHub --

def test_the_manager_keeps_its_records_on_postgresql_under_a_real_hub(
        user, kernel_store, postgres):
    """chspawner-session-manager as the hub's service with its records on
    PostgreSQL: a server killed comes back, a stop is recorded, and the
    history is in the database."""
    url = postgres.database()
    state = Path(tempfile.mkdtemp(prefix="chspawner-manager-"))
    hub = Hub(kernel_store, user.pw_name, extra_config=manager_config(
        state, secrets.token_hex(16), free_port(), db_url=url))
    reader = None
    try:
        result = asyncio.run(spawn(hub, {"image": "deb", "mode": "kernels"}))
        assert result.get("ready"), (result, hub.log()[-3000:])
        # The manager made the schema at start: the test reads what it wrote.
        reader = SessionStore(url)

        def history() -> list[str]:
            found = reader.all(user=user.pw_name)
            return [e["kind"] for e in found[-1]["history"]] if found else []
        wait_until(lambda: history() == ["started"],
                   f"the manager to record it: {hub.log()[-3000:]}", 30)
        os.kill(asyncio.run(server_state(hub))["pid"], signal.SIGKILL)
        wait_until(lambda: "recovered" in history(),
                   f"the session to come back: {history()}", 90)
        assert history() == ["started", "lost", "recovering", "recovered"]
        asyncio.run(stop_server(hub))
        wait_until(lambda: history()[-1:] == ["stopped"], "the stop to be recorded", 30)
        assert [s["state"] for s in reader.all(user=user.pw_name)][-1] == "stopped"
        assert not (state / "sessions.sqlite").exists()  # nothing went to SQLite
    finally:
        if reader is not None:
            reader.engine.dispose()
        hub.stop()
        remove_tree(state)


@pytest.mark.unit
@pytest.mark.parametrize("url, says", [
    ("not a url", "Could not parse"),
    ("postgresql+psycopg2://u@127.0.0.1:1/db", "postgres extra"),  # not installed
    ("nosuchdb://x/y", "nosuchdb"),
])
def test_a_bad_url_is_one_line(url, says):
    with pytest.raises(StoreError, match=says) as caught:
        SessionStore(url)
    assert "\n" not in str(caught.value)
