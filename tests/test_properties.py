"""Property-based tests (hypothesis) of every parser and protocol module (issue 9, item 8).

The shim faces the internet: whatever a client sends, it must answer sensibly and hand the
legacy server only what the operator allows. Example-based tests try the cases someone thought
of; these try arbitrary methods, paths, header fields (CR, LF, NUL, obs-text, non-ASCII, values
of hundreds of KiB) and bodies cut into arbitrary chunks, and check:

- `parse` never lets an exception escape; a refusal is a `Refuse` carrying a `ShimError`;
- every refusal is a 4xx with a message, as the protocol's own `render` writes it, and no
  reply field carries CR, LF, NUL or bytes the addon cannot encode;
- every `Target` a protocol builds (the ONE request that will reach the legacy server) has no
  CR, LF or NUL, no hop-by-hop or protocol field, only fields the client sent (byte for
  byte), a path the legacy server can be sent (visible ASCII) with no dot segment made of a
  client's value and `{id}` the shim's own id; a creation whose fields are not valid field
  values (RFC 9110 section 5.5) is refused; the upload id is the shim's (a safe pattern);
- a request that announces a partial upload is taken by a protocol that speaks that form of
  it, or refused; it never passes through (the guard is complete);
- the byte-range body decoders decode the same whatever the chunking;
- on a real Engine and LocalStore, driven through `Exchange` as the addon drives it, a request
  answered 4xx (or passed through) changes nothing stored, and no file is ever made outside
  `storage.dir/data/`, nor named by anything but the shim's own ids.

Properties the shim does not meet yet stay here and fail with hypothesis's minimal example.

Determinism: every test runs under the `shim-ci` profile (derandomize, no example database,
no deadline), so CI runs the same examples each time. `SHIM_HYPOTHESIS_PROFILE=shim-explore`
draws fresh ones, ten times as many. How many ran, per test and per module:

    .venv/bin/python -m pytest -n 2 tests/test_properties.py --hypothesis-show-statistics
    .venv/bin/python -m pytest -p no:xdist -s tests/test_properties.py   # table at the end

Examples per module with `shim-ci` (max_examples; hypothesis stops early only when a space
is exhausted; a failing property adds its shrinking, capped at 5 s here by
SHIM_HYPOTHESIS_SHRINK_SECONDS):

| module                          | tests                                             | examples      |
|---------------------------------|---------------------------------------------------|---------------|
| shim/wire.py                    | parse_length, parse_content_range                 | 400 + 600     |
| shim/protocols/tus.py           | parse_metadata (2), parse_checksum, Tus.parse     | 500+200+300+500 |
| shim/protocols/ietf.py          | Ietf.parse                                        | 500           |
| shim/protocols/content_range.py | ContentRangeProtocol.parse                        | 500           |
| shim/protocols/byteranges.py    | Byteranges.parse; decoders (valid, mangled)       | 500+300+400   |
| shim/protocols/webdav.py        | Webdav.parse (REPORT bodies included)             | 500           |
| shim/protocols/seed001.py       | Seed001.parse                                     | 500           |
| shim/protocols/tus_target.py    | TusTarget.parse                                   | 500           |
| shim/protocols/guard.py         | Guard.parse; routing over every protocol          | 500 + 1000    |
| shim/addon.py                   | the owner of any credentials                      | 100           |
| shim/exchange.py, engine.py,    | sequences of 2-7 requests on a real LocalStore,   | 8 x 40        |
| local_store.py                  | one per protocol family (tus, ietf, content-range,|               |
|                                 | session, tus-target, byteranges, webdav, seed001) |               |

Each parse example is parsed under three configurations (open paths, restricted paths and
limits, a `{id}/{filename}` template), so a protocol's parse runs up to 3 x its examples.
The hostile requests and refusals that issue 9 lists also run as fixed cases through the same
checks (`ISSUE_CASES`, `ISSUE_SEQUENCES`), one test line each, whatever hypothesis draws.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim import commands as c
from shim import config as shim_config
from shim.addon import _owner, _protocols
from shim.engine import Engine, NewUpload
from shim.errors import ShimError
from shim.exchange import Exchange
from shim.lifecycle import State
from shim.local_store import LocalStore
from shim.model import Reply, Request, Upload
from shim.outbox import DeliveryPolicy, Outbox
from shim.protocols import Protocol
from shim.protocols.byteranges import MessageDecoder, MultipartDecoder
from shim.protocols.routing import route
from shim.protocols.tus import format_metadata, parse_checksum, parse_metadata
from shim.targets import request_target
from shim.upstream import Origin, Upstream
from shim.wire import parse_content_range, parse_length

# --- profile and bookkeeping ------------------------------------------------------------

# hypothesis's pytest plugin writes a patch of failing examples under its storage directory
# (./.hypothesis by default): keep the work tree clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "shim-hypothesis"))

settings.register_profile(
    "shim-ci", derandomize=True, deadline=None, database=None, print_blob=False,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much])
settings.register_profile("shim-explore", settings.get_profile("shim-ci"), derandomize=False)
_PROFILE_NAME = os.environ.get("SHIM_HYPOTHESIS_PROFILE", "shim-ci")
_PROFILE = settings.get_profile(_PROFILE_NAME)
_SCALE = 10 if _PROFILE_NAME == "shim-explore" else 1
with contextlib.suppress(ImportError):  # hypothesis shrinks for up to 300 s by default
    from hypothesis.internal.conjecture import engine as _conjecture

    _conjecture.MAX_SHRINKING_SECONDS = int(os.environ.get("SHIM_HYPOTHESIS_SHRINK_SECONDS", "5"))


def budget(examples: int) -> settings:
    """The profile, with this test's share of the minute the file may take on 2 workers."""
    return settings(_PROFILE, max_examples=examples * _SCALE)


EXAMPLES: collections.Counter[str] = collections.Counter()
"""Examples run in this process, by module under test (printed when the module ends)."""


def ran(module: str) -> None:
    EXAMPLES[module] += 1


@pytest.fixture(scope="module", autouse=True)
def _examples_table() -> Iterator[None]:
    """Print how many examples each module got (visible with -s; per worker under xdist)."""
    yield
    width = max((len(name) for name in EXAMPLES), default=10)
    lines = [f"  {name:<{width}}  {count:>6}" for name, count in sorted(EXAMPLES.items())]
    print("\nhypothesis examples run, by module:\n" + "\n".join(lines))


# --- what the properties check --------------------------------------------------------------

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length", "expect",
})
"""RFC 9110 section 7.6.1 and the framing the shim sets itself (kept here, not imported, so
that a shorter list in the shim cannot weaken the test)."""
PROTOCOL_FIELDS = frozenset({
    "content-range", "x-http-method-override", "content-digest", "repr-digest",
    "want-repr-digest", "x-upload-content-type", "x-upload-content-length", "x-goog-resumable",
})
PROTOCOL_PREFIXES = ("tus-", "upload-")
OWN_MEDIA_TYPES = {
    "tus": ("application/offset+octet-stream",), "tus-target": ("application/offset+octet-stream",),
    "ietf": ("application/partial-upload",), "byteranges": ("message/byteranges", "multipart/byteranges"),
}
"""The media types that label a protocol's chunks, never the file the legacy server gets."""
MAY_DROP = HOP_BY_HOP | PROTOCOL_FIELDS | {"content-type", "range", "if-none-match"}
MAY_DROP_PREFIXES = (*PROTOCOL_PREFIXES, "x-goog-", "x-guploader-")
"""Fields a protocol may leave out of the delivery; every other field the client sent on the
creating request reaches the legacy server as it came."""

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
MEDIA_TYPE = re.compile(rb"%s/%s(?:[ \t]*;[ \t]*(?:%s=(?:%s|%s))?)*"
                        % (_TOKEN, _TOKEN, _TOKEN, _TOKEN, _QUOTED))
"""RFC 9110 section 8.3.1, over the bytes the field will be written as."""
WRITES = (c.Open, c.Append, c.WriteRange, c.WriteSegments, c.Concatenate)


