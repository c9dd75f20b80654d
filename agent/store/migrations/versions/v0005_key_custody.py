"""Key custody: no number digests in the catalog, a registry of master keys.

- ``customer_digest`` / ``customer_digest_key_id`` are emptied: they were HMACs made
  on agent hosts with a lookup key every agent held, so a copy of the catalog plus
  any agent's ``lookup.key`` rebuilt every number. The store now finds a number's
  calls by masked form + time and opens their sealed tails (``agent.store.keys.numbers``),
  so the digests serve nothing. The columns stay (always NULL) for older readers.
- ``ix_recordings_masked`` (masked form, start) replaces ``ix_recordings_digest``.
- ``master_keys``: every master key this catalog's data keys may be wrapped by, with
  a check value (a wrapped constant) so that a store whose key file differs — another
  replica's own key, a stale copy — refuses to start instead of writing recordings
  no other replica can open (``agent.store.keys.master.open_master_keys``).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE recordings SET customer_digest = NULL, customer_digest_key_id = NULL "
        "WHERE customer_digest IS NOT NULL OR customer_digest_key_id IS NOT NULL"
    )
    # A catalog adopted from before the migrations (create_all) may lack it.
    op.drop_index("ix_recordings_digest", table_name="recordings", if_exists=True)
    op.create_index("ix_recordings_masked", "recordings", ["customer_masked", "started_at_ms"])
    op.create_table(
        "master_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("check_value", sa.LargeBinary, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("retired_at_ms", sa.BigInteger, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("master_keys")
    op.drop_index("ix_recordings_masked", table_name="recordings")
    op.create_index("ix_recordings_digest", "recordings", ["customer_digest", "started_at_ms"])
