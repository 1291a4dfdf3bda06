"""The records' schema: Alembic migrations, applied at the manager's start.

The revisions live in session_proxy/manager/migrations (shipped in the
package). ``upgrade_to_head`` brings a database to the newest one the
code knows; a database made before migrations existed (the tables, no
``alembic_version``) is adopted by stamping it with the first revision,
whose schema it has, and a database newer than the code is refused: an
older manager must not write records whose schema it does not know.
"""
from __future__ import annotations

import logging
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)
# The revision whose schema the pre-migration manager's create_all made.
FIRST = "0001"
PRE_MIGRATION_TABLES = {"sessions", "events"}
# pg_advisory_xact_lock's key for the migrations (any constant of our own).
MIGRATION_LOCK = 0x63687370  # "chsp"


class SchemaError(Exception):
    """The database can't be brought to the code's schema (one line)."""


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location",
                        str(files("session_proxy.manager") / "migrations"))
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Adopt a pre-migration database, refuse a newer one, then upgrade."""
    cfg = config()
    script = ScriptDirectory.from_config(cfg)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two managers starting at once (several hubs on one database):
            # one migrates, the other waits, then finds nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        revision = current(connection)
        if revision is None:
            adopt(cfg, connection)
        elif revision not in {s.revision for s in script.walk_revisions()}:
            raise SchemaError(
                f"the session records are at schema revision {revision}, which this "
                f"chspawner-session-manager does not know (its newest is "
                f"{script.get_current_head()}): the database was upgraded by a newer "
                f"version; run that one, or restore a backup")
        command.upgrade(cfg, "head")


def adopt(cfg: Config, connection: Connection) -> None:
    """Stamp a database made by create_all before migrations with the
    revision it has; an empty one is left for the upgrade to create."""
    tables = set(inspect(connection).get_table_names())
    found = tables & PRE_MIGRATION_TABLES
    if not found:
        return
    if found != PRE_MIGRATION_TABLES:
        raise SchemaError(f"the session records have the table(s) {', '.join(sorted(found))} "
                          f"but not {', '.join(sorted(PRE_MIGRATION_TABLES - found))}, and "
                          f"no schema revision: not a database this manager made")
    log.info("session records made before migrations: adopted as revision %s", FIRST)
    command.stamp(cfg, FIRST)
