"""Alembic's entry point for the session manager's records.

Run by session_proxy.manager.schema with a connection already open (in
``config.attributes["connection"]``), never from an alembic.ini: the
manager upgrades its own database at start, from the URL it was given.
"""
from __future__ import annotations

from alembic import context

from session_proxy.manager.records import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters a table by copying it: later revisions' op.batch_alter_table
    # needs this to work there as on PostgreSQL.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
