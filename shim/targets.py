"""The one constructor for delivery targets, used by every protocol.

What reaches the legacy server is the operator's choice, not the client's: the path comes
from the request's own URL or the operator's template (`{id}` is always the shim's id, every
other value percent-encoded and never a dot segment), and the forwarded fields are the
creating request's own, checked once, at creation, so an upload that was accepted can be
delivered. Every check raises `ShimError` (400) naming what is wrong, before anything is
stored.
"""

from __future__ import annotations

import re
import string
from typing import Literal
from urllib.parse import quote, unquote

from shim import errors
from shim.model import HeaderList, Target

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length", "expect",
})
"""Fields that belong to one connection (RFC 9110 section 7.6.1) or to the framing the shim
sets itself: never copied from one message to another. The project's only such list."""

PROTOCOL_PREFIXES = ("tus-", "upload-")
PROTOCOL_FIELDS = frozenset({
    "content-range", "x-http-method-override", "content-digest", "repr-digest",
    "want-repr-digest", "x-upload-content-type", "x-upload-content-length", "x-goog-resumable",
})
"""Resumable-upload fields of any protocol: whichever protocol took the request, none of
them reaches the legacy server (a `Tus-Resumable` on a WebDAV PUT included)."""
_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))

_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""RFC 9110 section 5.5: a field value is VCHAR, SP, HTAB and obs-text; any other control
character (CR, LF and NUL among them) cannot be sent on."""
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\U0010ffff])*"'
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*")
"""RFC 9110 section 8.3.1: `type "/" subtype *( OWS ";" OWS parameter )`."""
_FIELD_NAME = re.compile(_TOKEN)
_DOT_SEGMENTS = frozenset({"", ".", ".."})


def connection_fields(fields: HeaderList) -> frozenset[str]:
    """The hop-by-hop fields of one message: the fixed ones and those its `Connection`
    names (RFC 9110 section 7.6.1)."""
    named = {token.strip().lower() for name, value in fields if name.lower() == "connection"
             for token in value.split(",")}
    return HOP_BY_HOP | named


def forwarded_fields(fields: HeaderList, protocol_prefixes: tuple[str, ...] = (),
                     protocol_names: frozenset[str] = frozenset()) -> HeaderList:
    """The creating request's fields the legacy server gets: no hop-by-hop field, no field
    of the protocol; a value that is not a valid field value refuses the creation (400).
    Values are kept as received (obs-text included: `shim.upstream` writes them back byte
    for byte), except `Cookie`: HTTP/2 and HTTP/3 clients split it into one field per cookie
    (RFC 9113 section 8.2.3), which an HTTP/1.1 server must get as one line (RFC 6265
    section 5.4), so several are joined with "; " where the first was, as mitmproxy joins
    them for pass-through (`Http1Client.send`)."""
    dropped = connection_fields(fields) | protocol_names | PROTOCOL_FIELDS
    prefixes = PROTOCOL_PREFIXES + protocol_prefixes
    kept = []
    cookies: list[str] = []
    for name, value in fields:
        if _FIELD_VALUE_BAD.search(value) or not _FIELD_NAME.fullmatch(name):
            # any field, forwarded or not: a request this broken is no upload
            raise errors.bad_request(f"the field {name!r} has a control character or is no "
                                     "field name; it cannot be forwarded")
        lowered = name.lower()
        if lowered == "cookie" and "cookie" not in dropped:
            if not cookies:
                kept.append((name, ""))  # its place; the value is all of them, joined below
            cookies.append(value)
        elif not (lowered in dropped or lowered.startswith(prefixes)):
            kept.append((name, value))
    if cookies:
        at = next(i for i, (name, _) in enumerate(kept) if name.lower() == "cookie")
        kept[at] = (kept[at][0], "; ".join(cookies))
    return tuple(kept)


def media_type(value: str | None, name: str) -> str | None:
    """A Content-Type for the delivery, or None; anything else than a media type is 400."""
    if value is None or not value.strip():
        return None
    if not _MEDIA_TYPE.fullmatch(value.strip()) or _FIELD_VALUE_BAD.search(value):
        raise errors.bad_request(f"{name} must be a media type such as 'image/png', "
                                 f"not {value!r}")
    return value.strip()


def template_path(template: str, upload_id: str, values: dict[str, str],
                  keep_slashes: frozenset[str] = frozenset()) -> str:
    """The operator's path template filled in: `{id}` is the shim's id whatever the client
    sent; every other placeholder is a client value, percent-encoded whole (no `/`), and
    refused when empty, `.` or `..` before or after decoding (RFC 3986 section 5.2.4 would
    make those climb the operator's path). The values named in `keep_slashes` (an S3 key)
    keep their `/`, and each of their segments is checked so."""
    filled: dict[str, str] = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if not name or name in filled:
            continue
        if name == "id":
            filled[name] = upload_id
            continue
        if name not in values:
            raise errors.bad_request(
                f"Upload-Metadata must carry {name!r}: the delivery path needs it")
        segments = values[name].split("/") if name in keep_slashes else [values[name]]
        for segment in segments:
            if segment in _DOT_SEGMENTS or unquote(segment) in _DOT_SEGMENTS:
                raise errors.bad_request(f"the value of {name!r} cannot name a file: "
                                         f"{values[name]!r}")
        filled[name] = "/".join(quote(segment, safe="") for segment in segments)
    return template.format_map(filled)


def request_target(path: str) -> str:
    """A path as an HTTP/1.1 request target (RFC 9112 section 3.2): bytes that are not
    visible ASCII (a space, a control, UTF-8 or any other byte the client sent) are
    percent-encoded; everything else, `%` escapes included, is kept as the client wrote it."""
    return quote(path, safe=_VISIBLE, encoding="utf-8", errors="surrogateescape")


def target(method: str, path: str, fields: HeaderList, *,
           protocol_prefixes: tuple[str, ...] = (), protocol_names: frozenset[str] = frozenset(),
           content_type: str | None = None, content_type_name: str = "Content-Type",
           body: Literal["raw", "multipart"] = "raw", field: str = "file",
           filename: str | None = None) -> Target:
    """The ONE request a finished file goes out as, checked now so that it can be sent."""
    headers = forwarded_fields(fields, protocol_prefixes, protocol_names | {"content-type"})
    host = next((value for name, value in fields if name.lower() == "host"), None)
    return Target(method=method, path=request_target(path), headers=headers, body=body, field=field,
                  filename=filename, content_type=media_type(content_type, content_type_name),
                  host=host)
