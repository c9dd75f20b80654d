"""pjsua2 endpoint plumbing for the recorder: the library handle (ctypes, for what
pjsua2 does not expose), the ``siprec`` option tag, pjsip's log routed into ours with
redaction, and the endpoint/account configurations of one worker."""

from __future__ import annotations

import contextlib
import ctypes
import logging

import pjsua2 as pj

from agent import logs

pjlog = logs.get_logger("agent.recorder.pjsip")

CLOCK_RATE = 8000  # G.711's own rate (16 kHz triples the CPU)
PJ_LOG_LEVEL = 3  # level 4+ prints whole SIP messages; msgLogging is off as well
_PJ_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}
_BENIGN = "Remove port failed"


def _pj_library() -> ctypes.CDLL:
    import pjsua2._pjsua2 as ext

    return ctypes.CDLL(ext.__file__)


class _PjStr(ctypes.Structure):
    _fields_ = (("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t))


def quiet_pjlib() -> None:
    """Silence what pjlib prints at ``libCreate``, before our LogWriter exists."""
    _pj_library().pj_log_set_level(0)


def close_idle_clock() -> None:
    """Let pjsua close the null sound device a second from now unless a call comes.

    ``setNullDev`` opens it at once, and pjsua arms its idle timer only when a port
    leaves the bridge, so a worker's 20 ms bridge clock used to run from start-up
    until its first call ended. The first call's recorders reopen it, as every call
    does after the previous one closed it."""
    _pj_library().pjsua_check_snd_dev_idle()


def add_supported_tag(tag: str) -> None:
    """Add an option tag to the endpoint's Supported capability (after libInit)."""
    lib = _pj_library()
    lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
    lib.pjsip_endpt_add_capability.argtypes = (
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.POINTER(_PjStr),
    )
    endpt = lib.pjsua_get_pjsip_endpt()
    if not endpt:
        raise RuntimeError("pjsip endpoint not created yet")
    value = tag.encode()
    status = lib.pjsip_endpt_add_capability(
        endpt, None, pj.PJSIP_H_SUPPORTED, None, 1, ctypes.byref(_PjStr(value, len(value)))
    )
    if status != 0:
        raise RuntimeError(f"pjsip_endpt_add_capability({tag!r}) failed with status {status}")


class LogWriter(pj.LogWriter):  # type: ignore[misc]
    """pjsip's log into ours, with anything number-like redacted."""

    def write(self, entry: pj.LogEntry) -> None:
        with contextlib.suppress(Exception):  # never raise into pjsip
            level = _PJ_LEVELS.get(entry.level, logging.DEBUG)
            message = entry.msg.strip()
            # pjsip's info lines are chatty, and destroying a recorder makes pjsua2
            # remove its conference port twice: operators see those at debug level.
            if level == logging.INFO or _BENIGN in message:
                level = logging.DEBUG
            pjlog.log(level, "pjsip", msg=message)


def endpoint_config(
    writer: LogWriter, media_thread: bool = True, frame_ms: int = 20
) -> pj.EpConfig:
    """One thread owns pjsua2 (no worker threads, callbacks on ``libHandleEvents``).

    Without ``media_thread`` the media endpoint shares the SIP endpoint's ioqueue and
    has no thread of its own: RTP is read by ``libHandleEvents`` on that one thread,
    which sleeps until a packet or a SIP message comes. pjmedia's own media thread
    polls its ioqueue every 10 ms (a constant in ``endpoint.c``), about 100 wake-ups a
    second in every worker whether or not a call is up ([sip] media_thread).

    ``frame_ms`` is the conference bridge's frame: its clock reads every stream and
    writes every leg's WAV once per frame ([sip] frame_ms); the streams keep their
    own 20 ms packets and jitter buffers (the bridge reads 2 or 3 of their frames)."""
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.userAgent = "callrec"
    cfg.logConfig.level = PJ_LOG_LEVEL
    cfg.logConfig.consoleLevel = PJ_LOG_LEVEL
    cfg.logConfig.msgLogging = False
    cfg.logConfig.decor = pj.PJ_LOG_HAS_SENDER
    cfg.logConfig.writer = writer
    med = cfg.medConfig
    med.clockRate = CLOCK_RATE
    med.sndClockRate = CLOCK_RATE
    med.audioFramePtime = frame_ms
    med.channelCount = 1
    med.ecTailLen = 0
    med.hasIoqueue = media_thread  # false: share the SIP endpoint's ioqueue …
    med.threadCnt = 1 if media_thread else 0  # … and no thread of its own polling it
    return cfg


def account_config(address: str, port: int, rtp: tuple[str, int, int]) -> pj.AccountConfig:
    """The worker's only account; ``rtp`` is (address, first port, count): media binds
    the routable address (it bypasses the front)."""
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:callrec@{address}:{port}"
    tp = acfg.mediaConfig.transportConfig
    tp.boundAddress, tp.port, tp.portRange = rtp
    return acfg
