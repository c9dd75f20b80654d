"""The load tests' RTP sender in compiled code: ``rtpsend.c`` beside this file, built
with the machine's C compiler into a cache directory on first use (never committed as
a binary), run as one process that reads the same FIFO protocol as
:class:`agent.testcall.rtp.FifoControl` (one line per call, ``HOST:PORT=FILE[,src=PORT]``
specs) and sends every stream's packet of a 20 ms tick in one ``sendmmsg`` per socket.

Why not the Python sender: one Python thread at 400 two-stream calls (40,000
packets/s) fell a second behind and saturated a 2-core host (issue 20). Why not
``tcpreplay``: the ports are only known once each call's 200 arrives, so a pcap would
have to be built per call and one replay process started per call, which is what
starved the host before (FACTS.md); one paced process fed by the FIFO is not.

It reports its own lateness (p50/p99/max behind the schedule, in its stats file,
rewritten each second and on SIGUSR1) so a late sender is never read as a recorder's
loss; its CPU is read from ``/proc/<pid>/stat`` by whoever measures it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from agent.testcall.rtp import Lateness

SOURCE = Path(__file__).with_name("rtpsend.c")


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "callrec"


def build(directory: Path | None = None) -> Path:
    """The compiled sender for this source (built once per source digest)."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = (directory or cache_dir()) / f"rtpsend-{digest}"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise BuildError("no C compiler (gcc or cc) to build the RTP load sender")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(partial), str(SOURCE)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{compiler} could not build {SOURCE.name}: {done.stderr[-2000:]}")
    partial.replace(target)  # atomic: concurrent builders never run a half-written file
    return target


def parse_stats(text: str) -> dict[str, int]:
    """The stats file's ``key=value`` pairs (all integers)."""
    pairs = (item.split("=", 1) for item in text.split() if "=" in item)
    return {key: int(value) for key, value in pairs}


class CompiledSender:
    """One ``rtpsend`` process reading ``fifo`` (created here, removed by :meth:`stop`)."""

    def __init__(self, fifo: Path, binary: Path | None = None) -> None:
        self.fifo = fifo
        self.stats_path = fifo.with_name(f"{fifo.name}.stats")
        os.mkfifo(fifo, 0o600)
        self.process = subprocess.Popen([str(binary or build()), str(fifo), str(self.stats_path)])
        deadline = time.monotonic() + 10.0
        while not self.stats_path.exists():  # written once the FIFO is open
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BuildError(f"rtpsend did not start (exit {self.process.returncode})")
            time.sleep(0.01)

    def stats(self) -> dict[str, int]:
        try:
            return parse_stats(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def fresh_stats(self, timeout: float = 2.0) -> dict[str, int]:
        """Stats written after this call (SIGUSR1: within a tick), or the last ones."""
        before = self.stats().get("written", 0)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                figures = self.stats()
                if figures.get("written", 0) > before:
                    return figures
                time.sleep(0.01)
        return self.stats()

    def lateness(self) -> Lateness:
        """Up to now (the process writes its stats on request)."""
        figures = self.fresh_stats()
        return Lateness(
            figures.get("ticks", 0), figures.get("late_p50_us", 0) / 1e6,
            figures.get("late_p99_us", 0) / 1e6, figures.get("late_max_us", 0) / 1e6,
            figures.get("packets", 0),
        )  # fmt: skip

    def thread_ids(self) -> list[int]:
        return [self.process.pid]

    def wait_idle(self, timeout: float, streams: int = 1) -> bool:
        """True once at least ``streams`` streams were taken and all were sent completely
        (the stats file is rewritten each second, so this answers within about one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            figures = self.stats()
            taken = figures.get("streams_added", 0) + figures.get("refused", 0)
            if figures.get("streams_active", 1) == 0 and taken >= streams:
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> Lateness:
        """Stop the process (its final stats are written on SIGTERM) and remove the FIFO."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.fifo.unlink(missing_ok=True)
        return self.lateness()
