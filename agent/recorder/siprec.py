"""Reading a SIPREC INVITE (RFC 7866) and its recording metadata (RFC 7865).

Pure functions over the raw request text (``OnIncomingCallParam.rdata.wholeMsg``);
nothing here touches pjsua2, the network or the disk.

- :func:`parse_invite` splits the request into the headers we use, the SDP and the
  ``application/rs-metadata+xml`` part of a ``multipart/mixed`` body;
- :func:`parse_sdp` lists the m-lines in order with their ``a=label`` and direction;
- :func:`parse_metadata` reads participants, streams and who sends which stream.

The raw text holds the parties' numbers: the objects below keep them out of ``repr``
so that a stray log line cannot print them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

NAMESPACES = ("urn:ietf:params:xml:ns:recording:1", "urn:ietf:params:xml:ns:recording")
METADATA_TYPES = ("application/rs-metadata+xml", "application/rs-metadata")
SDP_TYPE = "application/sdp"
MAX_METADATA_BYTES = 256 * 1024

# RFC 3261 §7.3.3 compact header forms.
_COMPACT = {
    "i": "call-id",
    "f": "from",
    "t": "to",
    "c": "content-type",
    "l": "content-length",
    "k": "supported",
    "m": "contact",
    "v": "via",
}
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class SipParseError(ValueError):
    """The request is not a SIP message we can read (no headers, broken multipart)."""


class MetadataError(ValueError):
    """The recording metadata is missing or unreadable; the call is still recorded."""


class MetadataMissing(MetadataError):
    """The INVITE carries no recording metadata at all."""


# ---------------------------------------------------------------- SIP message


@dataclass(frozen=True)
class SipInvite:
    """The parts of an INVITE the recorder uses. Header names are lower-case."""

    method: str
    call_id: str
    from_: str = field(repr=False)
    to: str = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)  # first value of each header
    sdp: str | None = field(repr=False)
    metadata: str | None = field(repr=False)
    siprec: bool  # Require/Supported names siprec, or a metadata part is present

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _split_head_body(raw: str) -> tuple[str, str]:
    for sep in ("\r\n\r\n", "\n\n"):
        head, found, body = raw.partition(sep)
        if found:
            return head, body
    return raw, ""


def _header_lines(head: str) -> Iterator[str]:
    """Unfold continuation lines (RFC 3261 §7.3.1)."""
    current: str | None = None
    for line in head.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and current is not None:
            current += " " + line.strip()
            continue
        if current is not None:
            yield current
        current = line
    if current is not None:
        yield current


def parse_headers(head: str) -> dict[str, str]:
    """``name: value`` lines → first value per lower-case (expanded) name.

    Repeated headers are joined with ``", "`` (RFC 3261 §7.3.1 makes that equivalent
    for the list-valued headers we read, such as Require and Supported)."""
    headers: dict[str, str] = {}
    for line in _header_lines(head):
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not name or " " in name:
            continue
        name = _COMPACT.get(name, name)
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``multipart/mixed;boundary="x"`` → (``multipart/mixed``, {``boundary``: ``x``})."""
    kind, *params = content_type.split(";")
    parsed: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if sep:
            parsed[key.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), parsed


def split_multipart(body: str, boundary: str) -> list[tuple[dict[str, str], str]]:
    """The parts of a ``multipart/*`` body (RFC 2046 §5.1) as (headers, content)."""
    delimiter = "--" + boundary
    if delimiter not in body:
        raise SipParseError(f"multipart body without its boundary {boundary!r}")
    chunks = body.split(delimiter)[1:]  # [0] is the preamble
    parts: list[tuple[dict[str, str], str]] = []
    for chunk in chunks:
        if chunk.startswith("--"):  # close-delimiter: the epilogue follows
            break
        chunk = chunk.partition("\n")[2]  # the rest of the delimiter line (padding, CRLF)
        # The CRLF before the next delimiter belongs to the delimiter.
        chunk = chunk.removesuffix("\r\n") if chunk.endswith("\r\n") else chunk.removesuffix("\n")
        if chunk.startswith(("\r\n", "\n")):  # a part without headers
            parts.append(({}, chunk.lstrip("\r\n")))
            continue
        head, content = _split_head_body(chunk)
        parts.append((parse_headers(head), content))
    if not parts:
        raise SipParseError("multipart body has no parts")
    return parts


