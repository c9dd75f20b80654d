"""Calls streamed while they run (issue 19): the encrypted segments of each leg
(``segments``), the Live gRPC service (``service``) and the archiver that encodes
finished calls into stored recordings (``archiver``)."""
