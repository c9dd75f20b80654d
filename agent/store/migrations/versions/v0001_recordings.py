"""The recordings table as the first store made it.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("recording_id", sa.String(32), primary_key=True),
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("call_ref", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_at_ms", sa.BigInteger, nullable=False),
        sa.Column("service_number", sa.String(32), nullable=True),
        sa.Column("customer_kind", sa.String(16), nullable=False),
        sa.Column("customer_masked", sa.String(32), nullable=False),
        sa.Column("customer_digest", sa.String(64), nullable=True),
        sa.Column("customer_digest_key_id", sa.String(32), nullable=True),
        sa.Column("customer_tail_sealed", sa.Text, nullable=True),
        sa.Column("employee_id", sa.String(64), nullable=False),
        sa.Column("employee_name", sa.String(200), nullable=False),
        sa.Column("employee_team", sa.String(64), nullable=True),
        sa.Column("employees_json", sa.Text, nullable=False),
        sa.Column("flags", sa.String(400), nullable=False),
        sa.Column("audio_format", sa.String(8), nullable=False),
        sa.Column("channels", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(200), nullable=False),
        sa.Column("region", sa.String(32), nullable=False),
        sa.Column("stored_at_ms", sa.BigInteger, nullable=False),
        sa.Column("legal_hold", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("restricted", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_recordings_started", "recordings", ["started_at_ms"])
    op.create_index("ix_recordings_ended", "recordings", ["ended_at_ms"])
    op.create_index("ix_recordings_employee", "recordings", ["employee_id", "started_at_ms"])
    op.create_index("ix_recordings_team", "recordings", ["employee_team", "started_at_ms"])
    op.create_index("ix_recordings_digest", "recordings", ["customer_digest", "started_at_ms"])


def downgrade() -> None:
    op.drop_table("recordings")
