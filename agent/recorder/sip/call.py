"""One call as the engine sees it: the pjsua2 ``Account``/``Call`` adapters (their
callbacks only translate into events on the engine's deque), the :class:`CallSession`
that carries a call from its INVITE to the capture's move to ``ready``, and what is
read of a call's streams (RTP counts, legs that stopped growing)."""

from __future__ import annotations

import collections
import datetime as dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pjsua2 as pj

from agent import logs, metrics
from agent.capture import CaptureMeta, Flag, parse_iso, utc_now
from agent.config import SipConfig
from agent.recorder.diskspace import LEG_BYTES_PER_S, log_recording_stopped, stalled_legs
from agent.recorder.front import edge
from agent.recorder.ownership import CaptureOwner
from agent.recorder.parties import CallPlan

if TYPE_CHECKING:
    from agent.recorder.sip.engine import SipEngine

log = logs.get_logger("agent.recorder.sip")

_UPDATE_METHODS = ("INVITE", "UPDATE")
BYE_LATE_S = 0.2  # a BYE read this much after the front received it is logged


class SipAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, engine: SipEngine) -> None:
        super().__init__()
        self._engine = engine

    @property
    def sip(self) -> SipConfig:
        return self._engine.cfg.sip

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        try:
            self._engine._incoming(self, prm)
        except Exception:
            log.exception("incoming_failed")


class SipCall(pj.Call):  # type: ignore[misc]
    def __init__(self, account: SipAccount, call_id: int, session: CallSession) -> None:
        super().__init__(account, call_id)
        self.session = session
        self._sip = account.sip

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        try:
            state = self.getInfo().state
            if state == pj.PJSIP_INV_STATE_CONFIRMED:
                self.session.acknowledged = True
            elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.session.disconnected(utc_now(), self._bye_stamp(prm.e))
        except Exception:
            log.exception("call_state_failed")

    def _bye_stamp(self, event: pj.SipEvent) -> float | None:
        """The front's receive time of the BYE that ended the call, if it stamped one."""
        if event.type != pj.PJSIP_EVENT_TSX_STATE:
            return None
        change = event.body.tsxState
        tsx = change.tsx
        if change.type != pj.PJSIP_EVENT_RX_MSG or tsx.role != pj.PJSIP_ROLE_UAS:
            return None  # not a BYE received (the SRC's answer to ours, say)
        if tsx.method != "BYE":
            return None
        rdata = change.src.rdata
        return edge.received_stamp(self._sip, rdata.srcAddress, rdata.wholeMsg)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.session.events.append(("media", self.session))

    def onStreamDestroyed(self, prm: pj.OnStreamDestroyedParam) -> None:
        """The last look at a stream's counters: the once-a-second sampling would miss
        the end of the call."""
        try:
            rx = self.getStreamStat(prm.streamIdx).rtcp.rxStat
            self.session.final_rx[prm.streamIdx] = (rx.pkt, rx.loss)
        except Exception:
            log.exception("stream_stat_failed", call_ref=self.session.ref)

    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        """A re-INVITE or UPDATE received in the dialog: keep its text if it carries
        recording metadata (read later, outside the callback)."""
        try:
            event = prm.e
            if event.type != pj.PJSIP_EVENT_TSX_STATE:
                return
            change = event.body.tsxState
            tsx = change.tsx
            if (
                change.type != pj.PJSIP_EVENT_RX_MSG
                or tsx.role != pj.PJSIP_ROLE_UAS
                or tsx.state != pj.PJSIP_TSX_STATE_TRYING
                or tsx.method not in _UPDATE_METHODS
            ):
                return
            raw = change.src.rdata.wholeMsg
            if edge.has_metadata(raw):
                self.session.updates.append((utc_now(), raw))
                self.session.events.append(("update", self.session))
        except Exception:
            log.exception("call_tsx_failed")