def wire(text: str) -> bytes:
    """The bytes of a field as mitmproxy received them (it decodes UTF-8 + surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


def valid_field_value(value: str) -> bool:
    """RFC 9110 section 5.5: VCHAR, SP, HTAB and obs-text only."""
    return all(b == 0x09 or 0x20 <= b <= 0x7E or b >= 0x80 for b in wire(value))


def no_cr_lf_nul(text: str) -> bool:
    return not any(ch in text for ch in "\r\n\x00")


def owner_of(request: Request) -> str:
    """The owner the addon derives (a digest of Authorization), over the bytes received."""
    value = request.header("authorization")
    return hashlib.sha256(wire(value)).hexdigest() if value else ""


def check_reply(reply: Reply, what: str) -> None:
    """A reply the addon can write: a real status, fields without CR/LF/NUL, UTF-8 encodable."""
    assert 100 <= reply.status <= 599, f"{what}: status {reply.status}"
    for name, value in reply.headers:
        assert TOKEN.fullmatch(name), f"{what}: reply field name {name!r}"
        assert no_cr_lf_nul(value), f"{what}: reply field {name}: {value!r}"
        try:
            value.encode()
        except UnicodeEncodeError:
            pytest.fail(f"{what}: reply field {name} cannot be encoded: {value!r}")


def check_error(error: object, what: str) -> ShimError:
    assert isinstance(error, ShimError), f"{what}: refused with {error!r}, not a ShimError"
    assert 400 <= error.status <= 499, f"{what}: a refusal with status {error.status}: {error}"
    assert error.message.strip(), f"{what}: a refusal without a message"
    return error


def check_refusal(protocol: Protocol, request: Request, command: c.Refuse) -> None:
    error = check_error(command.error, protocol.name)
    reply = protocol.render(request, command, c.Outcome(error=error))
    assert 400 <= reply.status <= 499, f"{protocol.name}: refusal rendered as {reply.status}"
    assert reply.body.strip(), f"{protocol.name}: refusal rendered without a message"
    check_reply(reply, protocol.name)


def _dot(segment: str) -> bool:
    """A segment that is (or decodes, once or twice, to) empty, `.` or `..`."""
    once = unquote(segment)
    return {segment, once, unquote(once)} & {"", ".", ".."} != set()


@dataclass(frozen=True)
class Setup:
    """One configuration and its protocols, in the order the addon asks them."""

    name: str
    config: shim_config.Config = field(repr=False)
    protocols: tuple[Protocol, ...] = field(repr=False)

    def protocol(self, name: str) -> Protocol | None:
        return next((p for p in self.protocols if p.name == name), None)


def setup(name: str, raw: dict[str, Any]) -> Setup:
    config = shim_config.from_dict(raw)
    return Setup(name, config, tuple(_protocols(config)))


SETUPS = (
    setup("open", {
        "webdav": {"paths": ["/dav/"]},
        "seed001": {"query_range": True, "expect_range": True},
    }),
    setup("restricted", {
        "tus": {"forward": {"path": "/uploads/{user}/{filename}", "body": "multipart"},
                "max_size": 1000},
        "content_range": {"paths": ["/cr/", "/g/"], "max_size": 1000},
        "ietf": {"paths": ["/up/"], "max_size": 1000},
        "tus_target": {"paths": ["/t/"], "max_size": 1000},
        "byteranges": {"paths": ["/b/"], "max_size": 1000},
        "seed001": {"query_range": True, "expect_range": True, "paths": ["/s/"]},
        "webdav": {"paths": ["/dav/"]},
    }),
    setup("id-and-filename", {
        "tus": {"forward": {"path": "/in/{id}/{filename}"}},
        "ietf": {"paths": ["/up/", "/dav/"]},
        "seed001": {"query_range": True},
        "webdav": {"paths": ["/dav/"]},
    }),
)


def check_command(setup_: Setup, protocol: Protocol, request: Request, owner: str,
                  command: c.Command | None) -> None:
    """Whatever a protocol made of a request is one of the things it may make."""
    if command is None or isinstance(command, c.Forward | c.NeedBody | c.Report):
        return
    if isinstance(command, c.Refuse):
        check_refusal(protocol, request, command)
        return
    if isinstance(command, c.Immediate):
        check_reply(command.reply, protocol.name)
        return
    if isinstance(command, c.Append):
        assert command.offset >= 0 and (command.declared_length or 0) >= 0, command
    if isinstance(command, c.WriteRange):
        assert (command.start or 0) >= 0 and (command.total or 0) >= 0, command
    new = getattr(command, "new", None)
    if isinstance(new, NewUpload):
        check_new(setup_, protocol, request, owner, command, new)


def check_new(setup_: Setup, protocol: Protocol, request: Request, owner: str,
              command: c.Command, new: NewUpload) -> None:
    name = protocol.name
    assert SAFE_ID.fullmatch(new.id), f"{name}: upload id {new.id!r} is not the shim's own"
    assert new.owner in (owner, ""), f"{name}: owner {new.owner!r} is not the request's"
    for field_name, value in request.fields:
        assert valid_field_value(value), (
            f"{name}: a creation was accepted although field {field_name!r} has an invalid "
            f"value {value[:60]!r} (decisions: 400)")
    if new.target is not None:
        check_target(setup_, protocol, request, new)
    if isinstance(command, c.Open) and command.interim is not None:
        check_reply(command.interim, f"{name} interim")
    upload = Upload(id=new.id, protocol=new.protocol, owner=new.owner, length=new.length,
                    metadata=dict(new.metadata), target=new.target, parts=new.parts,
                    created=1000.0, updated=1000.0, expires_after=new.expiration,
                    digests=dict(new.digests))
    check_reply(protocol.render(request, command, c.Outcome(upload=upload)), f"{name} created")
    if name == "tus":  # HEAD echoes the stored metadata
        inspect = c.Inspect(new.id, owner)
        check_reply(protocol.render(request, inspect, c.Outcome(upload=upload)), "tus HEAD")


def check_target(setup_: Setup, protocol: Protocol, request: Request, new: NewUpload) -> None:
    name, target = protocol.name, new.target
    assert target is not None
    assert TOKEN.fullmatch(target.method), f"{name}: method {target.method!r}"
    received = set(request.fields)
    connection = {token.strip().lower() for key, value in request.fields
                  if key.lower() == "connection" for token in value.split(",")}
    for key, value in target.headers:
        lowered = key.lower()
        assert no_cr_lf_nul(key) and no_cr_lf_nul(value), \
            f"{name}: forwarded field {key!r}: {value[:60]!r} has CR, LF or NUL"
        assert valid_field_value(value), f"{name}: forwarded {key}: invalid value {value[:60]!r}"
        assert lowered not in HOP_BY_HOP and lowered not in connection, \
            f"{name}: hop-by-hop field {key} forwarded"
        assert lowered not in PROTOCOL_FIELDS and not lowered.startswith(PROTOCOL_PREFIXES), \
            f"{name}: protocol field {key}: {value[:60]!r} forwarded to the legacy server"
        assert not (name == "seed001" and lowered == "range"), "seed001: Range forwarded"
        assert (key, value) in received, f"{name}: forwarded {key}: {value[:60]!r} was not sent"
    forwarded = set(target.headers)
    for key, value in request.fields:
        lowered = key.lower()
        if lowered in MAY_DROP or lowered in connection or lowered.startswith(MAY_DROP_PREFIXES):
            continue
        if TOKEN.fullmatch(key) and valid_field_value(value):
            assert (key, value) in forwarded, f"{name}: the client's {key} was not forwarded"
    for label, text in (("content type", target.content_type), ("filename", target.filename),
                        ("form field", target.field)):
        assert text is None or no_cr_lf_nul(text), f"{name}: {label} {text!r}"
    if target.content_type is not None:
        media = target.content_type.split(";")[0].strip().lower()
        assert media not in OWN_MEDIA_TYPES.get(name, ()), \
            f"{name}: the file is forwarded as its own protocol's {target.content_type}"
        if name == "tus":
            assert MEDIA_TYPE.fullmatch(wire(target.content_type.strip())), \
                f"tus: filetype {target.content_type!r} is not a media type (decisions: 400)"
    assert target.path and all(0x21 <= ord(ch) <= 0x7E for ch in target.path), \
        f"{name}: the legacy server cannot be sent path {target.path!r}"
    if name == "tus":
        check_template_path(setup_.config.tus.forward.path, target.path, new.id)
    else:
        assert target.path.partition("?")[0] == request_target(request.path), \
            f"{name}: delivered to {target.path!r}, not the request's own {request.path!r}"


def check_template_path(template: str, path: str, upload_id: str) -> None:
    """`{id}` is the shim's id; each other placeholder is one segment, never a dot one."""
    wanted, made = template.split("/"), path.split("/")
    assert len(made) == len(wanted), f"tus: {path!r} does not have the segments of {template!r}"
    for pattern, segment in zip(wanted, made, strict=True):
        if pattern == "{id}":
            assert segment == upload_id, f"tus: {{id}} is {segment!r}, not the shim's {upload_id!r}"
        elif "{" in pattern:
            assert not _dot(segment), f"tus: {template!r} made the dot segment {segment!r}"
        else:
            assert segment == pattern, f"tus: {path!r} left the template {template!r}"


# --- what a hostile client sends ------------------------------------------------------------

SURROGATES = st.integers(0xDC80, 0xDCFF).map(chr)
"""Bytes that are not UTF-8, as mitmproxy hands them on (surrogateescape)."""
SPECIALS = st.sampled_from([
    "\r", "\n", "\x00", "\t", " ", "\x7f", "\x0b", "\x1c", "\x85", "\u2028", "\u00e9", "\u00ff",
    "\u20ac", "\U0001f600", "/", ".", ",", ";", "=", '"', "%", ":", "@", "*", "-", "?", "\\",
])
ANY_CHAR = st.characters(exclude_categories=["Cs"])
"""Any character mitmproxy can hand on as text (lone surrogates only as SURROGATES)."""
CHARS = st.one_of(SPECIALS, st.characters(min_codepoint=0x20, max_codepoint=0x7E), ANY_CHAR,
                  SURROGATES)
TEXT = st.text(CHARS, max_size=30)
HUGE = st.builds(lambda unit, n: unit * n,
                 st.sampled_from(["a", "0", "\r\n", ".", ",", "\u00e9", "%2e", "a=:YQ==:, "]),
                 st.integers(4096, 300_000))
HOSTILE = st.one_of(TEXT, TEXT, TEXT, HUGE)
SMALL = st.integers(0, 40)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


