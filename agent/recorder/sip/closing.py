"""Ended calls on their way to ``ready``: the end of the call is stamped, then the
capture waits for pjsua to close its legs' WAV files (it does so on its clock thread,
~10-20 ms after the recorders' last references drop) and moves. A leg still open after
``CLOSE_WAIT_S`` is flagged incomplete and the capture moves anyway; one that cannot
move (a full disk) is tried again every ``FINISH_RETRY_S``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from agent import logs
from agent.capture import Flag, iso_ms, utc_now
from agent.recorder.session import finish_capture, open_files
from agent.recorder.sip.call import CallSession, rtp_received

log = logs.get_logger("agent.recorder.sip")

CLOSE_WAIT_S = 5.0  # for pjsua to close a leg's WAV file after the call
FINISH_RETRY_S = 1.0  # a capture that could not be closed (full disk) is tried again


class ClosingCaptures:
    """The answered calls of one engine that ended and whose capture has not moved to
    ``ready`` yet; everything runs on the engine's thread."""

    def __init__(self, ready_dir: Path) -> None:
        self.ready_dir = ready_dir
        self._sessions: list[CallSession] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[CallSession]:
        return iter(list(self._sessions))

    @property
    def waiting_for_pjsua(self) -> bool:
        """A capture waits for its legs to close (not for a retry after a full disk)."""
        return any(s.retry_at == 0.0 for s in self._sessions)

    def add(self, session: CallSession) -> None:
        """An answered call ended (its metadata merged, its recorders released): stamp
        its end, then wait for its legs to close."""
        assert session.meta is not None
        session.end_at_front()
        if session.owner is not None:  # recovery's end time, should closing fail for good
            session.owner.beat(iso_ms(session.ended_at or utc_now()))
        if not session.acknowledged:
            log.warning("call_not_acknowledged", recording_id=session.meta.recording_id)
            session.flags.append(Flag.NOT_ACKNOWLEDGED)
        session.close_deadline = time.monotonic() + CLOSE_WAIT_S
        self._sessions.append(session)

    def move_closed(self) -> None:
        """Move every capture whose legs pjsua has closed to ``ready``; one that can't
        be (a full disk) is tried again every FINISH_RETRY_S."""
        if not self._sessions:
            return
        still_open = open_files()
        now = time.monotonic()
        for session in list(self._sessions):
            assert session.meta is not None and session.directory is not None
            if now < session.retry_at:
                continue
            legs = [str(session.directory / leg) for leg in session.meta.legs]
            if any(leg in still_open for leg in legs):
                if now < session.close_deadline:
                    continue
                if Flag.INCOMPLETE not in session.flags:
                    log.warning("leg_not_closed", recording_id=session.meta.recording_id)
                    session.flags.append(Flag.INCOMPLETE)
            try:
                finish_capture(
                    session.meta, session.directory, self.ready_dir,
                    session.ended_at or utc_now(), session.flags, rtp_received(session),
                    session.audio_until_s,
                )  # fmt: skip
            except OSError as exc:
                log.error(
                    "capture_close_failed", recording_id=session.meta.recording_id,
                    error=exc.strerror, retry_in_s=FINISH_RETRY_S,
                )  # fmt: skip
                session.retry_at = now + FINISH_RETRY_S
                continue
            self._sessions.remove(session)
            if session.owner is not None:
                session.owner.release()
                session.owner = None

    def drain(self) -> None:
        """At close: move what pjsua closes within CLOSE_WAIT_S (and a second more)."""
        deadline = time.monotonic() + CLOSE_WAIT_S + 1.0
        while self._sessions and time.monotonic() < deadline:
            time.sleep(0.01)
            self.move_closed()
