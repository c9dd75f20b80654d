"""Live upload (issue 19): calls streamed while they run.

- ``live_recordings``: one row per call being streamed or waiting for its archive:
  the manifest as first sent (masked and sealed fields only), the final manifest and
  each leg's size + sha256 once finished, the wrapped data key of its segments, and a
  lease (``claimed_until_ms``) so that one archiver on one replica encodes it.
- ``live_segments``: each leg's piece of each durable append (one encrypted blob per
  append holds its pieces; ``blob_at``/``blob_length`` locate one). A leg's durable
  size is the end of its last segment.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "live_recordings",
        sa.Column("recording_id", sa.String(32), primary_key=True),
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("manifest_json", sa.Text, nullable=False),
        sa.Column("final_json", sa.Text, nullable=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("last_append_ms", sa.BigInteger, nullable=False),
        sa.Column("claimed_until_ms", sa.BigInteger, nullable=True),
        sa.Index("ix_live_state", "state", "last_append_ms"),
        sa.Index("ix_live_site", "site"),
    )
    op.create_table(
        "live_segments",
        sa.Column("recording_id", sa.String(32), primary_key=True),
        sa.Column("leg", sa.String(16), primary_key=True),
        sa.Column("offset", sa.BigInteger, primary_key=True),
        sa.Column("length", sa.Integer, nullable=False),
        sa.Column("blob_key", sa.String(200), nullable=False),
        sa.Column("blob_at", sa.BigInteger, nullable=False),
        sa.Column("blob_length", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("live_segments")
    op.drop_table("live_recordings")
