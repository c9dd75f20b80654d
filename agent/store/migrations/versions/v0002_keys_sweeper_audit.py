"""Wrapped data keys, destruction marks for the sweeper, the audit table.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("recordings") as batch:
        batch.add_column(sa.Column("destroy_reason", sa.String(16), nullable=True))
        batch.add_column(sa.Column("destroy_marked_at_ms", sa.BigInteger, nullable=True))
        batch.create_index("ix_recordings_blob_key", ["blob_key"], unique=True)
        batch.create_index("ix_recordings_destroy", ["destroy_reason"])
    op.create_table(
        "data_keys",
        sa.Column("blob_key", sa.String(200), primary_key=True),
        sa.Column("recording_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("shredded_at_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_data_keys_recording", "data_keys", ["recording_id"])
    op.create_index("ix_data_keys_created", "data_keys", ["created_at_ms"])
    op.create_table(
        "audit_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("recording_id", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
    )
    op.create_index("ix_audit_events_recording", "audit_events", ["recording_id"])
    op.create_index("ix_audit_events_at", "audit_events", ["at_ms"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("data_keys")
    with op.batch_alter_table("recordings") as batch:
        batch.drop_index("ix_recordings_destroy")
        batch.drop_index("ix_recordings_blob_key")
        batch.drop_column("destroy_marked_at_ms")
        batch.drop_column("destroy_reason")
