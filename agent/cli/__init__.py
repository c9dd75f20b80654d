"""The ``callrec`` command: the entry point and its parser (``main``), the store's key
commands (``keys``), people's access and the privacy officer's commands (``access``;
their shared options and groups are in ``agent.client``), and what listing commands
share: ``--json``/``--csv`` and the progress line (``tabular``), times as the person at
the terminal reads them (``localtime``).

Kept free of imports: the daemons' own listing commands (``agent.recorder.quarantine``,
``agent.store.ingest.denylist``) use ``tabular`` and must not load the whole CLI."""
