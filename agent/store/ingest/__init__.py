"""Receiving recordings from agents: the Upload service, resumable partial uploads,
the bounds on what one agent may send, and the certificate deny list."""
