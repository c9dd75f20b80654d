"""Live upload in G.711 A-law (issue 19): half the bytes of 16-bit PCM on the wire.

Against a real store (in-process, port 0): a call streamed in A-law is held as sent
(offsets and sizes in A-law bytes, one per sample, pieces of any length) and archived
as the same audio as the same call streamed as PCM; a PCM stream from an agent older
than the encoding field is still taken, and a new agent that takes such a call over
(restarted mid-call onto the new version) goes on in PCM; an append in another
encoding than the call's is refused before anything is written. The real SIPREC call
through SIPp is in tests/test_live.py (its stored leg is the worker's samples in A-law).
"""

from __future__ import annotations

import hashlib
import subprocess
import warnings
from pathlib import Path

import grpc
import pytest

from agent import g711
from agent.capture import read_meta
from agent.manifest import manifest_from_capture
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.uplink.live import LiveUplink, wire_encoding
from agent.store.catalog import RecordingRow
from tests.support.audio import probe
from tests.support.faults import write_capture
from tests.support.stack import InProcessStore, agent_config, make_keys
from tests.test_live_store import (
    SECOND,
    archive_audio,
    live_manifest,
    pcm_of_leg,
    store,
    stub,
    tone,
    wait_stored,
)

with warnings.catch_warnings():  # deprecated in 3.11 (the project pins Python < 3.13)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["store", "stub"]  # the fixtures, shared with test_live_store

ALAW = pb.LIVE_ENCODING_ALAW


def as_from_alaw(pcm: bytes) -> bytes:
    """``pcm`` as pjsua writes it from an A-law SRC: decoded A-law."""
    return audioop.alaw2lin(audioop.lin2alaw(pcm, 2), 2)


def send(
    stub: pb_grpc.LiveStub,
    manifest: pb.Manifest,
    legs: dict[str, bytes],
    piece: int,
    encoding: pb.LiveEncoding.ValueType = pb.LIVE_ENCODING_UNSPECIFIED,
) -> pb.LiveState:
    """Every leg in appends of ``piece`` bytes (the manifest in each: the store takes it
    once), then the Finish with each leg's size and sha256 over the bytes as sent."""
    rid = manifest.recording_id
    state = pb.LiveState()
    for at in range(0, max(len(d) for d in legs.values()), piece):
        request = pb.LiveAppendRequest(recording_id=rid, manifest=manifest, encoding=encoding)
        for leg, data in legs.items():
            if data[at : at + piece]:
                request.legs.append(pb.LegBytes(leg=leg, offset=at, data=data[at : at + piece]))
        state = stub.Append(request, timeout=10)
    final = pb.Manifest()
    final.CopyFrom(manifest)
    final.ended_at.CopyFrom(manifest.started_at)
    final.ended_at.seconds += 6
    request = pb.LiveFinishRequest(manifest=final, encoding=encoding)
    for leg, data in legs.items():
        sha = hashlib.sha256(data).hexdigest()
        request.legs.append(pb.LegFinal(leg=leg, size=len(data), sha256=sha))
    assert stub.Finish(request, timeout=30).finished
    return state


def decoded(store: InProcessStore, row: RecordingRow, target: Path) -> bytes:
    """The archive decoded to stereo 16-bit PCM at 8 kHz."""
    archive_audio(store, row, target)
    command = ["ffmpeg", "-v", "error", "-i", str(target), "-f", "s16le", "-ar", "8000", "-"]
    return subprocess.run(command, capture_output=True, check=True, timeout=60).stdout


