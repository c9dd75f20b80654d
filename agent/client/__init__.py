"""The people's client: what ``callrec search``, ``play``, ``audit log`` and ``dsr …``
share (``options``: options, profile applied, channel, token, a recording's fields),
the profile file (``profile``), and the command groups ``dsr`` and ``audit log``. The
commands are wired by ``agent.cli.access``."""
