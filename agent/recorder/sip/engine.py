"""The calls of one recorder worker: pjsua2 callbacks (:mod:`agent.recorder.sip.call`)
translate into events on a deque, :meth:`SipEngine.poll` handles them on the one thread
that owns pjsua2 (see the package docstring for the measured pjsua2 facts built in)."""

from __future__ import annotations

import collections
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pjsua2 as pj

from agent import logs, metrics
from agent.capture import Flag, iso_ms, new_recording_id, utc_now, write_meta
from agent.config import AgentConfig
from agent.directory import LiveDirectory
from agent.recorder.diskspace import DiskGuard
from agent.recorder.front import edge
from agent.recorder.ownership import CaptureOwner
from agent.recorder.parties import CallPlan, PartyHeaders, PartyRules, plan_call
from agent.recorder.session import call_ref, log_answered, merge_updates, new_meta
from agent.recorder.sip import commands
from agent.recorder.sip.call import (
    CallSession,
    SipAccount,
    SipCall,
    check_legs,
    count_rtp,
    discard_capture,
    receiving_streams,
)
from agent.recorder.sip.closing import ClosingCaptures
from agent.recorder.sip.endpoint import (
    CLOCK_RATE,
    LogWriter,
    account_config,
    add_supported_tag,
    close_idle_clock,
    endpoint_config,
    quiet_pjlib,
)

log = logs.get_logger("agent.recorder.sip")

STATS_INTERVAL_S = 1.0
ACTIVE_POLL_MS = 200  # the loop's longest wait while calls run, should a control wake-up be lost


