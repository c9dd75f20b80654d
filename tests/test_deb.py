"""The Debian package as an operator meets it: built by .ci/build-deb, installed with
`dpkg -i` + `apt-get -f install` into a clean Debian 12 root (debootstrap minbase, see
tests/support/debroot.py), used there, then removed and purged.

Build ~3-8 min (PyPI wheels, cached by pip between runs), the root ~5 s from its
cached tar (first run: debootstrap, ~1.5 min), the install ~1-2 min (Kamailio, ffmpeg,
systemd and Python from Debian; apt's downloads cached).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import debroot
from tests.support.daemons import REPO

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UNITS = [
    "callrec-agent.service",
    "callrec-front.service",
    "callrec-store.service",
    "callrec-sweep.service",
    "callrec-sweep.timer",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(debroot.usable() is not None, reason=str(debroot.usable())),
]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built here, or CALLREC_DEB: one already built by .ci/build-deb (a quick loop)."""
    if prebuilt := os.environ.get("CALLREC_DEB"):
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(
        ["bash", str(REPO / ".ci/build-deb"), str(out)],
        check=True,
        capture_output=True,
        timeout=1500,
    )
    return out / f"callrec_{VERSION}_amd64.deb"


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[debroot.Root]:
    with debroot.clean_root("bookworm", tmp_path_factory.mktemp("root")) as root:
        (root.path / "tmp" / deb.name).write_bytes(deb.read_bytes())
        root.timed("apt-get update", "apt-get update -qq")
        # dpkg -i stops on the missing dependencies; apt-get -f install brings them.
        root.run(f"dpkg -i /tmp/{deb.name}", check=False)
        root.timed("install", "apt-get -f install -y -qq --no-install-recommends")
        yield root


def test_package_name_and_fields(deb: Path) -> None:
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Package", "Version", "Architecture", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Version: {VERSION}\n" in fields and "Architecture: amd64\n" in fields
    for needed in ("python3.11", "ffmpeg", "kamailio", "systemd", "procps"):
        assert needed in fields.split("Depends:")[1]


def test_version_on_the_path(root: debroot.Root) -> None:
    assert root.run("callrec --version").stdout == f"callrec {VERSION}\n"
    assert root.run("readlink /usr/bin/callrec").stdout == "/opt/callrec/venv/bin/callrec\n"


def test_sip_library_loads_with_only_the_depends(root: debroot.Root) -> None:
    """pjsua2's wheel carries its own libraries: nothing missing on a minbase host."""
    done = root.run("/opt/callrec/venv/bin/python -c 'import pjsua2; print(pjsua2.Endpoint)'")
    assert "Endpoint" in done.stdout
    # The PKCS#11 master-key wrapper (the hsm extra) is bundled too.
    root.run("/opt/callrec/venv/bin/python -c 'import pkcs11'")


def test_no_demo_or_test_call_harness(root: debroot.Root) -> None:
    demo = root.run("callrec demo", check=False)
    assert demo.returncode == 2 and "invalid choice: 'demo'" in demo.stderr
    found = root.run("find /opt/callrec -path '*agent/testcall*' -o -name 'demo.py'").stdout
    assert found == ""


def test_units_verify_cleanly(root: debroot.Root) -> None:
    paths = " ".join(f"/lib/systemd/system/{unit}" for unit in UNITS)
    result = root.run(f"SYSTEMD_COLORS=0 systemd-analyze verify {paths}", check=False)
    assert (result.returncode, result.stderr) == (0, "")


def test_users_from_sysusers(root: debroot.Root) -> None:
    passwd = root.run("getent passwd callrec callrec-store callrec-front").stdout
    homes = {line.split(":")[0]: line.split(":")[5] for line in passwd.splitlines()}
    assert homes["callrec"] == "/var/lib/callrec-agent"
    assert homes["callrec-store"] == "/var/lib/callrec-store"
    assert "callrec-front" in root.run("getent group callrec").stdout
    assert (root.path / "usr/lib/sysusers.d/callrec.conf").exists()


def test_monitoring_files(root: debroot.Root) -> None:
    shared = root.path / "usr/share/callrec/monitoring"
    assert "groups:" in (shared / "callrec-alerts.yml").read_text()
    assert '"panels"' in (shared / "callrec-dashboard.json").read_text()


def test_man_page_and_completion(root: debroot.Root) -> None:
    man = root.run("zcat /usr/share/man/man1/callrec.1.gz").stdout
    assert man.startswith('.TH CALLREC "1"')
    assert "callrec check" in man and "/etc/callrec/agent.toml" in man
    assert "demo" not in man
    completed = root.run(
        "bash -c '. /usr/share/bash-completion/completions/callrec; "
        "COMP_WORDS=(callrec check --); COMP_CWORD=2; _shtab_callrec; echo ${COMPREPLY[@]}'"
    ).stdout
    assert completed.split() == ["--help", "--agent", "--store"]
    assert (
        (root.path / "usr/share/zsh/vendor-completions/_callrec")
        .read_text()
        .startswith("#compdef callrec")
    )


def test_check_passes_on_the_installed_examples(root: debroot.Root) -> None:
    """The examples' own steps: copy, make keys and a pilot CA, `callrec check`."""
    script = """set -e
        cd /etc/callrec
        for f in agent store people; do cp $f.toml.example $f.toml; done
        callrec keys init /etc/callrec/keys >/dev/null
        callrec keys master init --config /etc/callrec/store.toml >/dev/null
        callrec certs ca /etc/callrec/tls >/dev/null
        callrec certs store /etc/callrec/tls --host store.example >/dev/null
        callrec certs agent /etc/callrec/tls --site hel-1 >/dev/null
        callrec check --agent /etc/callrec/agent.toml
        callrec check --store /etc/callrec/store.toml"""
    try:
        assert root.run(script).stdout == "ok\nok\n"
    finally:
        # What the operator made (keys master init opens the catalog in data_dir), so
        # that the purge test sees only what the package left.
        root.run("cd /etc/callrec && rm -rf keys tls agent.toml store.toml people.toml")
        root.run("rm -rf /var/lib/callrec-store")


def test_remove_then_purge_leave_nothing(root: debroot.Root) -> None:
    """Runs last (module order): remove keeps the conffiles (the examples), purge
    takes them; no file of the package is left. The users stay, as Debian's do."""
    files = root.run("dpkg -L callrec").stdout.split()
    root.run("dpkg --remove callrec")
    assert not (root.path / "opt/callrec").exists()
    assert (root.path / "etc/callrec/agent.toml.example").exists()
    root.run("dpkg --purge callrec")
    paths = [root.path / f.lstrip("/") for f in files]
    # Directories (and /lib, a link to one on a merged-/usr system) are shared.
    assert [p for p in paths if p.is_file() or (p.is_symlink() and not p.is_dir())] == []
    assert not (root.path / "etc/callrec").exists()
    stray = root.run(
        "find / -xdev -name '*callrec*' -not -path '/tmp/*' -not -path '/proc/*'"
    ).stdout.split()
    assert stray == []
