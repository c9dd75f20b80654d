"""What an upload must pass before the store writes anything of it: the caller's site
(from its client certificate, not revoked), a valid manifest as the stream's first
message, the manifest's site matching the certificate's, and a region the store may
keep personal data for (``agent.store.ingest.service``; the live upload,
``agent.store.live.service``, passes the same checks). Each refusal aborts the call
with a gRPC status whose message says what was wrong."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agent import logs
from agent.certs import peer_certificate, serial_of, site_of
from agent.manifest import ClockAhead, ManifestError, validate_manifest
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.residency import region_allowed
from agent.store.ingest.denylist import DenyList

log = logs.get_logger(__name__)


async def peer_site(
    context: grpc.aio.ServicerContext[Any, Any], authenticate: bool, denylist: DenyList
) -> str | None:
    """The site of the caller's certificate (None when the store runs without TLS)."""
    if not authenticate:
        return None
    cert = peer_certificate(context.auth_context())
    site = None if cert is None else site_of(cert)
    if cert is not None:
        refusal = await asyncio.to_thread(denylist.refusal, serial_of(cert), site)
        if refusal is not None:
            log.warning("upload_refused", reason="revoked", detail=refusal)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{refusal} (`callrec certs revoked`); nothing was stored",
            )
    if site is None:
        log.warning("upload_refused", reason="no_site_in_certificate")
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the client certificate names no site (expected a URI name "
            "callrec:site:<site>; issue one with `callrec certs agent`)",
        )
    return site


async def manifest_of(
    requests: AsyncIterator[pb.UploadRequest],
    context: grpc.aio.ServicerContext[Any, Any],
    idle_timeout_s: float,
) -> pb.Manifest:
    """The stream's first message, a valid manifest, or abort (before anything is
    written; a time ahead of our clock is FAILED_PRECONDITION: the agent retries)."""
    try:
        async with asyncio.timeout(idle_timeout_s):
            first = await anext(requests)
    except StopAsyncIteration:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream")
    except TimeoutError:
        message = f"no manifest within {idle_timeout_s:.0f} s; stream closed"
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    if first.WhichOneof("kind") != "manifest":
        message = "the first message must carry the manifest"
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    try:
        validate_manifest(first.manifest)
    except ManifestError as exc:
        status = grpc.StatusCode
        code = (
            status.FAILED_PRECONDITION if isinstance(exc, ClockAhead) else status.INVALID_ARGUMENT
        )
        rid = first.manifest.recording_id[:32]
        log.warning("upload_refused", recording_id=rid, code=code.name, reason=str(exc))
        await context.abort(code, f"manifest: {exc}")
    return first.manifest


def drop_agent_digest(manifest: pb.Manifest) -> None:
    """An agent older than the key-custody change still sends a lookup digest made
    with a key every agent held: it is dropped before anything is written."""
    if manifest.customer.digest or manifest.customer.digest_key_id:
        manifest.customer.ClearField("digest")
        manifest.customer.ClearField("digest_key_id")
        log.warning(
            "agent_digest_dropped",
            recording_id=manifest.recording_id,
            site=manifest.site,
            action="upgrade the agent and delete lookup.key from its host",
        )


async def check_site(
    manifest: pb.Manifest, site: str | None, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    """A manifest for another site than the certificate's: PERMISSION_DENIED."""
    if site is None or manifest.site == site:
        return
    log.warning(
        "upload_refused",
        recording_id=manifest.recording_id,
        reason="site_mismatch",
        site=manifest.site,
        certificate_site=site,
    )
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        f"manifest.site = {manifest.site!r} but the client certificate is for site "
        f"{site!r}; nothing was stored",
    )


async def check_region(
    manifest: pb.Manifest,
    allowed_regions: tuple[str, ...],
    context: grpc.aio.ServicerContext[Any, Any],
) -> None:
    """Residency: refuse, before anything is written, an agent outside the list."""
    if region_allowed(manifest.region, allowed_regions):
        return
    log.warning(
        "upload_refused",
        recording_id=manifest.recording_id,
        reason="region",
        region=manifest.region,
    )
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"region: the agent declares {manifest.region!r}, outside the regions this "
        "store may keep personal data in (EU/EEA); nothing was stored",
    )
