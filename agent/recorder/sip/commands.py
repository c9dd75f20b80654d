"""Control commands on a worker's live calls (pause, resume, discard, status, a late
employee binding), run on the thread that owns pjsua2 (see
:mod:`agent.recorder.control.channel`), and the SIPREC client's own pause (a=inactive
on every recorded stream).

A pause disconnects each stream from its recorder; the idle tone generator stays
connected to every recorder, so the conference bridge goes on writing silence at its
clock and the leg keeps the call's timeline. A discard drops the recorders and
unlinks the legs at once (pjsua closes the files on its clock thread): what stays is
a capture with no audio, flagged ``discarded``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pjsua2 as pj

from agent import logs
from agent.capture import Employee, Flag, iso_ms, utc_now, write_meta
from agent.recorder.control import calls as call_control
from agent.recorder.control.calls import SRC

if TYPE_CHECKING:
    from agent.recorder.sip.call import CallSession

log = logs.get_logger("agent.recorder.sip")

_TEXT_MAX = {"id": 64, "name": 200, "aor": 256, "team": 64}
FRAME_MS = 20  # a jitter buffer frame (ptime)
MAX_HELD_MS = 1000


def _streams(session: CallSession) -> list[tuple[pj.AudioMedia, pj.AudioMediaRecorder]]:
    """The call's audio streams that have a recorder (and a conference port)."""
    call = session.call
    if call is None:
        return []
    info = call.getInfo()  # keep it alive: .media points into it (SWIG)
    found = []
    for media in info.media:
        recorder = session.recorders.get(media.index)
        if recorder is None or media.type != pj.PJMEDIA_TYPE_AUDIO or media.audioConfSlot < 0:
            continue
        found.append((call.getAudioMedia(media.index), recorder))
    return found


def _null_sink() -> pj.AudioMedia:
    """The null sound device's port: what a paused stream plays into."""
    return pj.Endpoint.instance().audDevManager().getPlaybackDevMedia()


def mute(session: CallSession) -> None:
    """Disconnect every stream of the call from its recorder (silence from now on). The
    stream plays into the null sound device meanwhile: a stream without a listener is
    not read, and its jitter buffer would keep the last half second said in the pause
    and hand it to the recorder on resume (measured: 0.42 s)."""
    sink = _null_sink()
    for stream, recorder in _streams(session):
        with contextlib.suppress(pj.Error):  # not connected (a=inactive, or again)
            stream.stopTransmit(recorder)
        stream.startTransmit(sink)  # connecting twice changes nothing
    session.on_sink = True


def unmute(session: CallSession) -> None:
    """The streams off the null sink (the caller connects them to their recorders)."""
    if not session.on_sink:
        return
    sink = _null_sink()
    for stream, _ in _streams(session):
        with contextlib.suppress(pj.Error):  # not connected (a=inactive at the pause)
            stream.stopTransmit(sink)
    session.on_sink = False


def save(session: CallSession) -> None:
    """Write the capture's metadata now (kept in memory if the disk refuses)."""
    assert session.meta is not None and session.directory is not None
    try:
        write_meta(session.directory, session.meta)
    except OSError as exc:
        log.warning(
            "capture_update_deferred", recording_id=session.meta.recording_id, error=exc.strerror
        )


def follow_src(session: CallSession, receiving: bool) -> None:
    """The SRC's own pause: every recorded stream inactive opens a pause (who "src"),
    a stream receiving again closes it (a pause someone else opened stays)."""
    meta = session.meta
    if meta is None or Flag.DISCARDED in meta.flags:
        return
    now = iso_ms(utc_now())
    changed = call_control.close_pause(meta, now, SRC) if receiving else meta
    if not receiving:
        changed = call_control.open_pause(meta, SRC, now)
    if changed != meta:
        session.meta = changed
        save(session)
        event = "recording_resumed" if receiving else "recording_paused"
        log.info(event, recording_id=meta.recording_id, who=SRC)


def pause(session: CallSession, who: str) -> None:
    assert session.meta is not None
    if session.meta.paused:
        return
    mute(session)
    session.meta = call_control.open_pause(session.meta, who, iso_ms(utc_now()))
    save(session)
    log.info("recording_paused", recording_id=session.meta.recording_id, who=who)


