"""Pure helpers for HTTP fields shared by several protocols (RFC 9110)."""

from __future__ import annotations

import email.utils
import re

from shim import errors
from shim.model import HeaderList

# RFC 9110 section 7.6.1 (Connection) and the framing fields the upstream code sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length", "expect",
})

_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_length(value: str, name: str) -> int:
    """A non-negative decimal integer, as Upload-Offset and Upload-Length are (tus 1.0.0)."""
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise errors.bad_request(f"{name} must be a non-negative integer, not {value!r}")
    return int(text)


def forwardable(fields: HeaderList, protocol_prefixes: tuple[str, ...],
                protocol_names: frozenset[str] = frozenset()) -> HeaderList:
    """The request fields that may reach the legacy server: no hop-by-hop, no protocol field."""
    kept = []
    for name, value in fields:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in protocol_names:
            continue
        if lowered.startswith(protocol_prefixes):
            continue
        kept.append((name, value))
    return tuple(kept)


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (RFC 9110 section 5.6.7)."""
    return email.utils.formatdate(timestamp, usegmt=True)