def _body_parts(content_type: str, body: str) -> tuple[str | None, str | None]:
    """(SDP, metadata) from a body of the given type."""
    kind, params = _media_type(content_type)
    if kind == SDP_TYPE:
        return body, None
    if kind in METADATA_TYPES:
        return None, body
    if not kind.startswith("multipart/"):
        return None, None
    boundary = params.get("boundary")
    if not boundary:
        raise SipParseError(f"{kind} body without a boundary parameter")
    sdp: str | None = None
    metadata: str | None = None
    for headers, content in split_multipart(body, boundary):
        part_kind, _ = _media_type(headers.get("content-type", "text/plain"))
        if part_kind == SDP_TYPE and sdp is None:
            sdp = content
        elif part_kind in METADATA_TYPES and metadata is None:
            metadata = content
    return sdp, metadata


def _has_option_tag(value: str | None, tag: str) -> bool:
    return value is not None and tag in (t.strip().lower() for t in value.split(","))


def parse_invite(raw: str | bytes) -> SipInvite:
    """Read an INVITE (or any request) as pjsip received it."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    head, body = _split_head_body(text.lstrip("\r\n"))
    request_line, _, header_block = head.replace("\r\n", "\n").partition("\n")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].upper().startswith("SIP/"):
        raise SipParseError("not a SIP request line")
    headers = parse_headers(header_block)
    call_id = headers.get("call-id")
    if not call_id:
        raise SipParseError("request without Call-ID")
    sdp, metadata = _body_parts(headers.get("content-type", ""), body)
    siprec = (
        metadata is not None
        or _has_option_tag(headers.get("require"), "siprec")
        or _has_option_tag(headers.get("supported"), "siprec")
    )
    return SipInvite(
        method=parts[0].upper(),
        call_id=call_id,
        from_=headers.get("from", ""),
        to=headers.get("to", ""),
        headers=headers,
        sdp=sdp,
        metadata=metadata,
        siprec=siprec,
    )


# ---------------------------------------------------------------- SDP


@dataclass(frozen=True)
class SdpMedia:
    index: int  # position among all m-lines (pjsua's media index)
    kind: str  # "audio", "video", ...
    port: int
    label: str | None
    direction: str  # sendrecv / sendonly / recvonly / inactive


def parse_sdp(sdp: str) -> tuple[SdpMedia, ...]:
    """The m-lines in order. A media-level direction overrides the session's."""
    blocks: list[list[str]] = [[]]  # [0]: session level, then one block per m-line
    for line in sdp.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if line.startswith("m="):
            blocks.append([])
        blocks[-1].append(line)
    session_direction = _direction(blocks[0]) or "sendrecv"
    return tuple(
        _sdp_media(index, block, session_direction) for index, block in enumerate(blocks[1:])
    )


def _direction(lines: list[str]) -> str | None:
    found = [line[2:] for line in lines if line[2:] in _DIRECTIONS and line.startswith("a=")]
    return found[-1] if found else None


def _sdp_media(index: int, lines: list[str], session_direction: str) -> SdpMedia:
    fields = lines[0][2:].split()
    if len(fields) < 3 or not fields[1].split("/")[0].isdigit():
        raise SipParseError(f"SDP m-line #{index + 1} is malformed")
    labels = [line[len("a=label:") :].strip() for line in lines if line.startswith("a=label:")]
    return SdpMedia(
        index=index,
        kind=fields[0].lower(),
        port=int(fields[1].split("/")[0]),
        label=labels[0] if labels else None,
        direction=_direction(lines) or session_direction,
    )


def audio_streams(media: Iterable[SdpMedia]) -> tuple[SdpMedia, ...]:
    """Audio m-lines that carry media (port 0 means the stream was refused)."""
    return tuple(m for m in media if m.kind == "audio" and m.port != 0)


# ---------------------------------------------------------------- RFC 7865 metadata


