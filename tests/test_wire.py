"""Pure helpers for HTTP fields (shim/wire.py): lengths, paths, bytes back from text."""

from __future__ import annotations

import pytest

from shim.errors import ShimError
from shim.wire import as_bytes, has_dot_segment, parse_length, path_allowed


@pytest.mark.parametrize(("value", "number"), [("0", 0), (" 42\t", 42), ("007", 7)])
def test_lengths_are_decimal_digits_with_optional_whitespace(value: str, number: int) -> None:
    assert parse_length(value, "Upload-Length") == number


@pytest.mark.parametrize("value", ["", "-1", "+1", "1.0", "0x10", "5\x1c", "\x0b5", "\u0665",
                                   "1 2", "12345678901234567890"])
def test_anything_else_is_400_naming_the_field(value: str) -> None:
    with pytest.raises(ShimError) as refused:
        parse_length(value, "Upload-Offset")
    assert refused.value.status == 400 and "Upload-Offset" in refused.value.message


@pytest.mark.parametrize(("path", "allowed"), [
    ("/only/f", True), ("/only/a/../b", True), ("/only/./f", True), ("/only/..f", True),
    ("/only/../outside/f", False), ("/only/%2e%2e/x", False), ("/only/%2E%2e/x", False),
    ("/only/a/../../x", False), ("/only/..", False), ("/only/a/..", True), ("/other/only/f", False),
    ("/..", False), ("/only/.", True),
])
def test_paths_are_checked_with_their_dot_segments_resolved(path: str, allowed: bool) -> None:
    assert path_allowed(path, ("/only/",)) is allowed
    assert path_allowed(path, ()) is True  # no prefixes: every path


@pytest.mark.parametrize(("path", "dotted"), [
    ("/a/./b", True), ("/a/../b", True), ("/a/%2e/b", True), ("/a/%2E%2e", True), ("/.", True),
    ("/a/..b", False), ("/a/b.", False), ("/a/.../b", False), ("/a/b", False), ("", False),
])
def test_dot_segments_are_found_whatever_their_spelling(path: str, dotted: bool) -> None:
    assert has_dot_segment(path) is dotted


@pytest.mark.parametrize(("text", "raw"), [
    ("plain", b"plain"), ("caf\u00e9", b"caf\xc3\xa9"), ("caf\udce9", b"caf\xe9"),
    ("\udcff\udcfe", b"\xff\xfe"), ("lone \ud800", b"lone \\ud800"),
])
def test_text_from_a_request_goes_back_to_the_bytes_received(text: str, raw: bytes) -> None:
    """mitmproxy decodes as UTF-8 with surrogateescape; any other lone surrogate is escaped
    rather than an error."""
    assert as_bytes(text) == raw