@dataclass(eq=False)
class CallSession:
    """One INVITE from arrival to the capture's move to ``ready``."""

    events: collections.deque[tuple[str, CallSession]] = field(repr=False)
    call: SipCall | None = field(default=None, repr=False)
    invite: str | None = field(default=None, repr=False)  # raw INVITE until it is read
    source: str = ""  # where the INVITE came from ("address:port")
    acknowledged: bool = False  # the SRC's ACK of our 200 arrived
    updates: list[tuple[dt.datetime, str]] = field(default_factory=list, repr=False)
    ref: str = ""
    plan: CallPlan | None = field(default=None, repr=False)
    meta: CaptureMeta | None = None
    directory: Path | None = None
    recorders: dict[int, pj.AudioMediaRecorder] = field(default_factory=dict, repr=False)
    answered_mono: float = 0.0
    rx_packets: int = -1
    rx_mono: float = 0.0
    rx_counted: dict[int, tuple[int, int]] = field(default_factory=dict)  # packets, lost
    final_rx: dict[int, tuple[int, int]] = field(default_factory=dict)  # at stream end
    ended_at: dt.datetime | None = None
    bye_stamp: float | None = None  # the front's receive time of the BYE (edge.call_end)
    recording_from: dt.datetime | None = None  # the legs' first sample (recorders started)
    audio_until_s: float | None = None  # the legs are cut to this (the front's end)
    close_deadline: float = 0.0
    flags: list[Flag] = field(default_factory=list)
    owner: CaptureOwner | None = field(default=None, repr=False)  # the capture's lock
    leg_sizes: dict[str, int] = field(default_factory=dict)  # at the last look
    retry_at: float = 0.0  # closing failed (a full disk): try again then
    resume_at: float = 0.0  # a resume waits out the jitter buffers until then (commands)
    on_sink: bool = False  # the streams play into the null sound device (paused)

    def disconnected(self, at: dt.datetime, bye_stamp: float | None = None) -> None:
        """From ``onCallState``: release the Call now (see the package docstring)."""
        self.ended_at, self.bye_stamp = at, bye_stamp
        self.call = None
        self.events.append(("ended", self))

    def end_at_front(self) -> None:
        """An answered call ends when the front received its BYE, if it stamped one and
        the stamp is sane (:func:`edge.call_end`): a worker starved of CPU reads the BYE
        late and records silence (the sender stopped) until it does. The legs are then
        cut to that end (``audio_until_s``, from their first sample)."""
        if self.bye_stamp is None or self.meta is None:
            return
        own = self.ended_at or utc_now()
        try:
            end, refused = edge.call_end(own, self.bye_stamp, parse_iso(self.meta.started_at))
        except (ValueError, OverflowError, OSError):  # never in the way of closing the call
            end, refused = own, "unreadable"
        rid = self.meta.recording_id
        if refused is not None:
            late = round(own.timestamp() - self.bye_stamp, 3)
            log.warning("bye_stamp_ignored", recording_id=rid, reason=refused, stamp_late_s=late)
            return
        self.ended_at = end
        if self.recording_from is not None:
            self.audio_until_s = (end - self.recording_from).total_seconds()
        late_s = (own - end).total_seconds()
        if late_s >= BYE_LATE_S:
            log.info("bye_read_late", recording_id=rid, late_s=round(late_s, 3))


# ---------------------------------------------------------------- what is read of it


def count_rtp(session: CallSession, now: dict[int, tuple[int, int]]) -> None:
    """Add what each recorded stream received (and lost) since the last look to the
    metrics, labelled by the party whose leg it is."""
    legs = session.plan.legs if session.plan is not None else {}
    for index, (packets, lost) in now.items():
        before_packets, before_lost = session.rx_counted.get(index, (0, 0))
        party = legs.get(index, "unknown").removesuffix(".wav")
        metrics.RTP_PACKETS_RECEIVED.labels(party).inc(max(0, packets - before_packets))
        metrics.RTP_PACKETS_LOST.labels(party).inc(max(0, lost - before_lost))
        session.rx_counted[index] = (packets, lost)


def rtp_received(session: CallSession) -> dict[str, tuple[int, int]]:
    """Packets received and lost per party over the whole call (counted into the
    metrics here for the part after the last sample)."""
    count_rtp(session, session.final_rx)
    legs = session.plan.legs if session.plan is not None else {}
    return {
        legs.get(index, f"stream{index}").removesuffix(".wav"): counts
        for index, counts in sorted(session.rx_counted.items())
    }


def check_legs(session: CallSession, now: float) -> None:
    """Stop recording a call whose legs stopped growing while the call runs (their
    writes fail: the disk is full): each leg keeps what was written, without a hole
    later; the call goes on to its BYE and is flagged incomplete."""
    if not session.recorders or session.directory is None or session.meta is None:
        return
    expected = (now - session.answered_mono) * LEG_BYTES_PER_S
    legs = [session.directory / leg for leg in session.meta.legs]
    stalled = stalled_legs(legs, session.leg_sizes, expected)
    if stalled:
        session.recorders.clear()  # pjsua closes the files: the header gets the sizes
        session.flags.append(Flag.INCOMPLETE)
        meta, directory = session.meta, session.directory
        log_recording_stopped(meta.recording_id, directory, stalled, session.leg_sizes)


def receiving_streams(call: SipCall, session: CallSession) -> list[int]:
    """Recorded streams that exist and are meant to receive (not a=inactive)."""
    info = call.getInfo()  # keep it alive: .media points into it (SWIG)
    legs = session.plan.legs if session.plan is not None else {}
    return [
        m.index
        for m in info.media
        if m.index in legs and m.audioConfSlot >= 0 and m.dir & pj.PJMEDIA_DIR_DECODING
    ]


def discard_capture(session: CallSession) -> None:
    """Undo ``SipEngine._open_capture`` for a call that is not answered after all."""
    session.recorders.clear()
    if session.owner is not None:
        session.owner.release()
        session.owner = None
    if session.directory is not None:
        shutil.rmtree(session.directory, ignore_errors=True)
    session.plan = session.meta = session.directory = None
