"""Live upload in G.711 (issue 19): the encoding a live call's legs arrived in.

- ``live_recordings.encoding``: ``alaw`` (one byte per sample) or ``pcm_s16le`` (two),
  what the call's first append named; its segments' offsets and lengths, and the legs'
  sizes and sha256 in the final document, count bytes in it. Rows from before the
  column (and calls from agents that send no encoding) are ``pcm_s16le``.

Revision ID: 0009_live_encoding
Revises: 0008_control
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_live_encoding"
down_revision: str | None = "0008_control"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("live_recordings") as batch:
        batch.add_column(
            sa.Column("encoding", sa.String(16), nullable=False, server_default="pcm_s16le")
        )


def downgrade() -> None:
    with op.batch_alter_table("live_recordings") as batch:
        batch.drop_column("encoding")