NUMBER = st.one_of(SMALL.map(str), st.integers(0, 2**70).map(str), st.sampled_from([
    "-1", "+5", " 5", "5 ", "05", "1e3", "0x10", "\u0663", "\uff15", "", "1,2", "5, 6",
    "9" * 20, "?1", "5;x", "5\x1c", "\x0b5",
]), HOSTILE)
CONTENT_RANGE = st.one_of(
    st.builds(lambda s, n, t: f"bytes {s}-{s + n}/{t}", SMALL, SMALL,
              st.one_of(st.integers(0, 90).map(str), st.just("*"))),
    st.builds(lambda t: f"bytes */{t}", st.one_of(SMALL.map(str), st.just("*"))),
    st.sampled_from([
        "bytes=0-4/5", "bytes  0-4/5", "Bytes 0-4/5", "bytes 0-4/5, 6-7/8", "bytes 0-4",
        "bytes \u0660-\u0664/\u0665", "bytes 0-/5", "bytes -4/5", "bytes 4-0/5", "bytes 0-4/4",
        "bytes\t0-4/5", "bytes 0-4/5\r\nX: y", "bytes 00-04/05", "bytes */*", "bytes 0-4/*",
        "bytes 0-18446744073709551616/18446744073709551617", "bytes=*/5", "*/5", "0-4/5",
    ]),
    HOSTILE,
)
META_KEYS = st.one_of(
    st.sampled_from(["filename", "filetype", "name", "contentType", "id", "user", "Filename"]),
    st.text(CHARS, min_size=1, max_size=8),
)
META_VALUES = st.one_of(st.sampled_from([
    "", ".", "..", "./", "../..", "a/b", "%2e%2e", "%2E", ".%2e", "%252e%252e", "%00",
    "x\r\ny", "\x00", "\u00e9t\u00e9.txt", "report.pdf", "text/plain", "text/plain\r\nX-Injected: 1",
    "text/plain; charset=utf-8", "image/png", "a b", "notatype", "/", "..\\..", "{id}",
    "\u202e", "text/plain; q=\"a\\\"b\"",
]), st.text(ANY_CHAR, max_size=12))


def metadata_field(pairs: list[tuple[str, str | None]]) -> str:
    return ",".join(key if value is None else f"{key} {b64(value.encode())}"
                    for key, value in pairs)


METADATA = st.one_of(
    st.lists(st.tuples(META_KEYS, st.one_of(st.none(), META_VALUES)), max_size=4).map(metadata_field),
    st.lists(st.tuples(META_KEYS, st.one_of(st.none(), META_VALUES)), max_size=4).map(metadata_field),
    HOSTILE,
)
CHECKSUM = st.one_of(
    st.builds(lambda alg, raw: f"{alg} {b64(raw)}",
              st.sampled_from(["sha1", "md5", "sha256", "sha512", "crc32", "SHA1", ""]),
              st.binary(max_size=64)),
    st.builds(lambda alg, data: f"{alg} {b64(hashlib.new(alg, data).digest())}",
              st.sampled_from(["sha1", "md5", "sha256", "sha512"]), st.binary(max_size=8)),
    st.sampled_from(["sha1 \u00e9", "sha1  " + b64(bytes(20)), "sha1"]),
    HOSTILE,
)
SF_BOOL = st.one_of(st.sampled_from(["?0", "?1", "?0;x=1", "?1;a", "?2", "1", "0", "true",
                                     "?0, ?1", " ?1", "?1 "]), HOSTILE)
SF_INT = st.one_of(SMALL.map(str), st.sampled_from([
    "-1", "1.5", "999999999999999", "9999999999999999", "0;x=1", "?1", '"5"', "5, 6",
]), HOSTILE)
DIGEST = st.one_of(
    st.builds(lambda alg, raw: f"{alg}=:{b64(raw)}:",
              st.sampled_from(["sha-256", "sha-512", "md5", "unixsum"]), st.binary(max_size=64)),
    st.sampled_from(["sha-256=abc", "sha-256=:!!:", f"sha-256=:{b64(bytes(32))}:, sha-512=:x:",
                     "sha-256=:" + b64(bytes(32)) + ":;p=1", "sha-256"]),
    HOSTILE,
)
CONTENT_TYPE = st.one_of(st.sampled_from([
    "application/offset+octet-stream", "application/partial-upload", "message/byteranges",
    "multipart/byteranges; boundary=xyz", "multipart/byteranges", 'multipart/byteranges; boundary="a b"',
    "text/plain", "text/plain\r\nX: y", "Application/Offset+Octet-Stream", "image/png; x",
    "multipart/byteranges; boundary=" + "b" * 80,
]), st.builds("multipart/byteranges; boundary={}".format, TEXT), HOSTILE)
VALUES: dict[str, st.SearchStrategy[str]] = {
    "tus-resumable": st.one_of(st.sampled_from(["1.0.0", "1.0.0", "1.0.0", "0.2.2"]), HOSTILE),
    "upload-length": NUMBER, "upload-offset": st.one_of(NUMBER, SF_INT),
    "upload-defer-length": st.one_of(st.sampled_from(["1", "0", "2", " 1"]), HOSTILE),
    "upload-metadata": METADATA,
    "upload-concat": st.one_of(st.sampled_from([
        "partial", "final;/files/a /files/b", "final;", "final; /files/../x", "final;/files/",
        "final;http://x/files/abc", "final;/files/a/b", "partial;x",
    ]), HOSTILE),
    "upload-checksum": CHECKSUM, "upload-complete": SF_BOOL, "upload-incomplete": SF_BOOL,
    "upload-draft-interop-version": st.one_of(
        st.sampled_from(["3", "5", "6", "7", "8", "9", "-1", "8;x", "08"]), HOSTILE),
    "content-range": CONTENT_RANGE,
    "range": st.one_of(CONTENT_RANGE, st.sampled_from(["bytes=0-4", "bytes=0-"])),
    "expect": st.one_of(st.sampled_from(["Range", "range", "100-continue", "100-continue, Range",
                                         "Range\x00"]), HOSTILE),
    "content-type": CONTENT_TYPE, "x-upload-content-type": CONTENT_TYPE,
    "content-digest": DIGEST, "repr-digest": DIGEST, "want-repr-digest": DIGEST,
    "x-http-method-override": st.one_of(st.sampled_from(
        ["PATCH", "DELETE", "HEAD", "OPTIONS", "GET", "POST", "patch", " PATCH", "PUT"]), HOSTILE),
    "if-none-match": st.one_of(st.just("*"), st.just('"etag"'), HOSTILE),
    "x-upload-content-length": NUMBER,
    "x-goog-resumable": st.one_of(st.sampled_from(["start", "Start"]), HOSTILE),
    "connection": st.one_of(st.sampled_from(["close", "keep-alive", "X-Custom, Upload-Offset"]),
                            HOSTILE),
    "transfer-encoding": st.one_of(st.just("chunked"), HOSTILE), "content-length": NUMBER,
}
ORDINARY_VALUE = st.one_of(st.sampled_from(["Bearer alice", "session=1", "\u00e9", "x"]), HOSTILE)
FIELD_NAMES = [
    "Tus-Resumable", "Upload-Length", "Upload-Defer-Length", "Upload-Offset", "Upload-Metadata",
    "Upload-Concat", "Upload-Checksum", "Upload-Complete", "Upload-Incomplete",
    "Upload-Draft-Interop-Version", "Content-Range", "Range", "Expect", "Content-Type",
    "Content-Digest", "Repr-Digest", "Want-Repr-Digest", "X-HTTP-Method-Override",
    "If-None-Match", "X-Upload-Content-Type", "X-Upload-Content-Length", "X-Goog-Resumable",
    "Authorization", "Cookie", "X-Request-Id", "Accept", "Connection", "Keep-Alive", "TE",
    "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Authorization", "Host", "Content-Length",
]
FIELD_NAME = st.one_of(
    st.sampled_from(FIELD_NAMES).flatmap(lambda n: st.sampled_from([n, n, n.lower(), n.upper()])),
    st.sampled_from(FIELD_NAMES),
    st.text(CHARS, min_size=1, max_size=10),
)
FOCUS: dict[str, tuple[list[str], list[str]]] = {
    "tus": (["/files/", "/files"], ["Tus-Resumable", "Upload-Length", "Upload-Defer-Length",
                                    "Upload-Offset", "Upload-Metadata", "Upload-Concat",
                                    "Upload-Checksum", "X-HTTP-Method-Override", "Content-Type"]),
    "ietf": (["/up/", "/.well-known/resumable-uploads/", "/dav/"],
             ["Upload-Complete", "Upload-Incomplete", "Upload-Draft-Interop-Version",
              "Upload-Offset", "Upload-Length", "Repr-Digest", "Content-Digest", "Content-Type"]),
    "content-range": (["/cr/", "/g/"], ["Content-Range", "X-Upload-Content-Length",
                                        "X-Upload-Content-Type", "X-Goog-Resumable",
                                        "Content-Type", "Content-Length"]),
    "byteranges": (["/b/"], ["Content-Type", "If-None-Match", "Content-Range"]),
    "webdav": (["/dav/"], ["Content-Range", "Content-Type", "Upload-Complete"]),
    "seed001": (["/s/"], ["Expect", "Range", "Content-Range", "Content-Type"]),
    "tus-target": (["/t/"], ["Tus-Resumable", "Upload-Length", "Upload-Offset", "Content-Type",
                             "Upload-Checksum", "Content-Range"]),
    "guard": (["/x/"], ["Upload-Offset", "Upload-Complete", "Upload-Incomplete", "Content-Range",
                        "Tus-Resumable", "Upload-Length", "Expect", "Content-Type"]),
}
PREFIXES = ["/files/", "/files", "/.well-known/resumable-uploads/", "/dav/", "/s/", "/cr/", "/g/",
            "/b/", "/t/", "/up/", "/uploads/", "/", "/files/x/", "/x/"]
