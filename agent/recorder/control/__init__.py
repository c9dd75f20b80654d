"""Recording control from the agent's desk: the HTTP API (``api``), finding calls and
reaching their workers (``desk``, ``channel``), what commands do to a call's metadata
(``calls``), integration tokens (``tokens``) and the ``callrec control`` client (``cli``)."""