class SipEngine:
    """pjsua2 endpoint of one recorder worker; everything runs on the caller's thread."""

    def __init__(
        self, cfg: AgentConfig, index: int, directory: LiveDirectory, rules: PartyRules
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.address, self.port = cfg.sip.worker_sip(index)
        self.rtp_start, self.rtp_count = cfg.sip.worker_rtp(index)
        self.active_dir = cfg.captures_dir / "active" / f"w{index}"
        self.ready_dir = cfg.captures_dir / "ready"
        self._directory = directory
        self._rules = rules
        self._space = DiskGuard(cfg.captures_dir, cfg.min_free, index)
        sip = cfg.sip
        self._headers = PartyHeaders(
            sip.customer_header, sip.employee_header, sip.service_header, sip.direction_header
        )
        self._events: collections.deque[tuple[str, CallSession]] = collections.deque()
        self._sessions: list[CallSession] = []  # INVITE received, not yet ended
        self._closing = ClosingCaptures(self.ready_dir)  # ended, not yet in ready
        self._accepting = True
        self._next_stats = 0.0
        self._ep: pj.Endpoint | None = None
        self._writer: LogWriter | None = None
        self._account: SipAccount | None = None
        self._silence: pj.ToneGenerator | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the endpoint, the UDP transport and the account; then take calls."""
        self.active_dir.mkdir(parents=True, exist_ok=True)
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        quiet_pjlib()
        self._ep = pj.Endpoint()
        self._ep.libCreate()
        try:
            self._start_library(self._ep)
        except pj.Error as exc:
            self.close()
            where = f"{self.address}:{self.port}"
            raise RuntimeError(f"SIP worker {self.index} on {where}: {exc.info()}") from None
        log.info(
            "sip_started",
            worker=self.index,
            listen=f"{self.address}:{self.port}",
            rtp=f"{self.cfg.sip.listen}:{self.rtp_start}-{self.rtp_start + self.rtp_count - 1}",
        )

    def _start_library(self, ep: pj.Endpoint) -> None:
        self._writer = LogWriter()
        sip = self.cfg.sip
        ep.libInit(endpoint_config(self._writer, sip.media_thread, sip.frame_ms))
        add_supported_tag("siprec")
        tcfg = pj.TransportConfig()
        tcfg.port = self.port
        tcfg.boundAddress = self.address
        ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        ep.libStart()
        ep.audDevManager().setNullDev()
        close_idle_clock()  # no 20 ms clock while no call is up
        # An idle tone generator feeds every recorder: the bridge then writes silence
        # while a stream has no conference port (a=inactive at the start), and each
        # leg's timeline runs from the answer.
        self._silence = pj.ToneGenerator()
        self._silence.createToneGenerator(CLOCK_RATE, 1)
        self._account = SipAccount(self)
        rtp = (self.cfg.sip.listen, self.rtp_start, self.rtp_count)
        self._account.create(account_config(self.address, self.port, rtp), True)

    def stop_accepting(self) -> None:
        """New INVITEs get 503 from now on (the front tries another worker)."""
        self._accepting = False

    @property
    def active_calls(self) -> int:
        """Calls in progress, and ended calls whose capture has not moved yet."""
        return len(self._sessions) + len(self._closing)

    def capture_names(self) -> set[str]:
        """The capture directories this engine is writing or closing."""
        return {
            s.directory.name for s in (*self._sessions, *self._closing) if s.directory is not None
        }

    def hangup_all(self) -> None:
        for session in list(self._sessions):
            self._hangup(session, 503 if session.meta is None else 200)

    def close(self) -> None:
        """Finalise what is left, drop every pjsua2 object, destroy the library."""
        for session in list(self._sessions):
            if session.call is not None:
                session.disconnected(utc_now())
        self._drain_events()
        self._closing.drain()
        if self._account is not None:
            self._account.shutdown()
            self._account = None
        self._silence = None
        if self._ep is not None:
            self._ep.libDestroy()
            self._ep = None
        self._writer = None
        log.info("sip_stopped", worker=self.index)

    # ------------------------------------------------------------ the loop

    def poll(self, timeout_ms: int) -> None:
        """One turn of the loop: pjsip events, then ours, then the RTP watchdog."""
        assert self._ep is not None
        closing = self._closing.waiting_for_pjsua
        if self._sessions:
            timeout_ms = min(timeout_ms, ACTIVE_POLL_MS)
        resuming = [s for s in self._sessions if s.resume_at]
        self._ep.libHandleEvents(min(timeout_ms, 10) if closing or resuming else timeout_ms)
        self._drain_events()
        self._closing.move_closed()
        for session in resuming:
            if time.monotonic() >= session.resume_at:
                self._connect_media(session)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            self._space.check()
            for session in list(self._sessions):
                try:
                    self._watch(session, now)
                except Exception:  # one call's trouble never leaves the loop
                    log.exception("call_watch_failed", call_ref=session.ref)

    def _drain_events(self) -> None:
        handlers = {
            "incoming": self._answer,
            "media": self._connect_media,
            "update": self._update,
            "ended": self._finish,
        }
        while self._events:
            kind, session = self._events.popleft()
            try:
                handlers[kind](session)
            except pj.Error as exc:
                log.error("call_event_failed", kind=kind, call_ref=session.ref, error=exc.info())
            except Exception:
                log.exception("call_event_failed", kind=kind, call_ref=session.ref)
            else:
                continue
            if kind == "incoming" and session.meta is None:
                self._hangup(session, 500)  # never leave an INVITE unanswered

    # ------------------------------------------------------------ callbacks (translate only)

    def _incoming(self, account: SipAccount, prm: pj.OnIncomingCallParam) -> None:
        rdata = prm.rdata
        session = CallSession(events=self._events, invite=rdata.wholeMsg, source=rdata.srcAddress)
        session.call = SipCall(account, prm.callId, session)
        session.ref = call_ref(session.call.getInfo().callIdString)
        self._sessions.append(session)
        self._events.append(("incoming", session))

    # ------------------------------------------------------------ handlers

    def _answer(self, session: CallSession) -> None:
        raw, session.invite = session.invite or "", None
        call = session.call
        if call is None:  # CANCELled before we got to it: nothing to record
            return
        info = call.getInfo()
        if not self._accepting:
            self._reply(session, 503, "stopping")
            return
        if not self._space.room_for_a_call():
            self._reply(session, 503, "disk_full")
            return
        plan = self._plan(session, raw, info.remAudioCount)
        del raw
        if plan is None:
            return
        if not plan.legs:
            self._reply(session, 488, "no_audio")
            return
        if not self._open_capture(session, plan):
            self._reply(session, 503, "disk_full")
            return
        prm = pj.CallOpParam(True)
        prm.statusCode = 200
        prm.opt.audioCount = plan.audio_count
        try:
            call.answer(prm)
        except pj.Error:
            discard_capture(session)
            raise
        session.answered_mono = session.rx_mono = time.monotonic()
        self._stamp_answer(session, plan, utc_now())
        assert session.meta is not None
        log_answered(session.meta, plan, self.index)

    def _stamp_answer(self, session: CallSession, plan: CallPlan, started: dt.datetime) -> None:
        """The call starts when the 200 went out: ``capture.json`` (written before it,
        unsynced) gets that time now, synced (a full disk: kept in memory, written with
        the end)."""
        assert session.meta is not None and session.directory is not None
        rid = session.meta.recording_id
        session.meta = new_meta(self.cfg.site, rid, session.ref, plan, started)
        try:
            write_meta(session.directory, session.meta)
        except OSError as exc:
            log.warning("capture_update_deferred", recording_id=rid, error=exc.strerror)

    def _open_capture(self, session: CallSession, plan: CallPlan) -> bool:
        """All a recording needs on disk before the 200 goes out: its directory,
        ``capture.json``, the owner lock and one WAV per leg. False, with nothing left
        behind, when the disk refuses any of it."""
        recording_id = new_recording_id()
        directory = self.active_dir / recording_id
        meta = new_meta(self.cfg.site, recording_id, session.ref, plan, utc_now())
        session.plan, session.directory, session.meta = plan, directory, meta
        try:
            directory.mkdir(parents=True)
            write_meta(directory, meta, sync=False)  # synced once the time of the 200 is in
            session.owner = CaptureOwner.claim(directory, meta.started_at)
            session.recording_from = utc_now()
            self._start_recorders(session, plan, directory)
        except (OSError, pj.Error) as exc:
            error = exc.info() if isinstance(exc, pj.Error) else exc.strerror
            log.error("capture_open_failed", call_ref=session.ref, error=error)
            discard_capture(session)
            return False
        return True

    def _plan(self, session: CallSession, raw: str, offered_audio: int) -> CallPlan | None:
        """The edge's checks (who sent it, did it arrive whole, plain mode), then what to
        record; None: the INVITE was refused here."""
        sip = self.cfg.sip
        admission = edge.admit(sip, session.source, raw)
        if admission.refusal is not None:
            self._reply(session, 403, admission.refusal, admission.client_ip)
            return None
        cut = edge.truncated(raw)
        if cut is not None:
            log.warning("invite_truncated", call_ref=session.ref, detail=cut)
            self._reply(session, 513, "message_truncated", admission.client_ip)
            return None
        metadata = self._kept_metadata(session, raw)
        client = sip.client(admission.client_ip or "")
        plan = plan_call(
            raw, self._directory.current, self._rules, self._headers, offered_audio, client,
            metadata,
        )  # fmt: skip
        if not plan.siprec and not sip.plain:
            self._reply(session, 403, "plain_not_enabled", admission.client_ip)
            return None
        return plan

    def _start_recorders(self, session: CallSession, plan: CallPlan, directory: Path) -> None:
        """One WAV per leg from the answer on; streams are connected as they come."""
        for index, leg in plan.legs.items():
            recorder = pj.AudioMediaRecorder()
            recorder.createRecorder(str(directory / leg))
            session.recorders[index] = recorder
            if self._silence is not None:
                self._silence.startTransmit(recorder)

    def _reply(
        self, session: CallSession, status: int, reason: str, source: str | None = None
    ) -> None:
        """Refuse the INVITE: one line naming the sender's address (never a number)."""
        assert session.call is not None
        prm = pj.CallOpParam()
        prm.statusCode = status
        session.call.answer(prm)
        metrics.CALLS_REFUSED.labels(str(status)).inc()
        log.log(
            logging.WARNING if status in (403, 513) else logging.INFO,
            "call_rejected",
            call_ref=session.ref,
            status=status,
            reason=reason,
            source=source or "-",
        )

    def _connect_media(self, session: CallSession) -> None:
        call, plan, directory = session.call, session.plan, session.directory
        if call is None or plan is None or directory is None:
            return
        self._follow_src_pause(session, call)
        if session.resume_at > time.monotonic():
            return  # resuming: the jitter buffers still hold what was said in the pause
        session.resume_at = 0.0
        if session.meta is not None and (session.meta.paused or not session.recorders):
            commands.mute(session)  # a re-INVITE's new stream port too: off, on the sink
            return  # paused (or discarded): the streams stay off the recorders
        commands.unmute(session)
        info = call.getInfo()  # keep it alive: .media points into it (SWIG)
        for media in info.media:
            leg = plan.legs.get(media.index)
            if leg is None or media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            recorder = session.recorders.get(media.index)
            if recorder is None or media.audioConfSlot < 0:  # no stream (yet)
                continue
            # Re-connect on every media change: a re-INVITE may give the stream a new slot.
            call.getAudioMedia(media.index).startTransmit(recorder)

    def _follow_src_pause(self, session: CallSession, call: SipCall) -> None:
        """a=inactive on every recorded stream from the SRC is a pause (who "src")."""
        if session.meta is not None and session.answered_mono:
            commands.follow_src(session, bool(receiving_streams(call, session)))

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A command of the agent's control API for one call of this worker (see
        :mod:`agent.recorder.control.channel`): its reply, with the call's status."""
        rid = request.get("recording_id")
        session = next(
            (s for s in self._sessions if s.meta is not None and s.meta.recording_id == rid),
            None,
        )
        if session is None or session.call is None:
            ended = session is not None or any(
                s.meta is not None and s.meta.recording_id == rid for s in self._closing
            )
            if ended:
                return {"status": 409, "error": "the call has ended"}
            return {"status": 404, "error": "no live call with that recording id here"}
        error = commands.run_command(session, request, self._connect_media)
        return error if error is not None else commands.status_reply(session)

    def _update(self, session: CallSession) -> None:
        """Merge the metadata of re-INVITEs/UPDATEs received since the last turn."""
        updates, session.updates = session.updates, []
        if session.meta is not None and session.directory is not None:
            people = self._directory.current
            fetched = [(at, raw, self._kept_metadata(session, raw)) for at, raw in updates]
            session.meta = merge_updates(
                session.meta, session.directory, fetched, people, self._rules
            )

    def _kept_metadata(self, session: CallSession, raw: str) -> str | None:
        """The metadata the front kept aside for an in-dialog request, if it did."""
        token = edge.metadata_token(raw) if self.cfg.sip.front else None
        if token is None:
            return None
        try:
            return edge.fetch_metadata(self.cfg.sip, token)
        except LookupError as exc:
            log.warning("metadata_fetch_failed", call_ref=session.ref, reason=str(exc))
            return None

    def _watch(self, session: CallSession, now: float) -> None:
        """Hang up a call whose sender vanished (no RTP for rtp_timeout) or ran too long."""
        call, meta = session.call, session.meta
        if call is None or meta is None:
            return
        if session.owner is not None:
            session.owner.beat(iso_ms(utc_now()))
        check_legs(session, now)
        if now - session.answered_mono > self.cfg.sip.max_call_s:
            log.warning("max_call_reached", recording_id=meta.recording_id)
            self._hangup(session, 200)
            return
        receiving = receiving_streams(call, session)
        if not receiving:  # on hold (a=inactive/sendonly from us): silence is expected
            session.rx_packets, session.rx_mono = -1, now
            return
        try:
            stats = {i: call.getStreamStat(i).rtcp.rxStat for i in receiving}
        except pj.Error:
            return
        packets = sum(stat.pkt for stat in stats.values())
        count_rtp(session, {i: (stat.pkt, stat.loss) for i, stat in stats.items()})
        if packets != session.rx_packets:
            session.rx_packets, session.rx_mono = packets, now
        elif now - session.rx_mono >= self.cfg.sip.rtp_timeout_s:
            log.warning(
                "rtp_timeout",
                recording_id=meta.recording_id,
                idle_s=round(now - session.rx_mono, 1),
            )
            session.flags.append(Flag.RTP_TIMEOUT)
            self._hangup(session, 200)

    def _hangup(self, session: CallSession, status: int) -> None:
        if session.call is None:
            return
        prm = pj.CallOpParam()
        prm.statusCode = status
        try:
            session.call.hangup(prm)
        except pj.Error as exc:
            log.error("hangup_failed", call_ref=session.ref, error=exc.info())

    def _finish(self, session: CallSession) -> None:
        """The call ended: release the recorders; the capture moves once pjsua has
        closed the WAV files (:class:`ClosingCaptures`)."""
        if session in self._sessions:
            self._sessions.remove(session)
        session.invite = None
        session.recorders.clear()  # the last references: pjsua destroys the recorders
        if session.meta is None or session.directory is None:
            log.info("call_ended_unanswered", call_ref=session.ref or "-")
            return
        if session.updates:
            self._update(session)
        self._closing.add(session)
