"""Free UDP ports for test calls (SIP, RTP), below the kernel's ephemeral range."""

from __future__ import annotations

import os
import socket


class _Ports:
    """Hands out UDP ports below the kernel's ephemeral range (32768+), so that no
    socket bound to port 0 meanwhile (SIPp, a gRPC client…) can take one we chose."""

    LOW, HIGH = 21000, 32700

    def __init__(self) -> None:
        self.cursor = self.LOW + (os.getpid() * 7919) % (self.HIGH - self.LOW)

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def take(self, count: int) -> int:
        for _ in range((self.HIGH - self.LOW) // count):
            if self.cursor + count > self.HIGH:
                self.cursor = self.LOW
            start, self.cursor = self.cursor, self.cursor + count
            if all(self._bindable(p) for p in range(start, start + count)):
                return start
        raise RuntimeError(f"no {count} free consecutive UDP ports")


_PORTS = _Ports()


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive UDP ports on 127.0.0.1 that are free now."""
    return _PORTS.take(count)
