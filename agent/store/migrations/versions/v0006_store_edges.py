"""The store's edges: the audit chain's head guarded, token expiry, a deny list of
agent certificates.

- ``audit_head`` gets triggers: an UPDATE must leave it as it is (the appender's lock
  step) or move it forward to the newest entry of a chain that follows the old head;
  DELETE (and TRUNCATE on PostgreSQL) is refused. Before, one UPDATE broke every
  audited operation.
- ``access_tokens`` gets ``expires_at_ms`` (NULL: tokens made before expiry existed,
  which keep working until revoked) and ``last_used_at_ms``.
- ``agent_denylist``: certificate serials or whole sites the store refuses at ingest
  (``callrec certs revoke``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None

_MESSAGE = "audit_head: only an append may move the chain head"
# COALESCE: a missing entry must make the test false, not NULL (which passes a WHEN NOT).
_NEWEST = "COALESCE((SELECT entry_hash FROM audit_events WHERE seq = NEW.seq), '')"
_FOLLOWS = "COALESCE((SELECT prev_hash FROM audit_events WHERE seq = OLD.seq + 1), '')"
_EXTENDS = (
    "(NEW.id = OLD.id AND NEW.seq = OLD.seq AND NEW.last_hash = OLD.last_hash) OR "
    "(NEW.id = OLD.id AND NEW.seq > OLD.seq "
    f"AND NEW.last_hash = {_NEWEST} AND OLD.last_hash = {_FOLLOWS})"
)
_SQLITE = [
    f"CREATE TRIGGER audit_head_guard BEFORE UPDATE ON audit_head FOR EACH ROW "
    f"WHEN NOT ({_EXTENDS}) BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
    f"CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head "
    f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END",
]
_PG = [
    "CREATE FUNCTION callrec_audit_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN "
    f"IF TG_OP = 'UPDATE' AND ({_EXTENDS}) THEN RETURN NEW; END IF; "
    f"RAISE EXCEPTION '{_MESSAGE}'; "
    "END $$",
    "CREATE TRIGGER audit_head_guard BEFORE UPDATE OR DELETE ON audit_head "
    "FOR EACH ROW EXECUTE FUNCTION callrec_audit_head_guard()",
    "CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
    "FOR EACH STATEMENT EXECUTE FUNCTION callrec_audit_head_guard()",
]


def upgrade() -> None:
    is_pg = op.get_bind().dialect.name == "postgresql"
    for statement in _PG if is_pg else _SQLITE:
        op.execute(statement)
    with op.batch_alter_table("access_tokens") as batch:
        batch.add_column(sa.Column("expires_at_ms", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("last_used_at_ms", sa.BigInteger, nullable=True))
    op.create_table(
        "agent_denylist",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("value", sa.String(64), primary_key=True),
        sa.Column("denied_at_ms", sa.BigInteger, nullable=False),
        sa.Column("denied_by", sa.String(200), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("agent_denylist")
    with op.batch_alter_table("access_tokens") as batch:
        batch.drop_column("last_used_at_ms")
        batch.drop_column("expires_at_ms")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_head_no_truncate ON audit_head")
        op.execute("DROP TRIGGER audit_head_guard ON audit_head")
        op.execute("DROP FUNCTION callrec_audit_head_guard()")
    else:
        op.execute("DROP TRIGGER audit_head_no_delete")
        op.execute("DROP TRIGGER audit_head_guard")
