"""The README's first command keeps working: `callrec demo` on the embedded defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.audio import channel_rms
from tests.support.daemons import REPO

pytestmark = [pytest.mark.sip]


def test_demo_places_a_call_and_shows_it_stored(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--dir", str(demo), "--seconds", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"customer=\+358401234\*\*\*\s+employee=\"Aino Virtanen\"", output), output
    assert "NOT FOUND (good)" in output
    assert (
        "`callrec dsr find` (number on stdin, ±15 min): 1 recording(s) within ±15 min (the call)"
        in output
    )
    assert "event=recording_uploaded" in output and "event=recording_stored" in output
    exported = list(demo.glob("recording-*.ogg"))
    assert len(exported) == 1
    left, right = channel_rms(exported[0])
    assert left > 300 and right > 300
