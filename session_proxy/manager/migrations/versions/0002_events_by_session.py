"""An index on events.session_id: a page of sessions reads its histories
by it (api/sessions joins them to the page), so that costs the page's
events, not a scan of every event ever recorded (a center's records
grow by a few events per session start and recovery).

A PostgreSQL database the pre-migration manager made with today's models
(adopted as 0001) may have the index already: it is made only if missing.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEX = "ix_events_session_id"


def upgrade() -> None:
    existing = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("events")}
    if INDEX not in existing:
        op.create_index(INDEX, "events", ["session_id"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="events")
