"""Recorder workers forked from a pre-imported parent: the zygote (``[sip] worker_start
= "fork"``, the default).

A worker that starts its own Python imports pjsua2, prometheus_client, cryptography and
phonenumbers for itself: ~23 MB of private heap per worker, ~110 workers for 400 calls
(issue 20). The zygote imports all of it once (pjsua2 is imported, never initialised:
``libCreate`` runs in the worker), moves its objects out of the garbage collector's
reach (``gc.freeze``: a collection would otherwise write to every page) and forks each
worker on the agent's request, so the workers share those pages copy-on-write.

The agent stays every worker's parent, as with ``exec``: it is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), the zygote forks twice and the middle process exits at
once, so the worker is re-parented to the agent before its pid is answered. The agent
then waits for it, reads its exit code and signals it as a process it started itself;
the worker asks for its parent-death signal (SIGUSR2 when the agent dies) only once
the agent is its parent. A zygote that dies takes no worker with it: the agent starts
workers the ``exec`` way until a new zygote is up.

Requests and answers are datagrams on a socket pair: ``spawn <index>``, with the write
end of the worker's readiness pipe passed along (``SCM_RIGHTS``), answered ``pid
<pid>`` or ``failed <reason>``. The zygote has one thread at every fork; it exits when
the agent closes its end, or dies (its own parent-death signal is SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent import logs

log = logs.get_logger("agent.recorder.zygote")  # also when run as __main__

PR_SET_PDEATHSIG, PR_SET_NAME, PR_SET_CHILD_SUBREAPER = 1, 15, 36
PARENT_GONE = signal.SIGUSR2  # as agent.recorder.worker asks for it
START_TIMEOUT_S = 30.0  # the imports, on a busy host
SPAWN_TIMEOUT_S = 10.0
REPARENT_TIMEOUT_S = 5.0
# What every worker imports: pjsua2, prometheus_client, cryptography, phonenumbers.
PRELOAD = ("agent.recorder.worker",)


class ZygoteError(RuntimeError):
    """The zygote could not start a worker (or is not running)."""


def _prctl(option: int, value: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def become_subreaper() -> None:
    """Orphaned descendants (workers whose middle process exited) come to us."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def process_name(index: int) -> str:
    """The name a forked worker carries (``ps -o comm``, ``/proc/<pid>/comm``)."""
    return f"callrec-w{index}"


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def reap_orphans(keep: frozenset[int]) -> int:
    """Reap the zombies that came to us as a subreaper and that no ``Popen`` waits for:
    those outside our process group (Kamailio's children, killed with their group when
    it died), except ``keep``. How many were reaped."""
    me, group, reaped = os.getpid(), os.getpgrp(), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me and int(fields[2]) != group:
            with contextlib.suppress(ChildProcessError):
                reaped += os.waitpid(int(entry.name), os.WNOHANG)[0] != 0
    return reaped


# ---------------------------------------------------------------- the agent's side