def test_an_alaw_call_is_held_as_sent_and_archived_as_the_same_audio_as_pcm(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    legs = {"customer": as_from_alaw(tone(6, 440)), "employee": as_from_alaw(tone(6, 660))}
    old = live_manifest(tmp_path)  # as an agent before the encoding field streams it
    state = send(stub, old, legs, piece=SECOND)
    assert state.encoding == pb.LIVE_ENCODING_PCM_S16LE and ALAW in state.accepts

    new = live_manifest(tmp_path)
    wire = {leg: audioop.lin2alaw(pcm, 2) for leg, pcm in legs.items()}
    request = pb.LiveAppendRequest(recording_id=new.recording_id, manifest=new, encoding=ALAW)
    request.legs.append(pb.LegBytes(leg="customer", offset=0, data=wire["customer"][:12_345]))
    state = stub.Append(request, timeout=10)  # any length: one byte per sample
    assert state.encoding == ALAW and {s.leg: s.size for s in state.legs}["customer"] == 12_345
    held = stub.Query(pb.LiveQueryRequest(recording_id=new.recording_id), timeout=10)
    assert held.known and held.encoding == ALAW
    assert pcm_of_leg(store, new.recording_id, "customer") == wire["customer"][:12_345]
    send(stub, new, wire, piece=7_777, encoding=ALAW)  # the rest (what it holds is skipped)
    assert all(size == 6 * 8000 for size in (len(w) for w in wire.values()))

    old_row = wait_stored(store, old.recording_id)
    new_row = wait_stored(store, new.recording_id)
    assert new_row.flags == old_row.flags == "" and new_row.channels == 2
    assert abs(probe(archive_audio(store, new_row, tmp_path / "new.ogg"))[2] - 6.0) < 0.1
    # The same samples in, the same archive out: decoded, the two are identical.
    audio = decoded(store, new_row, tmp_path / "new.ogg")
    assert len(audio) > 5 * 4 * 8000 and audio == decoded(store, old_row, tmp_path / "old.ogg")


def test_a_new_agent_goes_on_with_an_old_agents_pcm_call_in_pcm(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    """A rolling upgrade: the agent restarted onto the new version mid-call."""
    keys = make_keys(tmp_path / "keys")
    config, _ = agent_config(tmp_path, keys, store.address, uplink={"live": True})
    rid = write_capture(config.data_dir, keys, seconds=3)
    capture = config.data_dir / "captures" / "ready" / rid
    manifest = manifest_from_capture(read_meta(capture), "opus", 2, 0, "", "fi")
    for name in ("ended_at", "size", "sha256"):
        manifest.ClearField(name)
    request = pb.LiveAppendRequest(recording_id=rid, manifest=manifest)  # no encoding
    for leg in ("customer", "employee"):
        pcm = (capture / f"{leg}.wav").read_bytes()[44 : 44 + 2 * SECOND]
        request.legs.append(pb.LegBytes(leg=leg, offset=0, data=pcm))
    stub.Append(request, timeout=10)

    with grpc.insecure_channel(store.address) as channel:
        live = LiveUplink(config, channel)
        live.finish(rid)  # Query: known, in PCM; the last second of each leg rides in it
        assert not capture.exists()
        assert live.bytes_sent == 2 * SECOND  # PCM: two bytes per sample
    row = wait_stored(store, rid)
    assert (
        row.flags == "" and abs(probe(archive_audio(store, row, tmp_path / "a.ogg"))[2] - 3) < 0.1
    )


@pytest.mark.parametrize(
    "method", ["Append", "Finish"], ids=["append", "finish's tail"]
)  # fmt: skip
def test_bytes_in_another_encoding_than_the_calls_are_refused(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path, method: str
) -> None:
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    first = pb.LiveAppendRequest(recording_id=rid, manifest=manifest, encoding=ALAW)
    first.legs.append(pb.LegBytes(leg="customer", offset=0, data=b"\xd5" * 8000))
    stub.Append(first, timeout=10)
    pcm = pb.LegBytes(leg="customer", offset=8000, data=b"\0\0" * 8000)
    with pytest.raises(grpc.RpcError) as refused:
        if method == "Append":  # an older agent's (no encoding: PCM)
            stub.Append(pb.LiveAppendRequest(recording_id=rid, legs=[pcm]), timeout=10)
        else:
            final = live_manifest(tmp_path, rid=rid, ended=True)
            legs = [pb.LegFinal(leg=leg, size=8000, sha256="0" * 64) for leg in ("customer",)]
            legs.append(pb.LegFinal(leg="employee", size=0, sha256="0" * 64))
            stub.Finish(pb.LiveFinishRequest(manifest=final, legs=legs, tail=[pcm]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "streams alaw" in (refused.value.details() or "")
    state = stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=10)
    assert {s.leg: s.size for s in state.legs}["customer"] == 8000  # nothing written


def test_an_agent_sends_alaw_only_to_a_store_that_takes_it() -> None:
    older_store = pb.LiveState(recording_id="0" * 32, known=False)  # no accepts field
    assert wire_encoding(older_store) == g711.PCM16
    newer = pb.LiveState(known=False, accepts=[pb.LIVE_ENCODING_PCM_S16LE, ALAW])
    assert wire_encoding(newer) == g711.ALAW
    assert wire_encoding(newer, configured="pcm") == g711.PCM16  # [uplink] live_encoding
    # a call the store knows goes on in its own encoding, whatever the store takes
    started_in_pcm = pb.LiveState(known=True, accepts=[ALAW])
    assert wire_encoding(started_in_pcm) == g711.PCM16