def held_back_ms(session: CallSession) -> int:
    """The audio the call's jitter buffers hold now: said before this moment, it would
    reach a recorder connected now. A resume waits it out (on the null sink)."""
    call = session.call
    if call is None:
        return 0
    held = 0
    info = call.getInfo()  # keep it alive: .media points into it (SWIG)
    for media in info.media:
        if media.index in session.recorders and media.audioConfSlot >= 0:
            with contextlib.suppress(pj.Error):
                held = max(held, call.getStreamStat(media.index).jbuf.size * FRAME_MS)
    return min(held, MAX_HELD_MS)


def resume(session: CallSession, who: str, delay_ms: int = 0) -> bool:
    """Close the open pause ``delay_ms`` from now (when the streams will be connected
    again); True when they are to be."""
    assert session.meta is not None
    if not session.meta.paused:
        return False
    at = utc_now() + dt.timedelta(milliseconds=delay_ms)
    session.meta = call_control.close_pause(session.meta, iso_ms(at))
    save(session)
    log.info("recording_resumed", recording_id=session.meta.recording_id, who=who)
    return True


def discard(session: CallSession, who: str) -> None:
    """Stop recording the call and destroy what was recorded of it."""
    assert session.meta is not None and session.directory is not None
    if Flag.DISCARDED in session.meta.flags:
        return
    mute(session)
    session.recorders.clear()  # pjsua closes the files; unlinked, nothing stays on disk
    legs = session.meta.legs
    # The tombstone first: a worker dying now leaves a capture recovery finalizes as
    # discarded (its legs deleted with it), never one whose audio would be kept.
    session.meta = call_control.discarded(session.meta, iso_ms(utc_now()))
    save(session)
    for leg in legs:
        with contextlib.suppress(FileNotFoundError):
            (session.directory / leg).unlink()
    log.warning(
        "recording_discarded", recording_id=session.meta.recording_id, who=who,
        legs_removed=",".join(legs) or "-",
    )  # fmt: skip


def employee_from(doc: object) -> Employee | None:
    """The employee a bind command names (resolved by the agent from its directory)."""
    if not isinstance(doc, dict):
        return None
    fields: dict[str, str | None] = {}
    for key, limit in _TEXT_MAX.items():
        value = doc.get(key)
        if value is None and key == "team":
            fields[key] = None
            continue
        if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
            return None
        fields[key] = value
    at = iso_ms(utc_now())
    ident, name, aor = fields["id"] or "", fields["name"] or "", fields["aor"] or ""
    return Employee(ident, name, aor, at, fields["team"])


def bind(session: CallSession, employee: Employee, who: str) -> None:
    assert session.meta is not None
    bound = call_control.bind_employee(session.meta, employee)
    if bound == session.meta:
        return
    session.meta = bound
    save(session)
    log.info(
        "employee_bound", recording_id=bound.recording_id, employee=employee.id, who=who,
        state="live",
    )  # fmt: skip


def run_command(
    session: CallSession, request: dict[str, Any], reconnect: Callable[[CallSession], None]
) -> dict[str, Any] | None:
    """Apply one command to a live call; an error reply, or None when done (the caller
    answers with the call's status). ``reconnect``: the streams to their recorders."""
    meta = session.meta
    assert meta is not None
    op, who = request.get("op"), request.get("who", "api")
    if not isinstance(who, str) or not call_control.valid_who(who):
        return {"status": 400, "error": "who: expected e.g. 'api:crm'"}
    if op == "status":
        return None
    if Flag.DISCARDED in meta.flags and op != "discard":
        return {"status": 409, "error": "the recording was discarded"}
    if op == "pause":
        pause(session, who)
    elif op == "discard":
        discard(session, who)
    elif op == "employee":
        employee = employee_from(request.get("employee"))
        if employee is None:
            return {"status": 400, "error": "employee: expected id, name, aor (and team)"}
        bind(session, employee, who)
    elif op == "resume":
        delay_ms = held_back_ms(session)
        if resume(session, who, delay_ms):
            session.resume_at = time.monotonic() + delay_ms / 1000
            if not delay_ms:
                reconnect(session)
    else:
        return {"status": 400, "error": "op: expected " + ", ".join(call_control.OPS)}
    return None


def status_reply(session: CallSession) -> dict[str, Any]:
    assert session.meta is not None
    meta = session.meta
    state = call_control.live_state(meta)
    return {"status": 200, "call": call_control.call_status(meta, state)}
