"""The store's Access service, called as the signed-in person (their ID token as the
bearer credential). The web decides nothing: the store authenticates, applies the
rules and audits; this module only carries requests and maps the answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.web.config import WebConfig

PURPOSES = {
    "verification": apb.PURPOSE_VERIFICATION,
    "legal": apb.PURPOSE_LEGAL,
    "training": apb.PURPOSE_TRAINING,
    "security": apb.PURPOSE_SECURITY,
}
# The purpose a role states for searching and opening a recording's page.
BROWSE_PURPOSE = {
    "agent": "verification",
    "supervisor": "verification",
    "admin": "security",
    "privacy_officer": "legal",
}
TIMEOUT_S = 15.0
_M = TypeVar("_M")
# Reads the store answers the same whichever replica asks (issue 18: replicas behind a
# balancer). When the one a call went to dies with the call in flight (the balancer
# answers UNAVAILABLE, or the connection breaks before an answer began), gRPC asks
# again, through the balancer, so another replica answers and the person sees the
# page. A call already answering (a stream's first message received) is never asked
# again; the changes (restrict, erase, hold…) never are: they get the "try again" page.
RETRIED_READS = (
    "WhoAmI", "Search", "GetRecording", "Waveform", "PlayRange", "AuditLog", "FindByNumber",
)  # fmt: skip
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "callrec.v1.Access", "method": m} for m in RETRIED_READS],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
# Keepalive: while calls are in flight, ping every 30 s (the store permits one every
# 15 s, server.MIN_CLIENT_PING_INTERVAL_MS), so a replica whose host vanished without
# a word (no RST) is noticed in ~40 s, not at the kernel's TCP timeout. Reconnects after
# a lost connection start after 0.5 s, at most 5 s apart (the balancer is one address).
# No bandwidth-delay probing: each audio stream's flow-control window stays at 64 KiB,
# so a listener whose browser has buffered enough holds 64 KiB here, not megabytes.
CHANNEL_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


class StoreRefused(Exception):
    """The store said no (or could not answer): ``code`` and its message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Range:
    offset: int
    total: int
    audio_format: str
    first: bytes
    rest: AsyncIterator[apb.RangeChunk]


class StoreClient:
    def __init__(self, config: WebConfig) -> None:
        if config.store_ca_file is not None:
            creds = grpc.ssl_channel_credentials(config.store_ca_file.read_bytes())
            self.channel = grpc.aio.secure_channel(config.store_address, creds, CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(config.store_address, CHANNEL_OPTIONS)
        self.stub = apb_grpc.AccessStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    @staticmethod
    def _md(token: str) -> Sequence[tuple[str, str]]:
        return (("authorization", f"Bearer {token}"),)

    async def whoami(self, token: str) -> apb.PersonView:
        try:
            return await self.stub.WhoAmI(
                apb.WhoAmIRequest(), metadata=self._md(token), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise StoreRefused(exc.code(), exc.details() or "") from None

    async def search(self, token: str, request: apb.SearchRequest) -> apb.SearchResponse:
        try:
            return await self.stub.Search(request, metadata=self._md(token), timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise StoreRefused(exc.code(), exc.details() or "") from None

    async def recording(self, token: str, rid: str, purpose: str) -> apb.RecordingView:
        request = apb.RecordingRequest(purpose=PURPOSES[purpose], recording_id=rid)
        try:
            return await self.stub.GetRecording(
                request, metadata=self._md(token), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise StoreRefused(exc.code(), exc.details() or "") from None

    async def waveform(self, token: str, rid: str, purpose: str) -> apb.WaveformView:
        request = apb.RecordingRequest(purpose=PURPOSES[purpose], recording_id=rid)
        try:
            return await self.stub.Waveform(request, metadata=self._md(token), timeout=180)
        except grpc.aio.AioRpcError as exc:
            raise StoreRefused(exc.code(), exc.details() or "") from None

    async def unary(self, token: str, method: str, request: Any) -> Any:
        """A unary Access call by name (the privacy officer's changes, FindByNumber…)."""
        try:
            return await getattr(self.stub, method)(
                request, metadata=self._md(token), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise StoreRefused(exc.code(), exc.details() or "") from None

    async def package(
        self, token: str, request: apb.PackageRequest
    ) -> tuple[apb.PackageChunk, AsyncIterator[apb.PackageChunk]]:
        """The package's first message (the metadata: the store has said yes) and the
        rest to stream."""
        call = self.stub.ExportPackage(request, metadata=self._md(token), timeout=600)
        return await _first(call, grpc.StatusCode.NOT_FOUND, "empty package")

    async def play_range(
        self, token: str, rid: str, purpose: str, offset: int, length: int
    ) -> Range:
        """The first chunk of the range (status known before the response starts) and
        the rest to stream."""
        request = apb.RangeRequest(
            purpose=PURPOSES[purpose], recording_id=rid, offset=offset, length=length
        )
        call = self.stub.PlayRange(request, metadata=self._md(token), timeout=60)
        first, stream = await _first(call, grpc.StatusCode.OUT_OF_RANGE, "empty range")
        return Range(first.offset, first.total_size, first.audio_format, first.data, stream)


async def _first(
    call: AsyncIterable[_M], empty: grpc.StatusCode, why: str
) -> tuple[_M, AsyncIterator[_M]]:
    """A stream's first message (the store's answer is known before anything is sent
    on) and the rest; a refusal, or no message at all, is StoreRefused."""
    stream = aiter(call)
    try:
        first = await anext(stream)
    except grpc.aio.AioRpcError as exc:
        raise StoreRefused(exc.code(), exc.details() or "") from None
    except StopAsyncIteration:
        raise StoreRefused(empty, why) from None
    return first, stream
