"""Recording control from the agent's desk (issue 21).

- ``recordings.pauses_json``: the intervals written as silence, who asked for each
  (``[{"start", "end", "who"}]``; NULL: none).
- ``discarded_recordings``: what remains of a call stopped and discarded at the
  customer's request: the call's facts (masked customer, employees, times), no audio.

Revision ID: 0008_control
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_control"
down_revision: str | None = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("recordings", sa.Column("pauses_json", sa.Text, nullable=True))
    op.create_table(
        "discarded_recordings",
        sa.Column("recording_id", sa.String(32), primary_key=True),
        sa.Column("site", sa.String(63), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("call_ref", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("started_at_ms", sa.BigInteger, nullable=False),
        sa.Column("ended_at_ms", sa.BigInteger, nullable=False),
        sa.Column("customer_masked", sa.String(32), nullable=False),
        sa.Column("employee_id", sa.String(64), nullable=False),
        sa.Column("employees_json", sa.Text, nullable=False),
        sa.Column("flags", sa.String(400), nullable=False),
        sa.Column("discarded_at_ms", sa.BigInteger, nullable=False),
        sa.Index("ix_discarded_started", "started_at_ms"),
    )


def downgrade() -> None:
    op.drop_table("discarded_recordings")
    op.drop_column("recordings", "pauses_json")
