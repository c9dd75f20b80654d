"""The append-only, hash-chained audit log and the queries that read it."""
