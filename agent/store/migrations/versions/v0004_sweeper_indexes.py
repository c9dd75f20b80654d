"""Indexes for the sweeper at scale.

``ix_recordings_destroy`` (every row's ``destroy_reason``, NULL for all but the few
being destroyed) is replaced by the partial index ``ix_recordings_destroying`` on
``recording_id`` of only the rows being destroyed: it serves the sweeper's resume of
half-done work (``destroy_reason IS NOT NULL ORDER BY recording_id``), and SQLite's
planner, which has no statistics (the store never runs ANALYZE), no longer picks the
old index for ``destroy_reason IS NULL`` — a scan and sort of every live row — when the
sweeper picks the oldest expired recordings by ``ix_recordings_ended``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None

_DESTROYING = sa.text("destroy_reason IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_recordings_destroying",
        "recordings",
        ["recording_id"],
        sqlite_where=_DESTROYING,
        postgresql_where=_DESTROYING,
    )
    op.drop_index("ix_recordings_destroy", table_name="recordings")


def downgrade() -> None:
    op.create_index("ix_recordings_destroy", "recordings", ["destroy_reason"])
    op.drop_index("ix_recordings_destroying", table_name="recordings")
