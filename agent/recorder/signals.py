"""What a signal handler may touch: a :class:`Flag`, never a lock.

A Python signal handler runs on the main thread between two bytecodes of whatever that
thread was doing: inside ``threading.Event.set()``, ``clear()`` or ``wait()``, or
inside another handler (the same signal again). Those hold the Event's lock, which is
not reentrant, so a handler calling ``Event.set()`` there waits for ever for a lock
its own thread holds. Seen: a worker draining after ``kill -9`` of the agent got the
parent-death signal once per exiting agent thread; one arrived while the previous
handler was inside ``Event.set()`` and the main thread stayed parked on the lock's
futex for good (no BYE answered, never exited). A storm of signals also nests the
handlers until ``RecursionError`` unless each is a few bytecodes.

So handlers only assign a :class:`Flag` (a plain attribute) or count; the loop that
acts on it polls it. A loop that must wake up at once sleeps in :class:`Wakeup`, which
the interpreter's own C-level handler ends by writing to a pipe (``set_wakeup_fd``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterator


class Flag:
    """A boolean a signal handler sets and a loop reads: no lock, nothing to wait on
    (the ``is_set``/``set``/``clear`` of ``threading.Event``, without its deadlock)."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = False

    def set(self) -> None:
        self._value = True

    def clear(self) -> None:
        self._value = False

    def is_set(self) -> bool:
        return self._value


class Wakeup:
    """A sleep of the main thread that any handled signal ends at once: the C-level
    handler writes the signal's number to our pipe (no Python code, no lock)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        # Only the main thread may do this; a full pipe just means "woken" already.
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def wait(self, timeout: float) -> None:
        """Until a signal arrives (or arrived since the last wait) or ``timeout``."""
        select.select([self._read], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


# Sent by other processes (or the kernel on a parent's death), never by a fault of the
# thread itself: safe to keep away from threads that run no Python.
ASYNC_SIGNALS = frozenset(
    {
        signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
        signal.SIGALRM, signal.SIGCHLD,
    }
)  # fmt: skip


@contextlib.contextmanager
def main_thread_only() -> Iterator[None]:
    """Threads started inside (a C library's) inherit a mask blocking
    :data:`ASYNC_SIGNALS`: the kernel then delivers those to the main thread, where
    Python handles them, and never interrupts the library's sleeps and waits."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
