"""Alembic migrations of the store's catalog, run by ``Catalog.migrate()`` at start-up.

A new revision (no alembic.ini needed)::

    .venv/bin/python -c "from alembic.config import Config; from alembic import command;
    c = Config(); c.set_main_option('script_location', 'agent/store/migrations');
    command.revision(c, 'what changes', rev_id='0003')"

then rename the file to ``versions/v0003_<what>.py`` and update the tables in
``catalog.py`` / ``audit.py`` so that they match (tests/test_catalog.py compares them).
"""