class ForkedWorker:
    """A worker the zygote forked, now our child: the part of ``Popen`` the agent uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, its code unknown
                self.returncode = 255
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while (code := self.poll()) is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The agent's handle on its zygote process."""

    def __init__(self, config_path: Path, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it and wait until it has imported what workers need."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [
            sys.executable, "-m", "agent.recorder.zygote", "--config", str(self.config_path),
            "--socket-fd", str(theirs.fileno()),
        ]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=self.env
            )
        except OSError:
            ours.close()
            raise ZygoteError("could not start the zygote") from None
        finally:
            theirs.close()
        self._sock = ours
        reply = self._receive(START_TIMEOUT_S)
        if reply != "ready":
            self.stop()
            raise ZygoteError(f"zygote: {reply.removeprefix('failed ')}")
        log.info("zygote_started", pid=self.process.pid)

    def spawn(self, index: int, ready_fd: int | None) -> ForkedWorker:
        """Fork worker ``index``; it writes on ``ready_fd`` (passed along) when ready."""
        if self._sock is None or not self.alive:
            raise ZygoteError("the zygote is not running")
        try:
            fds = [] if ready_fd is None else [ready_fd]
            socket.send_fds(self._sock, [f"spawn {index}".encode()], fds)
        except OSError as exc:
            raise ZygoteError(f"zygote: {exc}") from None
        kind, _, value = self._receive(SPAWN_TIMEOUT_S).partition(" ")
        if kind != "pid":
            raise ZygoteError(f"zygote: worker {index}: {value}")
        worker = ForkedWorker(int(value))
        if parent_of(worker.pid) != os.getpid():  # not ours to supervise: refuse it
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            raise ZygoteError(f"zygote: worker {index} is not the agent's child")
        return worker

    def _receive(self, timeout: float) -> str:
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            self.stop()
            return f"failed no answer in {timeout:.0f}s"
        try:
            data = self._sock.recv(4096)
        except OSError as exc:
            data = f"failed {exc}".encode()
        return data.decode(errors="replace") or "failed the zygote exited"

    def stop(self) -> None:
        """It exits when its end of the socket closes; killed if it does not."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.process is None:
            return
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5.0)


# ---------------------------------------------------------------- the zygote's side


def preload() -> None:
    """Import what workers use, and phonenumbers' per-region tables (each worker would
    otherwise load those of the numbers it meets, privately); then freeze it all."""
    for name in PRELOAD:
        importlib.import_module(name)
    from phonenumbers.phonemetadata import PhoneMetadata

    PhoneMetadata.load_all()
    gc.collect()
    gc.freeze()


def serve(sock: socket.socket, config_path: Path) -> int:
    """Answer spawn requests until the agent closes its end."""
    agent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent:
        return 0
    preload()
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        sock.send(b"failed threads exist in the zygote after its imports")
        return 1
    sock.send(b"ready")
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1024, 4)
        if not message:
            return 0
        try:
            reply = f"pid {_fork(sock, config_path, _index(message), fds[:1], agent)}"
        except (OSError, ValueError) as exc:
            reply = f"failed {exc}"
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(reply.encode())


def _index(message: bytes) -> int:
    verb, _, index = message.decode(errors="replace").partition(" ")
    if verb != "spawn" or not index.isdigit():
        raise ValueError(f"unknown request {message[:40]!r}")
    return int(index)


def _fork(sock: socket.socket, config_path: Path, index: int, fds: list[int], agent: int) -> int:
    """Fork twice; the grandchild becomes the worker. Its pid once it is the agent's."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - the middle process only forks and exits
        code = 1
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _become_worker(sock, config_path, index, fds[0] if fds else None, agent)
            os.write(write_end, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        answer = os.read(read_end, 32)
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)  # after this the worker is the agent's child
    if not answer:
        raise OSError("the middle process could not fork")
    return int(answer)


def _become_worker(
    sock: socket.socket, config_path: Path, index: int, ready_fd: int | None, agent: int
) -> None:
    """In the forked worker: wait to be the agent's child, ask for SIGUSR2 when it dies,
    then run as ``python -m agent.recorder.worker`` would. Never returns."""
    code = 1
    try:
        sock.close()
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != agent and time.monotonic() < deadline:
            time.sleep(0.001)
        _prctl(PR_SET_PDEATHSIG, PARENT_GONE)
        if os.getppid() != agent:  # the agent died meanwhile: nobody to record for
            os._exit(0)
        _prctl(PR_SET_NAME, process_name(index).encode())
        worker = importlib.import_module("agent.recorder.worker")
        args = ["--config", str(config_path), "--index", str(index)]
        if ready_fd is not None:
            args += ["--ready-fd", str(ready_fd)]
        code = worker.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("worker_failed", worker=index)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.recorder.zygote")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--socket-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logs.configure("info", identifier="callrec-agent")
    sock = socket.socket(fileno=args.socket_fd)
    try:
        return serve(sock, args.config)
    except KeyboardInterrupt:  # the terminal's Ctrl-C reaches the whole group
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    raise SystemExit(main())
