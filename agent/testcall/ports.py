"""Free UDP ports for test calls (SIP, RTP), below the kernel's ephemeral range."""

from __future__ import annotations

import collections
import os
import socket
import threading


class _Ports:
    """Hands out UDP ports below the kernel's ephemeral range (32768+), so that no
    socket bound to port 0 meanwhile (SIPp, a gRPC client…) can take one we chose."""

    LOW, HIGH = 21000, 32700

    def __init__(self) -> None:
        self.low, self.high = _share(self.LOW, self.HIGH)
        self.cursor = self.low + (os.getpid() * 7919) % (self.high - self.low)
        # Handed out but maybe not bound yet: a pool takes four ranges before its agent
        # binds any, so each is kept apart from the three before it (a search that
        # wraps around would otherwise find the pool's own SIP ports free for its RTP).
        self.recent: collections.deque[range] = collections.deque(maxlen=3)
        # Tests start several SIPps from threads at once: two takes must never share
        # a cursor (three concurrent calls once got the same SIP port twice).
        self.lock = threading.Lock()

    def _free(self, port: int) -> bool:
        return not any(port in given for given in self.recent) and self._bindable(port)

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def take(self, count: int) -> int:
        """The first free stretch of ``count`` ports from the cursor on, wrapping once;
        a busy port moves the search just past it (other tests hold ports here too, so
        a large stretch rarely fits in the fixed windows of its own size)."""
        with self.lock:
            return self._take(count)

    def _take(self, count: int) -> int:
        searched = 0
        while searched < self.high - self.low:
            if self.cursor + count > self.high:
                searched += self.high - self.cursor
                self.cursor = self.low
            start = self.cursor
            busy = next((p for p in range(start, start + count) if not self._free(p)), None)
            if busy is None:
                self.cursor = start + count
                self.recent.append(range(start, start + count))
                return start
            searched += busy + 1 - start
            self.cursor = busy + 1
        raise RuntimeError(f"no {count} free consecutive UDP ports")


def _share(low: int, high: int) -> tuple[int, int]:
    """This process's slice of [low, high): with tests run by pytest-xdist, each worker
    process (``PYTEST_XDIST_WORKER`` gw0, gw1 …) has its own, so two never pick the same
    port before either binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return low, high
    size = (high - low) // count
    index = int(worker[2:]) % count
    return low + index * size, low + (index + 1) * size


_PORTS = _Ports()


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive UDP ports on 127.0.0.1 that are free now."""
    return _PORTS.take(count)


def forget_taken() -> None:
    """The ranges handed out so far are free again (their pool has stopped): a
    benchmark's next, larger step may need them (600 calls take 6,600 RTP ports)."""
    with _PORTS.lock:
        _PORTS.recent.clear()
