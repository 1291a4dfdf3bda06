"""The records as the session manager created them before migrations:
sessions and their events.

A database made then (these tables, no alembic_version) is stamped with
this revision at start rather than created again (see schema.adopt).

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Exactly what Base.metadata.create_all made: same types, lengths and
    # nullability (Mapped[...] without Optional: NOT NULL).
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("server_name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("image", sa.String(255), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("user_options", sa.JSON(), nullable=False),
        sa.Column("url", sa.String(1024), nullable=False),
        sa.Column("target", sa.String(1024), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("kernels", sa.JSON(), nullable=False),
        sa.Column("recoveries", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(2048), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("sessions")
