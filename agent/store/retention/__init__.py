"""Retention: when a recording expires, and the sweeper that destroys it."""