SEGMENT = st.one_of(
    st.sampled_from([".", "..", "", "%2e%2e", "%2E", "file.bin", "abc", "%0d%0a", "a;b", "\u00e9",
                     "report.pdf"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#/"),
            max_size=12),
)
QUERY = st.lists(st.one_of(
    st.sampled_from(["uploadType=resumable", "upload_id=abc", "range=0-4/5", "range=*/5",
                     "range=", "range=0-4/5&range=5-9/10", "x=1", "upload_id=..%2F..",
                     "range=bytes=0-4/5", "range=0-4/5%0d%0aX:y"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["range", "uploadType", "upload_id", "q"]),
              st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                    exclude_characters="&#"), max_size=10)),
), max_size=3).map("&".join)
BODY_LENGTH = st.one_of(st.none(), st.just(0), SMALL, st.sampled_from([2**31, 2**63, 10**20]))
REPORT_BODY = st.one_of(
    st.just(b'<?xml version="1.0"?><i:upload-progress xmlns:i="ithit"/>'),
    st.just(b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "bb"><!ENTITY c "&b;&b;&b;">]>'
            b'<i:upload-progress xmlns:i="ithit">&c;</i:upload-progress>'),
    st.just(b'<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><a>&e;</a>'),
    st.just(b"<a/>"), st.just(b""), st.binary(max_size=100),
)
ORIGINS = st.sampled_from(["", "http://shim.example", "https://shim.example:8443",
                           "http://[::1]:8000"])


@st.composite
def requests(draw: st.DrawFn, focus: str | None = None) -> Request:
    """An arbitrary request head, leaning towards the paths and fields of `focus`."""
    prefixes, names = FOCUS.get(focus or "", ([], []))
    prefix = draw(st.one_of(st.sampled_from(prefixes or PREFIXES), st.sampled_from(PREFIXES))
                  if prefixes else st.sampled_from(PREFIXES))
    path = prefix + "/".join(draw(st.lists(SEGMENT, max_size=3)))
    method = draw(st.one_of(
        st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "REPORT",
                         "CANCELUPLOAD", "PROPFIND"]),
        st.sampled_from(["POST", "PUT", "PATCH"]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8)
        .map(str.upper),
    ))
    name_strategy = st.one_of(st.sampled_from(names), st.sampled_from(names), FIELD_NAME) \
        if names else FIELD_NAME
    chosen = draw(st.lists(name_strategy, max_size=8))
    fields = tuple((name, draw(VALUES.get(name.lower(), ORDINARY_VALUE))) for name in chosen)
    return Request(method, path, draw(QUERY), fields, draw(BODY_LENGTH), None, draw(ORIGINS))


def parse_all(setup_: Setup, protocol: Protocol, request: Request, report_body: bytes) -> None:
    """Parse as the addon does (a NeedBody is asked again with the body) and check it."""
    owner = owner_of(request)
    command = protocol.parse(request, owner)
    if isinstance(command, c.NeedBody):
        request = replace(request, body=report_body[: command.limit])
        command = protocol.parse(request, owner)
    check_command(setup_, protocol, request, owner, command)


# --- shim/addon.py: who owns an upload ------------------------------------------------------


@budget(100)
@given(value=HOSTILE)
def test_any_credentials_name_an_owner(value: str) -> None:
    """Credentials with bytes that are not UTF-8 (obs-text) are still credentials: the
    owner derived from them must not fail (the addon would answer 500)."""
    ran("shim/addon.py")
    owner = _owner(Request("PATCH", "/files/x", "", (("Authorization", value),), 0), "authorization")
    assert isinstance(owner, str) and (owner != "") == (value != "")


# --- shim/wire.py -------------------------------------------------------------------------------

STRICT_LENGTH = re.compile(r"[ \t]*([0-9]{1,19})[ \t]*")
STRICT_RANGE = re.compile(r"[ \t]*bytes (?:([0-9]+)-([0-9]+)|\*)/(?:([0-9]+)|\*)[ \t]*")
"""RFC 9110 section 14.4 (`bytes SP first-last/complete`, `*` forms), around OWS."""


@budget(400)
@given(value=st.one_of(NUMBER, HOSTILE))
def test_parse_length_takes_exactly_decimal_digits(value: str) -> None:
    """Upload-Offset/Upload-Length: digits (with OWS) or 400; never a surprise number."""
    ran("shim/wire.py")
    strict = STRICT_LENGTH.fullmatch(value)
    try:
        number = parse_length(value, "Upload-Length")
    except ShimError as exc:
        check_error(exc, "parse_length")
        assert strict is None, f"{value!r} is a length, refused: {exc}"
        return
    assert strict is not None, f"{value!r} accepted as {number}: not OWS digits OWS"
    assert number == int(strict.group(1))


@budget(600)
@given(value=st.one_of(CONTENT_RANGE, CONTENT_RANGE, HOSTILE))
def test_parse_content_range_takes_exactly_the_rfc_grammar(value: str) -> None:
    """Strict Content-Range grammar everywhere (decisions: `bytes=0-4/5` is 400)."""
    ran("shim/wire.py")
    strict = STRICT_RANGE.fullmatch(value)
    try:
        parsed = parse_content_range(value)
    except ShimError as exc:
        check_error(exc, "parse_content_range")
        if strict is not None:
            first, last, total = (int(g) if g else None for g in
                                  (strict.group(1), strict.group(2), strict.group(3)))
            unsatisfiable = (first is not None and last is not None and last < first) or \
                (total is not None and last is not None and last >= total)
            too_long = any(g and len(g) > 19 for g in strict.groups())
            assert unsatisfiable or too_long, f"{value!r} is a valid Content-Range, refused: {exc}"
        return
    assert strict is not None, f"{value!r} accepted as {parsed}: not 'bytes first-last/complete'"
    first, last, total = (int(g) if g else None for g in strict.groups())
    assert (parsed.start, parsed.end, parsed.total) == (first, last, total)
    if first is not None and last is not None:
        assert first <= last and (total is None or last < total)


# --- shim/protocols/tus.py: the field parsers -------------------------------------------------

METADATA_KEY = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
                       min_size=1, max_size=10)


@budget(500)
@given(value=st.one_of(METADATA, HOSTILE))
def test_parse_metadata_gives_text_pairs_or_400(value: str) -> None:
    """Upload-Metadata: pairs of key and UTF-8 text, or 400; a client value never raises
    anything but a refusal, and what is stored writes back as the same pairs."""
    ran("shim/protocols/tus.py")
    try:
        metadata = parse_metadata(value)
    except ShimError as exc:
        check_error(exc, "parse_metadata")
        return
    for key, text in metadata.items():
        assert key and not any(ch.isspace() or ch == "," for ch in key), key
        assert isinstance(text, str)
    assert parse_metadata(format_metadata(metadata)) == metadata


@budget(200)
@given(pairs=st.dictionaries(METADATA_KEY, st.text(ANY_CHAR, max_size=20), max_size=5))
def test_metadata_round_trips(pairs: dict[str, str]) -> None:
    ran("shim/protocols/tus.py")
    assert parse_metadata(format_metadata(pairs)) == pairs


@budget(300)
@given(value=st.one_of(CHECKSUM, HOSTILE), name=st.sampled_from(["Upload-Checksum", "upload-checksum"]))
def test_parse_checksum_gives_a_digest_of_the_right_size_or_400(value: str, name: str) -> None:
    ran("shim/protocols/tus.py")
    request = Request("PATCH", "/files/x", "", ((name, value),), 5)
    try:
        checksum = parse_checksum(request)
    except ShimError as exc:
        check_error(exc, "parse_checksum")
        return
    assert checksum is not None
    assert len(checksum.digest) == hashlib.new(checksum.algorithm).digest_size


# --- every protocol's parse ------------------------------------------------------------------

PROTOCOL_MODULES = {
    "tus": "shim/protocols/tus.py", "ietf": "shim/protocols/ietf.py",
    "content-range": "shim/protocols/content_range.py", "byteranges": "shim/protocols/byteranges.py",
    "webdav": "shim/protocols/webdav.py", "seed001": "shim/protocols/seed001.py",
    "tus-target": "shim/protocols/tus_target.py", "guard": "shim/protocols/guard.py",
}


@pytest.mark.parametrize("name", list(PROTOCOL_MODULES))
@budget(500)
@given(data=st.data())
def test_parse_refuses_with_4xx_and_builds_only_safe_targets(name: str, data: st.DataObject) -> None:
    """For each configuration that enables the protocol: no exception escapes `parse`; a
    refusal renders as a 4xx with a message; a creation builds a Target the legacy server
    can be sent and that carries nothing a client may not choose."""
    ran(PROTOCOL_MODULES[name])
    request = data.draw(requests(name), label="request")
    report_body = data.draw(REPORT_BODY, label="body") if request.method == "REPORT" else b""
    for setup_ in SETUPS:
        protocol = setup_.protocol(name)
        if protocol is not None:
            parse_all(setup_, protocol, request, report_body)


# --- routing: the guard is complete, a protocol speaks every upload field it takes ----------

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
SPEAKS: dict[str, frozenset[str]] = {
    "tus": frozenset({"upload-offset", "tus-length"}),
    "ietf": frozenset({"upload-offset", "upload-complete"}),
    "tus-target": frozenset({"upload-offset", "tus-length"}),
    "webdav": frozenset({"content-range"}),
    "seed001": frozenset({"range-query", "expect-range"}),
    "content-range": frozenset({"content-range"}),
    "byteranges": frozenset({"byteranges"}),
}
"""The forms of a partial upload each protocol understands (decisions: the guard's list)."""


