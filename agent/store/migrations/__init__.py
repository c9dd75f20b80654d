"""Alembic migrations of the store's catalog, run by ``Catalog.migrate()``."""
