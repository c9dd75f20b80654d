"""The live stream's audio encodings (issue 19): what a ``Live.Append`` carries.

The workers' leg files are mono 16-bit PCM at 8 kHz, decoded by pjsua from the SIP
payload's own G.711. The agent sends them as G.711 A-law (one byte per sample, half the
bytes of PCM) when the store says it takes it (``LiveState.accepts``), 16-bit PCM
otherwise (and for a call an older agent started in PCM). The store keeps the bytes as
they arrived and decodes them to PCM only where it needs samples (the archive's
encoder, the silent-channel check).

Offsets and sizes of a live leg count bytes *in the call's encoding*: A-law, one per
sample; PCM, two. A leg's sha256 (``LegFinal.sha256``) is over those same bytes, the
stream as appended, on both ends.

A-law decode then encode is the identity, so re-encoding what pjsua decoded from an
A-law payload gives back the payload's bytes; what pjsua made itself (digital silence
before the first packet or on hold, 0, which A-law has no code for) comes back as ±8
(-72 dBFS), as do pjsua's concealment of late packets and a µ-law source's samples
(re-quantised, 13 bits for 14): all far under the archive's Opus noise (measured on a
real SIPREC call in tests/test_live.py; ``[uplink] live_encoding = "pcm"`` sends the
samples bit for bit).
"""

from __future__ import annotations

import warnings

from agent.pb.callrec.v1 import recordings_pb2 as pb

with warnings.catch_warnings():  # deprecated in 3.11, gone in 3.13 (audioop-lts there)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

PCM16 = "pcm_s16le"
ALAW = "alaw"
ENCODINGS = (PCM16, ALAW)
LABELS = {PCM16: "16-bit", ALAW: "A-law"}
SAMPLE_RATE = 8000
_BYTES_PER_SAMPLE = {PCM16: 2, ALAW: 1}
_TO_PB = {PCM16: pb.LIVE_ENCODING_PCM_S16LE, ALAW: pb.LIVE_ENCODING_ALAW}
# What agents before the field sent (unset: 0) was 16-bit PCM.
_FROM_PB: dict[int, str] = {
    pb.LIVE_ENCODING_UNSPECIFIED: PCM16,
    **{v: k for k, v in _TO_PB.items()},
}


class UnknownEncoding(ValueError):
    """An encoding value this side does not know (a newer peer)."""


def from_pb(value: int) -> str:
    try:
        return _FROM_PB[value]
    except KeyError:
        raise UnknownEncoding(f"live encoding {value}: expected one of {ENCODINGS}") from None


def to_pb(encoding: str) -> pb.LiveEncoding.ValueType:
    return _TO_PB[encoding]


def sample_bytes(encoding: str) -> int:
    """Bytes of one sample in ``encoding``."""
    return _BYTES_PER_SAMPLE[encoding]


def bytes_per_second(encoding: str) -> int:
    return SAMPLE_RATE * _BYTES_PER_SAMPLE[encoding]


def encode(encoding: str, pcm: bytes) -> bytes:
    """16-bit PCM (whole samples) in ``encoding``."""
    return audioop.lin2alaw(pcm, 2) if encoding == ALAW else pcm


def decode(encoding: str, data: bytes) -> bytes:
    """``data`` in ``encoding`` as 16-bit PCM."""
    return audioop.alaw2lin(data, 2) if encoding == ALAW else data


def peak(pcm: bytes) -> int:
    """The largest |sample| of 16-bit PCM (whole samples)."""
    return int(audioop.max(pcm, 2))
