"""Alembic environment: runs on the connection ``Catalog.migrate()`` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("run the store's migrations through Catalog.migrate()")
    context.configure(
        connection=connection,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
