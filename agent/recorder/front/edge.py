"""The SIP edge as a worker sees it: who may create a recording, whether an INVITE
arrived whole, and the metadata the front kept aside. Pure functions, and one HTTP
request to the front over loopback; nothing here touches pjsua2.

- **Who**: without the front a worker takes INVITEs only from a listed recording
  client (``[sip] allowed_clients`` and every ``[[sip.clients]] address``). Behind the
  front it takes them only from the front's own address; the front checked the
  client and names it in :data:`SOURCE_HEADER` (removing any such header the client
  sent), which a worker trusts only on requests from the front.
- **Whole**: pjsip in the wheel reads at most ~4,000 bytes of one message and hands
  on what it read. A request whose body is shorter than its Content-Length, or whose
  multipart body lacks its close delimiter, was cut: it is refused (513), never
  answered 200 with a recording of unknown parties.
- **Metadata kept aside**: the front takes the ``application/rs-metadata+xml`` part
  out of INVITEs, re-INVITEs and UPDATEs (so that they fit), keeps it in memory
  under a random token for a few seconds and names the token in
  :data:`METADATA_HEADER`; the worker fetches it once from the front's loopback HTTP
  port (:func:`fetch_metadata`). The metadata holds full numbers: it is never
  written to disk on either side.
- **When the call ended**: the front stamps each BYE it relays with the time it
  received it (:data:`RECEIVED_HEADER`, epoch seconds with microseconds), after
  removing any header of that name from whatever came from outside. A worker starved
  of CPU reads the BYE late; it ends the recording at the front's stamp when the
  stamp is sane (:func:`call_end`), not at its own late reading.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from agent.config import SipConfig
from agent.recorder.siprec import METADATA_TYPES, parse_headers

SOURCE_HEADER = "X-Callrec-Source"
METADATA_HEADER = "X-Callrec-Metadata"
METADATA_PATH = "/callrec/metadata/"
RECEIVED_HEADER = "X-Callrec-Received"  # the front's receive time of a BYE
MAX_STAMP_AGE_S = 10.0  # an older stamp is not this BYE's (or the clock jumped)
_STAMP = re.compile(r"\d{1,10}(\.\d{1,9})?")  # up to the year 2286: a datetime
FETCH_TIMEOUT_S = 2.0
MAX_FETCH_BYTES = 256 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9-]{8,80}")


@dataclass(frozen=True)
class Admission:
    client_ip: str | None  # the recording client's address
    refusal: str | None = None  # why the INVITE is refused (403); None: admitted


def source_ip(source: str) -> str | None:
    """``"127.0.0.1:5060"`` / ``"[::1]:5060"`` (``rdata.srcAddress``) → the address."""
    host = source.rpartition(":")[0] if source.count(":") == 1 else source
    if source.startswith("["):
        host = source[1:].partition("]")[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def source_port(source: str) -> int | None:
    port = source.rpartition(":")[2]
    return int(port) if port.isdigit() and ":" in source else None


def front_address(sip: SipConfig) -> str:
    """Where the front's requests come from: its listen address (loopback when it
    listens on every address; it reaches the workers over loopback)."""
    address = ipaddress.ip_address(sip.listen)
    return sip.worker_listen if address.is_unspecified else str(address)


def _head(raw: str) -> dict[str, str]:
    head = raw.lstrip("\r\n").replace("\r\n", "\n").partition("\n\n")[0]
    return parse_headers(head.partition("\n")[2])


def admit(sip: SipConfig, source: str, raw: str) -> Admission:
    """May this INVITE (received from ``source``) create a recording?"""
    ip = source_ip(source)
    if ip is None:
        return Admission(None, "unreadable_source")
    if not sip.front:
        return Admission(ip) if sip.allows(ip) else Admission(ip, "client_not_allowed")
    if ip != front_address(sip) or source_port(source) != sip.port:
        return Admission(ip, "not_from_front")
    client = source_ip(_head(raw).get(SOURCE_HEADER.lower(), ""))
    if client is None or not sip.allows(client):  # the front checked it already
        return Admission(client, "client_not_allowed")
    return Admission(client)


def metadata_token(raw: str) -> str | None:
    """The front's token for the metadata it kept aside, if this request names one."""
    value = _head(raw).get(METADATA_HEADER.lower())
    return value if value is not None and _TOKEN.fullmatch(value) else None


