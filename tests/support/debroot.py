"""A clean Debian root in a folder, for installing a package as on a fresh server.

The root comes from ``debootstrap --variant=minbase`` (Debian's mirror, its default)
once, kept as a tar file in a cache folder outside the repository
(``$CALLREC_CI_CACHE``, default ``/var/cache/callrec-ci``); each use unpacks a fresh
copy. Packages that ``apt-get`` downloads inside it are kept in the cache too, so a
second run fetches nothing. Needs root (chroot, mount) and debootstrap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("CALLREC_CI_CACHE", "/var/cache/callrec-ci"))
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}


def usable() -> str | None:
    """Why a root cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (chroot, mount)"
    if shutil.which("debootstrap") is None:
        return "debootstrap not installed (.ci/setup installs it)"
    return None


def base_tar(suite: str, include: tuple[str, ...] = ()) -> Path:
    """The cached minbase tar of ``suite`` (made on first use, ~1.5 min)."""
    name = "-".join((suite, "minbase", *include))
    tar = CACHE / f"{name}.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"{name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    extra = [f"--include={','.join(include)}"] if include else []
    subprocess.run(
        ["debootstrap", "--variant=minbase", *extra, suite, str(work)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    subprocess.run(["tar", "-C", str(work), "-cf", f"{tar}.part", "."], check=True, timeout=300)
    Path(f"{tar}.part").rename(tar)
    shutil.rmtree(work)
    return tar


@dataclass
class Root:
    path: Path
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self, command: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``sh -c command`` inside the root, with a clean environment."""
        result = subprocess.run(
            ["chroot", str(self.path), "/bin/sh", "-c", command],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command}: exit {result.returncode}\n{result.stderr[-3000:]}")
        return result

    def timed(self, name: str, command: str, timeout: float = 900) -> None:
        start = time.monotonic()
        self.run(command, timeout=timeout)
        self.timings[name] = time.monotonic() - start


@contextmanager
def clean_root(suite: str, parent: Path, include: tuple[str, ...] = ()) -> Iterator[Root]:
    """A fresh copy of the cached root under ``parent`` with /proc mounted, DNS and the
    host's CA bundle (TLS to the package registries), and apt's archive cache shared."""
    start = time.monotonic()
    tar = base_tar(suite, include)
    path = parent / suite
    path.mkdir()
    subprocess.run(["tar", "-C", str(path), "-xf", str(tar)], check=True, timeout=300)
    shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.exists() and (path / "etc/ssl/certs").is_dir():
        shutil.copy(host_ca, path / "etc/ssl/certs/ca-certificates.crt")
    archives = CACHE / f"{suite}-apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    mounts = [path / "proc", path / "var/cache/apt/archives"]
    subprocess.run(["mount", "-t", "proc", "proc", str(mounts[0])], check=True)
    try:
        subprocess.run(["mount", "--bind", str(archives), str(mounts[1])], check=True)
        root = Root(path, {"root": time.monotonic() - start})
        yield root
    finally:
        for mount in reversed(mounts):
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        # Never delete through a mount that is still there (the shared apt cache).
        if not any(os.path.ismount(mount) for mount in mounts):
            shutil.rmtree(path, ignore_errors=True)
