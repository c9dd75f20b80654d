"""From the outbox to the store: the durable outbox, the resumable uploader, the
store's reachability summaries and the outbox's backpressure warnings."""