def truncated(raw: str | bytes) -> str | None:
    """Why a received request is not whole (None: it is)."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    data = data.lstrip(b"\r\n")
    for sep in (b"\r\n\r\n", b"\n\n"):
        head, found, body = data.partition(sep)
        if found:
            break
    else:
        return "no end of headers"
    headers = parse_headers(head.decode("utf-8", "replace").partition("\n")[2])
    length = headers.get("content-length", "").strip()
    if length.isdigit() and int(length) > len(body):
        return f"body of {len(body)} bytes, Content-Length {length}"
    content_type = headers.get("content-type", "").lower()
    boundary = re.search(r'boundary="?([^";\s]+)"?', content_type, re.IGNORECASE)
    if content_type.startswith("multipart/") and boundary is not None:
        close = b"--" + boundary.group(1).encode() + b"--"
        if close.lower() not in body.lower():
            return "multipart body without its close delimiter"
    return None


def has_metadata(raw: str) -> bool:
    """The request carries recording metadata, or the front's token for it."""
    lowered = raw.lower()
    return any(t in lowered for t in METADATA_TYPES) or METADATA_HEADER.lower() in lowered


def fetch_metadata(sip: SipConfig, token: str) -> str:
    """The metadata the front kept under ``token`` (once: the front forgets it)."""
    url = f"http://{front_address(sip)}:{sip.front_http_port}{METADATA_PATH}{token}"
    request = urllib.request.Request(url, headers={"Connection": "close", "Content-Length": "0"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as reply:  # noqa: S310
            data: bytes = reply.read(MAX_FETCH_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise LookupError(f"the front has no metadata for this call ({exc.code})") from None
    except OSError as exc:
        raise LookupError(f"the front did not answer: {type(exc).__name__}") from None
    if len(data) > MAX_FETCH_BYTES:
        raise LookupError("the front's metadata is larger than we read")
    return part_content(data.decode("utf-8", "replace"))


def part_content(text: str) -> str:
    """Kamailio's ``get_body_part`` keeps the part's other headers (such as
    Content-Disposition) before the document: drop them."""
    if text.lstrip("\ufeff \t\r\n").startswith("<"):
        return text
    for sep in ("\r\n\r\n", "\n\n"):
        head, found, content = text.partition(sep)
        if found and re.match(r"[A-Za-z-]+:", head):
            return content
    return text


def received_stamp(sip: SipConfig, source: str, raw: str) -> float | None:
    """The front's receive time (epoch seconds) of an in-dialog request, when the front
    relayed it (``source``) and stamped it; None otherwise (no front: never). Only a
    request: the front strips the header from requests, responses pass as sent."""
    if not sip.front or source_ip(source) != front_address(sip) or source_port(source) != sip.port:
        return None
    if raw.lstrip("\r\n").startswith("SIP/"):
        return None
    value = _head(raw).get(RECEIVED_HEADER.lower(), "").strip()
    return float(value) if _STAMP.fullmatch(value) else None


def call_end(
    own: dt.datetime, stamp: float | None, started: dt.datetime | None
) -> tuple[dt.datetime, str | None]:
    """The call's end: the front's stamp of the BYE when it is sane (after the answer,
    not after ``own``, the worker's reading, and not more than MAX_STAMP_AGE_S before
    it), else ``own``; with why the stamp was not taken (None: taken, or none)."""
    if stamp is None:
        return own, None
    at = dt.datetime.fromtimestamp(stamp, dt.UTC)
    if at > own:
        return own, "in_the_future"
    if (own - at).total_seconds() > MAX_STAMP_AGE_S:
        return own, "too_old"
    if started is not None and at < started:
        return own, "before_answer"
    return at, None