@dataclass(frozen=True)
class Participant:
    participant_id: str
    aors: tuple[str, ...] = field(repr=False)  # nameID aor (and draft <aor>), in order
    name: str | None = field(repr=False)
    sends: tuple[str, ...] = ()  # stream ids this participant sends


@dataclass(frozen=True)
class MediaStream:
    stream_id: str
    label: str | None


@dataclass(frozen=True)
class RecordingMetadata:
    participants: tuple[Participant, ...]  # in document order
    streams: tuple[MediaStream, ...]

    def label_of(self, stream_id: str) -> str | None:
        for stream in self.streams:
            if stream.stream_id == stream_id:
                return stream.label
        return None


def _local(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return None, tag


def _children(element: Element, name: str) -> Iterator[Element]:
    for child in element:
        if isinstance(child.tag, str) and _local(child.tag)[1] == name:
            yield child


def _text(element: Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return element.text.strip() or None


def _attr(element: Element, *names: str) -> str | None:
    for name in names:
        value = element.get(name)
        if value:
            return value.strip()
    return None


def _read_root(xml: str | bytes | None) -> Element:
    data = xml.encode() if isinstance(xml, str) else (xml or b"")
    if not data.strip():
        raise MetadataMissing("no application/rs-metadata+xml part in the INVITE")
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        root = SafeET.fromstring(data.strip())
    except ParseError as exc:
        raise MetadataError(f"metadata is not well-formed XML: {exc}") from None
    except DefusedXmlException as exc:
        reason = type(exc).__name__
        raise MetadataError(f"metadata uses forbidden XML constructs: {reason}") from None
    except (LookupError, ValueError) as exc:  # encoding="x-unknown", utf-7…
        raise MetadataError(f"metadata in an encoding we cannot read: {exc}") from None
    ns, name = _local(root.tag)
    if name != "recording" or ns not in NAMESPACES:
        raise MetadataError(
            f"metadata root is {{{ns}}}{name}, expected <recording> in {NAMESPACES[0]}"
        )
    return root


def _participant(element: Element, index: int) -> Participant:
    participant_id = _attr(element, "participant_id", "id")
    if participant_id is None:
        raise MetadataError(f"participant #{index + 1} has no participant_id")
    aors: list[str] = []
    name: str | None = None
    for name_id in _children(element, "nameID"):
        if aor := _attr(name_id, "aor"):
            aors.append(aor)
        name = name or _text(next(_children(name_id, "name"), None))
    aors.extend(a for a in (_text(e) for e in _children(element, "aor")) if a)
    name = name or _text(next(_children(element, "name"), None))
    sends = tuple(s for s in (_text(e) for e in _children(element, "send")) if s)
    return Participant(participant_id, tuple(aors), name, sends)


def parse_metadata(xml: str | bytes | None) -> RecordingMetadata:
    """Participants, streams and the send associations of a recording session."""
    root = _read_root(xml)
    participants = [_participant(e, i) for i, e in enumerate(_children(root, "participant"))]
    if not participants:
        raise MetadataError("metadata names no participant")
    streams: list[MediaStream] = []
    for index, element in enumerate(_children(root, "stream")):
        stream_id = _attr(element, "stream_id", "id")
        if stream_id is None:
            raise MetadataError(f"stream #{index + 1} has no stream_id")
        streams.append(MediaStream(stream_id, _text(next(_children(element, "label"), None))))
    sends: dict[str, list[str]] = {p.participant_id: list(p.sends) for p in participants}
    for assoc in _children(root, "participantstreamassoc"):
        owner = _attr(assoc, "participant_id", "id")
        if owner is None or owner not in sends:
            raise MetadataError("participantstreamassoc names an unknown participant")
        for send in _children(assoc, "send"):
            stream_id = _text(send)
            if stream_id and stream_id not in sends[owner]:
                sends[owner].append(stream_id)
    return RecordingMetadata(
        participants=tuple(
            Participant(p.participant_id, p.aors, p.name, tuple(sends[p.participant_id]))
            for p in participants
        ),
        streams=tuple(streams),
    )