def announced(request: Request) -> set[str]:
    """The forms in which a request says it is part of an upload, by the decisions' list."""
    if request.method not in BODY_METHODS:
        return set()
    forms = set()
    if request.header("content-range") is not None:
        forms.add("content-range")
    if request.header("upload-offset") is not None:
        forms.add("upload-offset")
    complete = (request.header("upload-complete") or "").split(";")[0].strip()
    incomplete = (request.header("upload-incomplete") or "").split(";")[0].strip()
    if complete == "?0" or incomplete == "?1":
        forms.add("upload-complete")
    if request.header("tus-resumable") is not None and (
            request.header("upload-length") is not None
            or request.header("upload-defer-length") is not None):
        forms.add("tus-length")
    media = (request.header("content-type") or "").split(";")[0].strip().lower()
    if request.method == "PATCH" and media in ("message/byteranges", "multipart/byteranges"):
        forms.add("byteranges")
    if any(key == "range" and re.fullmatch(r"(?:[0-9]+-[0-9]+|\*)/(?:[0-9]+|\*)", value.strip())
           for key, value in parse_qsl(request.query, keep_blank_values=True)):
        forms.add("range-query")  # seed 001's range=S-E/T; another `range` is the application's
    if "range" in {e.strip().lower() for e in (request.header("expect") or "").split(",")}:
        forms.add("expect-range")
    return forms


def check_routing(setup_: Setup, request: Request) -> None:
    """As the addon routes: the first protocol that claims the request must handle every
    form of partial upload on it, or refuse it, and what it builds passes `check_command`;
    a request no one claims carries no such form (the guard is complete)."""
    owner = owner_of(request)
    claimed = route(setup_.protocols, request, owner)
    forms = announced(request)
    if claimed is None:
        assert not forms, f"{setup_.name}: {sorted(forms)} passed through to the legacy server"
        return
    protocol, command = claimed
    if isinstance(command, WRITES):
        unspoken = forms - SPEAKS.get(protocol.name, frozenset())
        assert not unspoken, (f"{setup_.name}: {protocol.name} took a request with "
                              f"{sorted(unspoken)} it does not speak (as {type(command).__name__})")
    check_command(setup_, protocol, request, owner, command)


def _setup(name: str) -> Setup:
    return next(s for s in SETUPS if s.name == name)


@budget(1000)
@given(request=st.one_of(*(requests(name) for name in FOCUS)),
       setup_name=st.sampled_from([s.name for s in SETUPS]))
def test_a_partial_upload_is_taken_by_a_protocol_that_speaks_it_or_refused(
        request: Request, setup_name: str) -> None:
    ran("shim/protocols/guard.py")
    check_routing(_setup(setup_name), request)


def _tus(*fields: tuple[str, str], metadata: dict[str, str] | None = None) -> Request:
    pairs = [("Tus-Resumable", "1.0.0"), ("Upload-Length", "5"), *fields]
    if metadata is not None:
        pairs.append(("Upload-Metadata", metadata_field(list(metadata.items()))))
    return Request("POST", "/files/", "", tuple(pairs), 0, origin="http://shim.example")


