"""Pure helpers for HTTP fields shared by several protocols (RFC 9110)."""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from shim import errors

_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_length(value: str, name: str) -> int:
    """A non-negative decimal integer, as Upload-Offset and Upload-Length are (tus 1.0.0)."""
    text = value.strip(" \t")  # OWS (RFC 9110 section 5.6.3), nothing else
    if not _DIGITS.fullmatch(text):
        raise errors.bad_request(f"{name} must be a non-negative integer, not {value!r}")
    return int(text)


def path_allowed(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` lies under one of the configured prefixes; none configured: every path.
    Dot segments are resolved first (RFC 3986 section 5.2.4; `%2e` is a dot, section 2.3),
    since the legacy server resolves them: `/only/../elsewhere` is not under `/only/`."""
    if not prefixes:
        return True
    resolved = _without_dot_segments(path)
    return any(resolved.startswith(prefix) for prefix in prefixes)


_DOT = re.compile("%2e", re.IGNORECASE)


def has_dot_segment(path: str) -> bool:
    """Whether a path has a `.` or `..` segment, `%2e` counted as a dot (RFC 3986 2.3)."""
    return any(segment in (".", "..") for segment in _DOT.sub(".", path).split("/"))


def _without_dot_segments(path: str) -> str:
    kept: list[str] = []
    segments = _DOT.sub(".", path).split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
            if last:
                kept.append("")
        elif segment == ".":
            if last:
                kept.append("")
        else:
            kept.append(segment)
    return "/".join(kept)


def as_bytes(text: str) -> bytes:
    """Text that came from a request (or quotes one) back to bytes: mitmproxy decodes fields
    and paths as UTF-8 with surrogateescape, so this gives the bytes received; any other
    lone surrogate becomes a backslash escape rather than an error."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (RFC 9110 section 5.6.7)."""
    return email.utils.formatdate(timestamp, usegmt=True)


@dataclass(frozen=True)
class ContentRange:
    """`bytes S-E/TOTAL`, `bytes S-E/*`, `bytes */TOTAL` or `bytes */*` (RFC 9110 section
    14.4; the `*/*` inquiry is Google's). None stands for `*`."""

    start: int | None
    end: int | None
    total: int | None

    @property
    def size(self) -> int:
        return 0 if self.start is None or self.end is None else self.end - self.start + 1


_CONTENT_RANGE = re.compile(r"bytes (?:([0-9]{1,19})-([0-9]{1,19})|(\*))/(?:([0-9]{1,19})|(\*))")


def parse_content_range(value: str) -> ContentRange:
    """Parse a Content-Range request field; every malformed form is a 400 naming the value."""
    match = _CONTENT_RANGE.fullmatch(value.strip(" \t"))
    if match is None:
        raise errors.bad_request(f"malformed Content-Range {value!r}: want 'bytes S-E/TOTAL'")
    start_text, end_text, _, total_text, _ = match.groups()
    total = int(total_text) if total_text is not None else None
    if start_text is None:
        return ContentRange(None, None, total)
    start, end = int(start_text), int(end_text)
    if end < start:
        raise errors.bad_request(f"Content-Range {value!r} ends before it starts")
    if total is not None and end >= total:
        raise errors.ShimError("range", f"Content-Range {value!r} goes past its total", 416)
    return ContentRange(start, end, total)


def format_range(stored: int) -> str | None:
    """The `Range` of a 308 Resume Incomplete: the bytes stored, or None for none."""
    return f"bytes=0-{stored - 1}" if stored > 0 else None
