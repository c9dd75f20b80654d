"""sd_notify(3) without a library: tell systemd we are ready, alive or stopping.

The service manager passes an ``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET`` (a
leading ``@`` names a socket in the abstract namespace); each message is one datagram
of newline-separated ``KEY=value`` assignments. Outside systemd (tests, a terminal)
the variable is unset and every call is a no-op that returns ``False``.

The environment is read at each call, never at import. The units use
``NotifyAccess=main``: only the daemon's main process may send; messages from the
agent's worker processes (which inherit ``$NOTIFY_SOCKET``) are ignored by systemd.
"""

from __future__ import annotations

import os
import socket

from agent import logs

log = logs.get_logger(__name__)

# A stuck service manager must not hang the daemon's main loop.
_SEND_TIMEOUT_S = 2.0


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns True if the datagram was sent, False if there is no socket to send to or
    the send failed (logged; a daemon keeps running without its supervisor's ear).
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("sd_notify_skipped", reason="unsupported_address", socket=raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify_failed", socket=raw, error=str(exc))
        return False
    return True


def ready() -> bool:
    """The daemon is up (SIP and gRPC listening): ``READY=1``."""
    return notify("READY=1")


def stopping() -> bool:
    """Shutdown has begun: ``STOPPING=1``."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive from the main loop: ``WATCHDOG=1``."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """One line for ``systemctl status``: ``STATUS=<text>`` (newlines become spaces)."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def human_bytes(size: float) -> str:
    """1234567 → "1.2 MB" (decimal units, as ``df -H`` and most dashboards)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None if not enabled.

    None also when ``$WATCHDOG_PID`` is set to another process (the variable was
    inherited, so the watchdog is not ours to feed) or a value is malformed. Ping at
    least every half of the returned interval.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and _positive_int(pid) != os.getpid():
        return None
    usec = _positive_int(os.environ.get("WATCHDOG_USEC", ""))
    if usec is None:
        return None
    return usec / 1_000_000


def _positive_int(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None
