"""Hash-chained, append-only audit log; per-person access tokens.

Adds purpose, detail, seq, prev_hash, entry_hash to ``audit_events`` (existing entries
are chained in ``event_id`` order), the one-row ``audit_head``, triggers that refuse
UPDATE/DELETE (and TRUNCATE on PostgreSQL) of ``audit_events``, and ``access_tokens``.

The chain format is copied here (version 1), not imported: a migration must keep
doing what it did when it was written. A later batch migration of ``audit_events`` on
SQLite recreates the table and must recreate the triggers.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

_GENESIS = "0" * 64
_MESSAGE = "audit_events is append-only"

_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
    f"CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
]
_PG_TRIGGERS = [
    "CREATE FUNCTION callrec_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN RAISE EXCEPTION '{_MESSAGE}'; END $$",
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION callrec_audit_append_only()",
    "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION callrec_audit_append_only()",
]


def _hash(row: dict[str, object], seq: int, prev: str) -> str:
    content = {
        "v": 1,
        "seq": seq,
        "at_ms": row["at_ms"],
        "actor": row["actor"],
        "action": row["action"],
        "recording_id": row["recording_id"],
        "purpose": "",
        "reason": row["reason"],
        "outcome": row["outcome"],
        "detail": "",
        "prev": prev,
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _chain_existing(conn: sa.Connection) -> tuple[int, str]:
    events = sa.table(
        "audit_events",
        *(sa.column(c) for c in ("event_id", "at_ms", "actor", "action", "recording_id")),
        *(sa.column(c) for c in ("reason", "outcome", "seq", "prev_hash", "entry_hash")),
    )
    rows = [dict(r._mapping) for r in conn.execute(sa.select(events).order_by("event_id"))]
    seq, prev = 0, _GENESIS
    for row in rows:
        seq += 1
        digest = _hash(row, seq, prev)
        conn.execute(
            sa.update(events)
            .where(events.c.event_id == row["event_id"])
            .values(seq=seq, prev_hash=prev, entry_hash=digest)
        )
        prev = digest
    return seq, prev


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("purpose", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("detail", sa.String(400), nullable=False, server_default=""))
        batch.add_column(sa.Column("seq", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("entry_hash", sa.String(64), nullable=True))
    seq, last = _chain_existing(op.get_bind())
    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger, nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("entry_hash", existing_type=sa.String(64), nullable=False)
        batch.create_index("ix_audit_events_seq", ["seq"], unique=True)
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": seq, "last_hash": last}])
    op.create_table(
        "access_tokens",
        sa.Column("token_id", sa.String(16), primary_key=True),
        sa.Column("person_id", sa.String(64), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_access_tokens_person", "access_tokens", ["person_id"])
    is_pg = op.get_bind().dialect.name == "postgresql"
    for statement in _PG_TRIGGERS if is_pg else _SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION callrec_audit_append_only()")
    else:
        op.execute("DROP TRIGGER audit_events_no_update")
        op.execute("DROP TRIGGER audit_events_no_delete")
    op.drop_table("access_tokens")
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_index("ix_audit_events_seq")
        for column in ("entry_hash", "prev_hash", "seq", "detail", "purpose"):
            batch.drop_column(column)