ISSUE_CASES = {
    # "The client picks the legacy path."
    "tus-metadata-id-overrides-{id}": ("open", _tus(metadata={"id": "x"})),
    "tus-dot-dot-user": ("restricted", _tus(metadata={"user": "..", "filename": "etc"})),
    "tus-dot-filename": ("restricted", _tus(metadata={"user": "u", "filename": "."})),
    "tus-encoded-dot-dot": ("id-and-filename", _tus(metadata={"filename": "%2e%2e"})),
    # "Accepted, then undeliverable."
    "tus-filetype-crlf": ("open", _tus(metadata={"filetype": "text/plain\r\nX-Injected: 1"})),
    "tus-filetype-not-a-media-type": ("open", _tus(metadata={"filetype": "t\u00e9xt plain"})),
    "tus-header-crlf": ("open", _tus(("X-Note", "a\r\nb"))),
    "tus-header-nul": ("open", _tus(("X-Note", "a\x00b"))),
    "ietf-header-crlf": ("open", Request("POST", "/up/a", "", (
        ("Upload-Draft-Interop-Version", "8"), ("Upload-Complete", "?1"), ("X-Note", "a\rb")), 5)),
    # "Partial files and protocol fields reach the legacy server."
    "tus-target-with-content-range": ("open", Request("PUT", "/t/a", "", (
        ("Tus-Resumable", "1.0.0"), ("Content-Range", "bytes 10-14/100")), 5)),
    "webdav-with-upload-complete-?0": ("open", Request("PUT", "/dav/a", "", (
        ("Upload-Draft-Interop-Version", "8"), ("Upload-Complete", "?0")), 5)),
    "outside-paths-content-range": ("restricted", Request("PUT", "/elsewhere", "", (
        ("Content-Range", "bytes 0-4/10"),), 5)),
    "outside-paths-tus-fields": ("restricted", Request("POST", "/elsewhere", "", (
        ("Tus-Resumable", "1.0.0"), ("Upload-Length", "10")), 5)),
    "outside-paths-byteranges": ("restricted", Request("PATCH", "/elsewhere", "", (
        ("Content-Type", "message/byteranges"),), 5)),
    "outside-paths-range-query": ("restricted", Request("PUT", "/elsewhere", "range=0-4/10", (), 5)),
    "outside-paths-upload-complete-?0": ("restricted", Request("POST", "/elsewhere", "", (
        ("Upload-Complete", "?0"),), 5)),
    "outside-paths-expect-range": ("restricted", Request("PUT", "/elsewhere", "", (
        ("Expect", "Range"), ("Range", "bytes 0-4/10")), 5)),
    "outside-paths-upload-offset": ("restricted", Request("PATCH", "/elsewhere", "", (
        ("Upload-Offset", "0"),), 5)),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_the_issues_hostile_requests_meet_the_same_properties(case: str) -> None:
    """The hostile requests issue 9 lists, through the routing property above, so that each
    shows as its own line whatever hypothesis happens to draw."""
    setup_name, request = ISSUE_CASES[case]
    check_routing(_setup(setup_name), request)


# --- shim/protocols/byteranges.py: the body decoders ---------------------------------------


@dataclass(frozen=True)
class RangesBody:
    kind: str
    boundary: bytes
    body: bytes
    ranges: tuple[tuple[int, int, int | None, bytes], ...]


@st.composite
def ranges_bodies(draw: st.DrawFn) -> RangesBody:
    """A well-formed message/byteranges or multipart/byteranges body, and what it carries."""
    kind = draw(st.sampled_from(["message", "multipart"]))
    count = 1 if kind == "message" else draw(st.integers(1, 4))
    start = draw(st.integers(0, 5))
    spans = []
    for _ in range(count):
        data = draw(st.binary(min_size=1, max_size=20))
        spans.append((start, data))
        start += len(data) + draw(st.integers(0, 3))
    total = draw(st.one_of(st.none(), st.integers(start, start + 10)))
    padding = draw(st.sampled_from([0, 0, 0, 40, 20_000]))
    boundary = draw(st.sampled_from([b"xyz", b"shim-0123", b"--"]))

    def head(first: int, data: bytes) -> bytes:
        lines = [f"Content-Range: bytes {first}-{first + len(data) - 1}/"
                 f"{'*' if total is None else total}".encode()]
        if padding:
            lines.append(b"X-Pad: " + b"p" * padding)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    if kind == "message":
        body = head(*spans[0]) + spans[0][1]
    else:
        preamble = draw(st.sampled_from([b"", b"ignored\r\n"]))
        parts = [b"--" + boundary + b"\r\n" + head(first, data) + data for first, data in spans]
        body = preamble + b"\r\n".join(parts) + b"\r\n--" + boundary + b"--" + \
            draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue"]))
    ranges = tuple((first, first + len(data) - 1, total, data) for first, data in spans)
    return RangesBody(kind, boundary, body, ranges)


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(p % (len(body) + 1) for p in points), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def decode(kind: str, boundary: bytes, chunks: list[bytes]) -> tuple[str, list[object]]:
    """Feed the chunks; ("ok", ranges and merged data) or ("refused", [])."""
    decoder: c.BodyDecoder = MessageDecoder() if kind == "message" else MultipartDecoder(boundary)
    events: list[object] = []
    try:
        for chunk in chunks:
            for event in decoder.feed(chunk):
                if isinstance(event, bytes) and events and isinstance(events[-1], bytes):
                    events[-1] += event
                else:
                    events.append(event)
        decoder.end()
    except ShimError as exc:
        check_error(exc, f"{kind} decoder")
        return "refused", []
    return "ok", events


@budget(300)
@given(sample=ranges_bodies(), points=st.lists(st.integers(0, 10**6), max_size=6))
def test_a_ranges_body_decodes_the_same_whatever_its_chunks(sample: RangesBody,
                                                             points: list[int]) -> None:
    """Decoding depends on the bytes, never on how TCP cut them."""
    ran("shim/protocols/byteranges.py")
    whole = decode(sample.kind, sample.boundary, [sample.body])
    split = decode(sample.kind, sample.boundary, cut(sample.body, points))
    assert split == whole, "the decoder's verdict depends on where the body was cut"
    if whole[0] == "ok":
        expected: list[object] = []
        for first, last, total, data in sample.ranges:
            expected += [c.RangeStart(_range(first, last, total)), data]
        assert whole[1] == expected


def _range(first: int, last: int, total: int | None) -> Any:
    return parse_content_range(f"bytes {first}-{last}/{'*' if total is None else total}")


@st.composite
def mangled_bodies(draw: st.DrawFn) -> RangesBody:
    """A ranges body with bytes changed, cut or added, or no ranges body at all."""
    sample = draw(ranges_bodies())
    body = bytearray(sample.body)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = draw(st.sampled_from([b"\r\n", b"--", b"\r\n\r\n", b"x", b"\x00",
                                                b"Content-Range: bytes 0-0/1\r\n"]))
    raw = draw(st.one_of(st.just(bytes(body)), st.binary(max_size=200)))
    return replace(sample, body=raw)


@budget(400)
@given(sample=mangled_bodies(), points=st.lists(st.integers(0, 10**6), max_size=6))
def test_any_body_is_decoded_or_refused_with_4xx_whatever_its_chunks(sample: RangesBody,
                                                                      points: list[int]) -> None:
    ran("shim/protocols/byteranges.py")
    whole = decode(sample.kind, sample.boundary, [sample.body])
    split = decode(sample.kind, sample.boundary, cut(sample.body, points))
    assert split == whole, "the decoder's verdict depends on where the body was cut"
    if whole[0] == "ok":
        sizes: list[int] = []
        for event in whole[1]:
            if isinstance(event, c.RangeStart):
                sizes.append(event.range.size)
            else:
                assert isinstance(event, bytes) and sizes
                sizes[-1] -= len(event)
        assert all(size == 0 for size in sizes), "a range's data is not the size it announced"


# --- Engine + LocalStore through Exchange: refusals change nothing, ids make the paths -------

EXCHANGE_RAW: dict[str, Any] = {
    "tus": {"forward": {"path": "/uploads/{id}"}},
    "content_range": {"paths": ["/cr/", "/g/"]},
    "ietf": {"paths": ["/up/"]},
    "tus_target": {"paths": ["/t/"]},
    "byteranges": {"paths": ["/b/"]},
    "seed001": {"query_range": True, "expect_range": True, "paths": ["/s/"]},
    "webdav": {"paths": ["/dav/"]},
}
EXCHANGE_SETUP = setup("exchange", EXCHANGE_RAW)
STORE_ENTRIES = frozenset({"data", "meta", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm",
                           "index.sqlite-journal"})


@dataclass(frozen=True)
class Snap:
    """What a client was told is stored: the record's fields and the bytes up to its offset."""

    state: object
    offset: int
    length: int | None
    digests: tuple[tuple[str, str], ...]
    metadata: tuple[tuple[str, str], ...]
    target: object
    parts: tuple[str, ...]
    answer: object
    data: bytes


@dataclass
class Rig:
    root: Path
    store: LocalStore
    engine: Engine


@contextlib.asynccontextmanager
async def exchange_rig(root: Path) -> AsyncIterator[Rig]:
    """A real store and engine; the outbox never runs and nobody waits for it (wait 0), so a
    complete file stays queued and nothing is delivered."""
    store = LocalStore(root, fsync=False)
    outbox = Outbox(store, Upstream(Origin.parse("http://127.0.0.1:9"), timeout=1.0),
                    DeliveryPolicy(wait=0.0))
    engine = Engine(store, outbox, 0, clock=lambda: 1000.0)
    try:
        yield Rig(root, store, engine)
    finally:
        await outbox.stop()
        await store.close()


async def snapshot(rig: Rig) -> dict[str, Snap]:
    snaps = {}
    for upload_id in sorted(await rig.store.ids()):
        upload = await rig.store.load(upload_id)
        if upload is None:
            continue
        path = rig.root / "data" / upload_id
        data = path.read_bytes()[: upload.offset] if SAFE_ID.fullmatch(upload_id) and \
            path.is_file() else b""
        snaps[upload_id] = Snap(upload.state, upload.offset, upload.length,
                                tuple(sorted(upload.digests.items())),
                                tuple(sorted(upload.metadata.items())), upload.target,
                                upload.parts, upload.answer, data)
    return snaps


@dataclass(frozen=True)
class Step:
    request: Request
    chunks: tuple[bytes, ...]
    must_refuse: str = ""
    """Why the decisions say this request must get a 4xx, if they do."""


@dataclass
class Ctx:
    data: st.DataObject
    snaps: dict[str, Snap]
    ids: list[str]
    """The uploads in the order they were made (ids are random: drawing from a sorted list
    would make the same example pick another upload on a replay)."""

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def chance(self, weight: int = 2) -> bool:
        """True one time in `weight`."""
        return bool(self.draw(st.integers(1, weight)) == 1)

    def auth(self) -> list[tuple[str, str]]:
        who = self.draw(st.sampled_from(["alice", "alice", "alice", "bob", ""]))
        return [("Authorization", f"Bearer {who}")] if who else []

    def body(self, most: int = 24) -> bytes:
        return bytes(self.draw(st.one_of(
            st.lists(st.sampled_from(b"ab"), max_size=most).map(bytes),
            st.binary(max_size=most))))

    def upload_id(self) -> str:
        known = self.ids
        hostile = st.sampled_from(["..", ".", "%2e%2e", "nope", "a" * 24, ".hidden", "meta",
                                   "index.sqlite", "..%2F..%2Fetc"])
        return str(self.draw(st.one_of(st.sampled_from(known), st.sampled_from(known), hostile)
                             if known else hostile))

    def offset(self, upload_id: str | None = None) -> int:
        snap = self.snaps.get(upload_id or "")
        stored = [self.snaps[i].offset for i in self.ids] if snap is None else [snap.offset]
        candidates = [0, *stored, *(n + 1 for n in stored), *(max(0, n - 1) for n in stored)]
        return int(self.draw(st.one_of(st.sampled_from(candidates), SMALL)))

    def extra(self) -> list[tuple[str, str]]:
        """Now and then, fields of another protocol or hostile ones."""
        if not self.chance(3):
            return []
        names = self.draw(st.lists(st.sampled_from(FIELD_NAMES[:22]), min_size=1, max_size=2))
        small = st.text(CHARS, max_size=12)
        return [(name, self.draw(st.one_of(VALUES.get(name.lower(), small), small)
                                 .filter(lambda v: len(v) < 2000))) for name in names]

    def step(self, method: str, path: str, fields: list[tuple[str, str]], body: bytes = b"",
             query: str = "", must_refuse: str = "", chunked: bool | None = None) -> Step:
        if chunked is None:
            chunked = bool(body) and self.chance(4)
        points = self.draw(st.lists(st.integers(0, 64), max_size=3))
        request = Request(method, path, query, tuple(fields), None if chunked else len(body),
                          origin="http://shim.example")
        return Step(request, tuple(cut(body, points)) if body else (), must_refuse)


def _sha256(data: bytes) -> str:
    return b64(hashlib.sha256(data).digest())


def tus_create(x: Ctx) -> Step:
    fields = [*x.auth(), ("Tus-Resumable", x.draw(st.sampled_from(["1.0.0"] * 5 + ["0.2.2"])))]
    shape = x.draw(st.sampled_from(["length", "length", "defer", "partial", "final"]))
    must = ""
    body = x.body() if x.chance() else b""
    if shape == "final" and x.ids:
        parts = x.draw(st.lists(st.sampled_from(x.ids), min_size=1, max_size=3))
        fields.append(("Upload-Concat", "final;" + " ".join(f"/files/{p}" for p in parts)))
        if x.chance(3):
            fields.append(("Upload-Length", str(x.draw(SMALL))))
            must = "a final concatenation with Upload-Length (decisions: 400)"
        if body:
            must = "a final concatenation with a body (decisions: 403)"
    else:
        if shape == "partial":
            fields.append(("Upload-Concat", "partial"))
        if shape == "defer":
            fields.append(("Upload-Defer-Length", "1"))
        else:
            fields.append(("Upload-Length", str(x.draw(st.integers(0, 30)))))
    if x.chance():
        fields.append(("Upload-Metadata", metadata_field(x.draw(st.lists(st.tuples(
            st.sampled_from(["filename", "filetype", "id"]),
            st.one_of(st.none(), st.sampled_from(["a.bin", "text/plain", "..", "x\r\ny"]))),
            max_size=2, unique_by=lambda p: p[0])))))
    if body:
        fields.append(("Content-Type", "application/offset+octet-stream"))
        if x.chance(3):
            fields.append(("Upload-Checksum", f"sha256 {_sha256(body + x.body(2))}"))
    return x.step("POST", "/files/", fields + x.extra(), body, must_refuse=must)


def tus_write(x: Ctx) -> Step:
    upload_id = x.upload_id()
    snap = x.snaps.get(upload_id)
    method = x.draw(st.sampled_from(["PATCH", "PATCH", "PATCH", "HEAD", "DELETE", "OVERRIDE"]))
    fields = [*x.auth(), ("Tus-Resumable", "1.0.0")]
    body = b""
    if method in ("PATCH", "OVERRIDE"):
        body = x.body()
        fields.append(("Content-Type", x.draw(st.sampled_from(
            ["application/offset+octet-stream"] * 4 + ["text/plain"]))))
        fields.append(("Upload-Offset", str(x.offset(upload_id))))
        if x.chance(3):
            known = [snap.length] if snap is not None and snap.length is not None else []
            fields.append(("Upload-Length", str(x.draw(st.one_of(SMALL, st.sampled_from(
                known or [0]))))))
        if body and x.chance(3):
            fields.append(("Upload-Checksum", f"sha256 {_sha256(body + x.body(2))}"))
    if method == "OVERRIDE":
        fields.append(("X-HTTP-Method-Override", x.draw(st.sampled_from(["PATCH", "DELETE"]))))
        method = "POST"
    return x.step(method, f"/files/{upload_id}", fields + x.extra(), body)


def ietf_create(x: Ctx) -> Step:
    version = x.draw(st.sampled_from([8, 8, 7, 6, 5, 3]))
    complete = x.chance(3)
    completeness = ("Upload-Incomplete", "?0" if complete else "?1") if version == 3 \
        else ("Upload-Complete", "?1" if complete else "?0")
    body = x.body()
    fields = [*x.auth(), ("Upload-Draft-Interop-Version", str(version)), completeness]
    if x.chance(3):
        fields.append(("Upload-Length", str(len(body) + x.draw(st.integers(0, 10)))))
    if x.chance(3):
        fields.append(("Repr-Digest", f"sha-256=:{_sha256(body + x.body(4))}:"))
    if body and x.chance(4):
        fields.append(("Content-Digest", f"sha-256=:{_sha256(body + x.body(1))}:"))
    method = x.draw(st.sampled_from(["POST", "PUT"]))
    return x.step(method, x.draw(st.sampled_from(["/up/a", "/up/b"])), fields + x.extra(), body)


def ietf_write(x: Ctx) -> Step:
    upload_id = x.upload_id()
    method = x.draw(st.sampled_from(["PATCH", "PATCH", "PATCH", "HEAD", "DELETE"]))
    version = x.draw(st.sampled_from([8, 8, 7, 6, 5, 3]))
    fields = [*x.auth(), ("Upload-Draft-Interop-Version", str(version))]
    body = b""
    if method == "PATCH":
        body = x.body()
        complete = x.chance(3)
        fields.append(("Upload-Incomplete", "?0" if complete else "?1") if version == 3
                      else ("Upload-Complete", "?1" if complete else "?0"))
        fields.append(("Upload-Offset", str(x.offset(upload_id))))
        if version >= 6:
            fields.append(("Content-Type", "application/partial-upload"))
        if x.chance(3):
            fields.append(("Upload-Length", str(x.offset(upload_id) + len(body))))
        if x.chance(3):
            fields.append(("Repr-Digest", f"sha-256=:{_sha256(x.body(8))}:"))
        if body and x.chance(4):
            fields.append(("Content-Digest", f"sha-256=:{_sha256(body + x.body(1))}:"))
    return x.step(method, f"/.well-known/resumable-uploads/{upload_id}", fields + x.extra(), body)


def _chunk_range(x: Ctx, body: bytes) -> tuple[str, str]:
    """A Content-Range for a chunk near what is stored, and why it must be refused (if so)."""
    if not body:
        return f"bytes */{x.draw(st.one_of(st.just('*'), SMALL.map(str)))}", ""
    start = x.offset()
    size = x.draw(st.integers(1, 30)) if x.chance(4) else len(body)
    end = start + size - 1
    total = x.draw(st.one_of(st.just("*"), st.integers(end + 1, end + 12).map(str),
                             st.just(str(end + 1))))
    must = f"a body of {len(body)} bytes under Content-Range of {size}" if size != len(body) else ""
    return f"bytes {start}-{end}/{total}", must


def cr_put(x: Ctx) -> Step:
    body = b"" if x.chance(5) else x.body()
    content_range, must = _chunk_range(x, body)
    fields = [*x.auth(), ("Content-Range", content_range)]
    method = x.draw(st.sampled_from(["PUT", "PUT", "POST"]))
    return x.step(method, x.draw(st.sampled_from(["/cr/a", "/cr/b"])), fields + x.extra(), body,
                  must_refuse=must, chunked=bool(must) or None)


def session(x: Ctx) -> Step:
    if x.chance(3):
        fields = [*x.auth()]
        if x.chance():
            fields.append(("X-Upload-Content-Length", str(x.draw(st.integers(0, 30)))))
        return x.step("POST", "/g/a", fields + x.extra(), query="uploadType=resumable")
    query = f"uploadType=resumable&upload_id={x.upload_id()}"
    if x.chance(5):
        return x.step("DELETE", "/g/a", x.auth(), query=query)
    body = b"" if x.chance(5) else x.body()
    content_range, must = _chunk_range(x, body)
    return x.step("PUT", "/g/a", [("Content-Range", content_range), *x.extra()], body,
                  query=query, must_refuse=must, chunked=bool(must) or None)


def tus_target(x: Ctx) -> Step:
    method = x.draw(st.sampled_from(["PUT", "PUT", "PATCH", "PATCH", "HEAD", "DELETE"]))
    fields = [*x.auth(), ("Tus-Resumable", "1.0.0")]
    body = x.body() if method in ("PUT", "PATCH") else b""
    if method == "PUT" and x.chance():
        fields.append(("Upload-Length", str(len(body) + x.draw(st.integers(0, 10)))))
    if method == "PATCH":
        fields += [("Content-Type", "application/offset+octet-stream"),
                   ("Upload-Offset", str(x.offset()))]
    return x.step(method, x.draw(st.sampled_from(["/t/a", "/t/b"])), fields + x.extra(), body)


def byteranges_patch(x: Ctx) -> Step:
    if x.chance(6):
        return x.step("HEAD", "/b/a", x.auth())
    sample = x.draw(ranges_bodies())
    start = x.offset()
    shifted = []
    body = sample.body
    for first, last, total, _ in sample.ranges:  # move the ranges to near what is stored
        new_total = "*" if total is None else str(total + start)
        old = f"bytes {first}-{last}/{'*' if total is None else total}".encode()
        body = body.replace(old, f"bytes {first + start}-{last + start}/{new_total}".encode(), 1)
        shifted.append(first)
    if sample.kind == "message":
        content_type = "message/byteranges"
    else:
        content_type = f"multipart/byteranges; boundary={sample.boundary.decode()}"
    fields = [*x.auth(), ("Content-Type", content_type)]
    if x.chance(4):
        fields.append(("If-None-Match", "*"))
    if x.chance(4):
        body = body[: x.draw(st.integers(0, len(body)))]
    return x.step("PATCH", "/b/a", fields + x.extra(), body)


def webdav(x: Ctx) -> Step:
    method = x.draw(st.sampled_from(["PUT", "PUT", "PUT", "CANCELUPLOAD", "REPORT"]))
    path = x.draw(st.sampled_from(["/dav/a", "/dav/b"]))
    if method == "REPORT":
        return x.step("REPORT", "/dav/", x.auth(),
                      b'<?xml version="1.0"?><i:upload-progress xmlns:i="ithit"/>', chunked=False)
    if method == "CANCELUPLOAD":
        return x.step(method, path, x.auth())
    body = x.body()
    fields = x.auth()
    must = ""
    if x.chance():
        content_range, must = _chunk_range(x, body)
        fields.append(("Content-Range", content_range))
    return x.step("PUT", path, fields + x.extra(), body, must_refuse=must,
                  chunked=bool(must) or None)


def seed001(x: Ctx) -> Step:
    body = x.body()
    content_range, must = _chunk_range(x, body)
    fields = x.auth()
    if x.chance():
        return x.step("PUT", "/s/a", fields + x.extra(), body, must_refuse=must,
                      query="range=" + content_range.removeprefix("bytes "),
                      chunked=bool(must) or None)
    fields += [("Expect", "Range"), ("Range", content_range)]
    return x.step("PUT", "/s/a", fields + x.extra(), body, must_refuse=must,
                  chunked=bool(must) or None)


FAMILIES: dict[str, tuple[Callable[[Ctx], Step], ...]] = {
    "tus": (tus_create, tus_write),
    "ietf": (ietf_create, ietf_write),
    "content-range": (cr_put,),
    "session": (session,),
    "tus-target": (tus_target,),
    "byteranges": (byteranges_patch,),
    "webdav": (webdav,),
    "seed001": (seed001,),
}
ALL_KINDS = tuple(kind for kinds in FAMILIES.values() for kind in kinds)


async def perform(rig: Rig, step: Step) -> tuple[Reply | None, c.Command | None]:
    """One request as the addon handles it: the first protocol that claims it, its Exchange
    begun, fed the body chunk by chunk and finished; no reply when it passes through."""
    request = step.request
    owner = owner_of(request)
    for protocol in EXCHANGE_SETUP.protocols:
        command = protocol.parse(request, owner)
        if command is None:
            continue
        if isinstance(command, c.NeedBody):  # the addon buffers the small body and asks again
            request = replace(request, body=b"".join(step.chunks)[: command.limit])
            command = protocol.parse(request, owner)
            if command is None or isinstance(command, c.NeedBody):
                return None, command
        exchange = Exchange(rig.engine, protocol, request, command)
        if request.has_body and not isinstance(command, c.Forward | c.NeedBody):
            exchange.start(lambda: None)
        else:
            await exchange.begin()
            if exchange.declined:
                return None, command
        for chunk in step.chunks:
            exchange.feed(chunk)
        return await exchange.finish(), command
    return None, None


def _terminated_by_digest(before: dict[str, Snap], after: dict[str, Snap], reply: Reply) -> bool:
    """The one change a 4xx may bring: a file found complete whose bytes do not match the
    Repr-Digest announced for it is ended (RFC 9530), never delivered."""
    changed = {i for i in before.keys() | after.keys() if before.get(i) != after.get(i)}
    return reply.status == 400 and b"digest" in reply.body and all(
        i in after and after[i].state is State.TERMINATED for i in changed)


def _announced_creation(before: dict[str, Snap], after: dict[str, Snap],
                        command: c.Command | None) -> bool:
    """IETF: the 104 told the client where its upload is before the body was refused; the
    upload stays, with none of the refused bytes."""
    if not isinstance(command, c.Open) or command.interim is None:
        return False
    made = command.new.id
    return after.keys() - before.keys() == {made} and after[made].offset == 0 and \
        all(after.get(i) == snap for i, snap in before.items())


def check_layout(root: Path) -> None:
    """Nothing outside storage.dir; under it, data files named by the shim's ids only."""
    assert [p.name for p in root.parent.iterdir()] == [root.name], "a file outside storage.dir"
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        assert parts[0] in STORE_ENTRIES, f"{path} is not where the store keeps anything"
        if parts[0] == "data" and len(parts) > 1:
            assert len(parts) == 2 and SAFE_ID.fullmatch(parts[1]) and path.is_file(), \
                f"data file {path.relative_to(root)} is not named by an upload id"


def describe(step: Step) -> str:
    """A request as a person reads it: method, target, fields, body and how it arrived."""
    request = step.request
    fields = ", ".join(f"{key}: {value[:80]!r}" for key, value in request.fields)
    framing = "chunked" if request.body_length is None else f"Content-Length {request.body_length}"
    body = b"".join(step.chunks)
    return (f"{request.method} {request.target} [{fields}] body {body[:48]!r} ({framing}, "
            f"chunks of {[len(chunk) for chunk in step.chunks]})")


async def play(rig: Rig, step: Step, what: str, history: list[str]) -> None:
    """One request through the addon's path, and the properties of what it did."""

    def expect(condition: bool, message: str) -> None:
        if not condition:
            pytest.fail("\n".join([message, "requests, in order:", *history]), pytrace=False)

    before = await snapshot(rig)
    reply, command = await perform(rig, step)
    after = await snapshot(rig)
    answer = "passed through" if reply is None else f"{reply.status} {reply.body[:100]!r}"
    history.append(f"  {what}: {describe(step)} -> {answer}")
    if reply is None:
        expect(after == before, f"{what} passed through but changed what is stored: "
               f"{_diff(before, after)}")
        return
    check_reply(reply, what)
    if reply.status == 499 and step.request.method == "DELETE":
        pass  # Google's answer to a cancelled session: the DELETE succeeded
    elif 400 <= reply.status <= 499:
        expect(bool(reply.body.strip()), f"{what}: {reply.status} without a message")
        expect(after == before or _terminated_by_digest(before, after, reply)
               or _announced_creation(before, after, command),
               f"{what} was refused with {reply.status} but changed what is stored: "
               f"{_diff(before, after)}")
    if step.must_refuse:
        expect(400 <= reply.status <= 499, f"{what}: {step.must_refuse}, answered {reply.status}")


async def run_sequence(root: Path, family: str, data: st.DataObject) -> None:
    own = FAMILIES[family]
    history: list[str] = []
    async with exchange_rig(root) as rig:
        known: list[str] = []
        for index in range(data.draw(st.integers(2, 7), label="steps")):
            current = await snapshot(rig)
            known += sorted(current.keys() - set(known))
            ctx = Ctx(data, current, [i for i in known if i in current])
            kind = own[0] if index == 0 else data.draw(
                st.one_of(st.sampled_from(own), st.sampled_from(own), st.sampled_from(ALL_KINDS)))
            await play(rig, kind(ctx), f"step {index}", history)
        check_layout(root)


def _diff(before: dict[str, Snap], after: dict[str, Snap]) -> str:
    lines = []
    for upload_id in sorted(before.keys() | after.keys()):
        old, new = before.get(upload_id), after.get(upload_id)
        if old == new:
            continue
        if old is None or new is None:
            lines.append(f"{upload_id}: {'created' if old is None else 'removed'}")
            continue
        fields = [name for name in Snap.__dataclass_fields__ if getattr(old, name) != getattr(new, name)]
        lines.append(f"{upload_id}: " + ", ".join(
            f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}" for name in fields))
    return "; ".join(lines)


@pytest.mark.parametrize("family", list(FAMILIES))
@budget(40)
@given(data=st.data())
def test_a_refused_request_changes_nothing_stored_and_ids_alone_name_files(
        family: str, data: st.DataObject) -> None:
    """Sequences of requests of one protocol family (with now and then another's, and
    hostile fields) on a real Engine and LocalStore: a 4xx or a pass-through leaves every
    record and every acknowledged byte as it was; a request the decisions say must be refused
    is; no file appears outside storage.dir/data/, none named by a client value."""
    ran("shim/exchange.py")
    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(run_sequence(Path(scratch) / "store", family, data))


# --- the refusals issue 9 lists, as fixed sequences ---------------------------------------------

TUS = ("Tus-Resumable", "1.0.0")
CHUNK = ("Content-Type", "application/offset+octet-stream")
IETF = ("Upload-Draft-Interop-Version", "8")
PARTIAL = ("Content-Type", "application/partial-upload")
ALICE = ("Authorization", "Bearer alice")


def fixed(method: str, path: str, fields: list[tuple[str, str]], body: bytes = b"", *,
          query: str = "", chunked: bool = False, must_refuse: str = "") -> Step:
    request = Request(method, path, query, (ALICE, *fields), None if chunked else len(body),
                      origin="http://shim.example")
    return Step(request, (body,) if body else (), must_refuse)


Script = list[Callable[[list[str]], Step]]
"""Each step made from the ids of the uploads made so far, in order."""
ISSUE_SEQUENCES: dict[str, Script] = {
    "tus-409-keeps-a-deferred-length-deferred": [
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Defer-Length", "1")]),
        lambda ids: fixed("PATCH", f"/files/{ids[0]}", [TUS, CHUNK, ("Upload-Offset", "3"),
                                                        ("Upload-Length", "10")], b"abc"),
    ],
    "ietf-409-neither-fixes-the-length-nor-truncates": [
        lambda ids: fixed("POST", "/up/a", [IETF, ("Upload-Complete", "?0")], b"hello"),
        lambda ids: fixed("PATCH", f"/.well-known/resumable-uploads/{ids[0]}",
                          [IETF, PARTIAL, ("Upload-Offset", "2"), ("Upload-Complete", "?1")], b"xyz"),
    ],
    "ietf-409-keeps-no-repr-digest": [
        lambda ids: fixed("POST", "/up/a", [IETF, ("Upload-Complete", "?0")], b"hello"),
        lambda ids: fixed("PATCH", f"/.well-known/resumable-uploads/{ids[0]}",
                          [IETF, PARTIAL, ("Upload-Offset", "4"), ("Upload-Complete", "?0"),
                           ("Repr-Digest", f"sha-256=:{b64(bytes(32))}:")], b"xyz"),
        lambda ids: fixed("PATCH", f"/.well-known/resumable-uploads/{ids[0]}",
                          [IETF, PARTIAL, ("Upload-Offset", "5"), ("Upload-Complete", "?1")], b"!"),
    ],
    "ietf-refused-chunk-keeps-no-repr-digest": [
        lambda ids: fixed("POST", "/up/a", [IETF, ("Upload-Complete", "?0")], b"hello"),
        lambda ids: fixed("PATCH", f"/.well-known/resumable-uploads/{ids[0]}",
                          [IETF, PARTIAL, ("Upload-Offset", "5"), ("Upload-Complete", "?0"),
                           ("Content-Digest", f"sha-256=:{b64(bytes(32))}:"),
                           ("Repr-Digest", f"sha-256=:{b64(bytes(32))}:")], b"xyz"),
        lambda ids: fixed("PATCH", f"/.well-known/resumable-uploads/{ids[0]}",
                          [IETF, PARTIAL, ("Upload-Offset", "5"), ("Upload-Complete", "?1")], b"!"),
    ],
    "chunked-body-longer-than-its-content-range": [
        lambda ids: fixed("PUT", "/cr/a", [("Content-Range", "bytes 0-1/10")], b"abcd",
                          chunked=True, must_refuse="a body longer than its Content-Range (400)"),
    ],
    "chunked-body-longer-than-its-range-query": [
        lambda ids: fixed("PUT", "/s/a", [], b"abcd", query="range=0-1/10", chunked=True,
                          must_refuse="a body longer than its range= (400)"),
    ],
    "tus-final-concatenation-with-a-body": [
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Concat", "partial"),
                                              ("Upload-Length", "1"), CHUNK], b"a"),
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Concat", f"final;/files/{ids[0]}"),
                                              CHUNK], b"b", must_refuse="final with a body (403)"),
    ],
    "tus-final-concatenation-with-upload-length": [
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Concat", "partial"),
                                              ("Upload-Length", "1")]),
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Concat", f"final;/files/{ids[0]}"),
                                              ("Upload-Length", "1")],
                          must_refuse="final with Upload-Length (400)"),
    ],
    "a-session-uri-does-not-reach-a-tus-upload": [
        lambda ids: Step(Request("POST", "/files/", "", (TUS, ("Upload-Length", "6")), 0), ()),
        lambda ids: Step(Request("PUT", "/g/a", f"uploadType=resumable&upload_id={ids[0]}",
                                 (("Content-Range", "bytes 0-2/6"),), 3), (b"abc",),
                         "another protocol's upload answers as a missing one (404)"),
    ],
    "tus-creation-with-a-body-past-its-length": [
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Length", "2"), CHUNK], b"abcd"),
    ],
    "tus-creation-with-a-wrong-checksum": [
        lambda ids: fixed("POST", "/files/", [TUS, ("Upload-Length", "4"), CHUNK,
                                              ("Upload-Checksum", f"sha1 {b64(bytes(20))}")], b"abcd"),
    ],
}


@pytest.mark.parametrize("case", list(ISSUE_SEQUENCES))
def test_the_issues_refusals_change_nothing(case: str, tmp_path: Path) -> None:
    """The state changes on refusal that issue 9 lists, and the tus conformance refusals, as
    fixed sequences through the same properties as the generated ones."""
    async def scenario() -> None:
        history: list[str] = []
        async with exchange_rig(tmp_path / "store") as rig:
            made: list[str] = []
            for index, make in enumerate(ISSUE_SEQUENCES[case]):
                current = await snapshot(rig)
                made += sorted(current.keys() - set(made))
                await play(rig, make(made), f"step {index}", history)
            check_layout(tmp_path / "store")

    asyncio.run(scenario())
