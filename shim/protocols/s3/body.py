"""Request bodies as the S3 tools send them, decoded and checked as they stream in.

- `AwsChunkedDecoder`: `Content-Encoding: aws-chunked` (Amazon S3 API Reference,
  "Signature Calculations for the Authorization Header: Transferring Payload in Multiple
  Chunks", "Defining the Chunk Body"; "Signature calculations for trailing headers"), which
  recent boto3, the AWS CLI and the Go and Java SDKs send: each chunk is
  `<hex size>[;chunk-signature=<64 hex>]\\r\\n<data>\\r\\n`, a chunk of size 0 ends the data,
  then trailer lines `name:value\\r\\n` (a checksum, and `x-amz-trailer-signature` when the
  trailer is signed) and a last `\\r\\n`.
- `BodyDigests`: what the request's fields say about the payload (`Content-MD5`,
  `x-amz-content-sha256`, `x-amz-checksum-*` in a field or a trailer, "Checking object
  integrity" in the Amazon S3 User Guide), checked, and the payload's MD5 (its ETag).

Memory stays constant: neither holds the body, only a line of at most `MAX_LINE` bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zlib
from collections.abc import Buffer, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import google_crc32c

from shim.errors import ShimError
from shim.protocols.s3.sigv4 import EMPTY_SHA256, PAYLOAD_KEYWORDS, ChunkSigner

MAX_LINE: Final = 4096
"""The longest chunk-size or trailer line read (a size line is about 90 bytes)."""
MAX_SIZE_DIGITS: Final = 16
MAX_TRAILERS: Final = 16
DEFAULT_MAX_CHUNK: Final = 64 * 1024 * 1024
"""The largest chunk taken: SDKs send 64 KiB to 1 MiB chunks, 8 MiB at most."""
TRAILER_SIGNATURE: Final = "x-amz-trailer-signature"

_HEX64 = re.compile(rb"[0-9a-f]{64}")
_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{1,%d}" % MAX_SIZE_DIGITS)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2


class _State:
    SIZE = "size"
    DATA = "data"
    DATA_END = "data-end"
    TRAILER = "trailer"
    LATE_TRAILER = "late-trailer"
    END_OR_TRAILER = "end-or-trailer"
    DONE = "done"


class AwsChunkedDecoder:
    """Decodes an aws-chunked body fed in pieces of any size; verifies chunk signatures with
    a `ChunkSigner`, and the decoded length against `decoded_length`
    (`x-amz-decoded-content-length`).

    The bytes `feed` returns are the payload as far as it has come; they are trustworthy only
    once `end` returns: a chunk's signature is checked when its last byte has arrived, and
    the trailer's at the end."""

    def __init__(self, signer: ChunkSigner | None = None, decoded_length: int | None = None, *,
                 max_chunk: int = DEFAULT_MAX_CHUNK) -> None:
        self.signer = signer
        self.decoded_length = decoded_length
        self.max_chunk = max_chunk
        self.decoded = 0
        """Payload bytes decoded so far."""
        self._state = _State.SIZE
        self._line = bytearray()
        self._remaining = 0
        self._chunk_signature = b""
        self._chunk_hash: _ChunkHash | None = None
        self._trailers: list[tuple[str, str]] = []

    def feed(self, data: bytes) -> bytes:
        """Decode the next piece of the body; return the payload bytes it completes."""
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._state == _State.DATA:
                position = self._data(view, position, out)
            elif self._state == _State.DONE:
                raise ShimError("InvalidRequest", "The aws-chunked body goes on after its end.",
                                400)
            else:
                position = self._line_part(data, position)
        return b"".join(out)

    def end(self) -> dict[str, str]:
        """The body is over: check it was complete; return its trailers by lower-case name
        (without `x-amz-trailer-signature`, which is checked here)."""
        # The last CRLF may be missing: the payload and any trailer are whole without it.
        complete = self._state == _State.DONE or (
            self._state in (_State.TRAILER, _State.END_OR_TRAILER, _State.LATE_TRAILER)
            and not self._line)
        if not complete:
            raise ShimError("IncompleteBody", "The aws-chunked body ended inside a chunk.", 400)
        if self.decoded_length is not None and self.decoded != self.decoded_length:
            raise ShimError("IncompleteBody", f"The body carries {self.decoded} bytes, "
                            f"x-amz-decoded-content-length said {self.decoded_length}.", 400)
        self._state = _State.DONE
        return self._checked_trailers()

    # --- the pieces of the body -------------------------------------------------------------

    def _data(self, view: memoryview, position: int, out: list[bytes | memoryview]) -> int:
        piece = view[position:position + self._remaining]
        out.append(piece)
        if self._chunk_hash is not None:
            self._chunk_hash.update(piece)
        self._remaining -= len(piece)
        if self._remaining == 0:
            self._chunk_done(last=False)
        return position + len(piece)

    def _line_part(self, data: bytes, position: int) -> int:
        """Gather a line up to its LF; act on it when it is whole."""
        window = position + MAX_LINE + 1 - len(self._line)
        newline = data.find(b"\n", position, window)
        end = min(len(data), window) if newline < 0 else newline + 1
        self._line += data[position:end]
        if newline < 0:
            if len(self._line) > MAX_LINE:
                raise self._line_error("is longer than 4 KiB")
            return end
        line = bytes(self._line)
        self._line.clear()
        if not line.endswith(b"\r\n"):
            raise self._line_error("does not end in CRLF")
        self._on_line(line[:-2])
        return end

    def _on_line(self, line: bytes) -> None:
        if self._state == _State.SIZE:
            self._size_line(line)
        elif self._state == _State.DATA_END:
            if line:
                raise ShimError("InvalidChunkSizeError", "A chunk carries more data than its "
                                "size.", 400)
            self._state = _State.SIZE
        elif line:
            self._trailer_line(line)
        else:
            self._trailers_end()

    def _size_line(self, line: bytes) -> None:
        size_text, _, extensions = line.partition(b";")
        if not _HEX_SIZE.fullmatch(size_text):
            raise ShimError("InvalidChunkSizeError", f"The chunk size {size_text[:32]!r} is not "
                            f"1 to {MAX_SIZE_DIGITS} hexadecimal digits.", 400)
        size = int(size_text, 16)
        if size > self.max_chunk:
            raise ShimError("InvalidChunkSizeError", f"A chunk of {size} bytes is larger than "
                            f"{self.max_chunk}.", 400)
        if self.decoded_length is not None and self.decoded + size > self.decoded_length:
            raise ShimError("InvalidRequest", "The aws-chunked body is longer than "
                            f"x-amz-decoded-content-length ({self.decoded_length}).", 400)
        self._chunk_signature = _chunk_signature(extensions, self.signer is not None)
        self.decoded += size
        self._remaining = size
        if size == 0:
            self._chunk_done(last=True)
            return
        self._chunk_hash = hashlib.sha256() if self.signer is not None else None
        self._state = _State.DATA

    def _chunk_done(self, last: bool) -> None:
        """A chunk's data is all in: its signature can be checked. The last chunk (size 0)
        is signed too, over the empty string's hash."""
        if self.signer is not None:
            digest = self._chunk_hash.hexdigest() if self._chunk_hash is not None else EMPTY_SHA256
            self.signer.verify_chunk(digest, self._chunk_signature.decode("ascii"))
        self._chunk_hash = None
        self._state = _State.TRAILER if last else _State.DATA_END

    def _trailer_line(self, line: bytes) -> None:
        if self._state == _State.END_OR_TRAILER:
            self._state = _State.LATE_TRAILER
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not value.isascii():
            raise ShimError("MalformedTrailerError", "A trailer line is not name:value.", 400)
        lower = name.decode("ascii").lower()
        if any(lower == seen for seen, _ in self._trailers) or len(self._trailers) >= MAX_TRAILERS:
            raise ShimError("MalformedTrailerError", f"Too many trailers, or {lower} twice.", 400)
        self._trailers.append((lower, value.decode("ascii").strip()))

    def _trailers_end(self) -> None:
        """The empty line after the trailers ends the body. One right after the last chunk,
        with no trailer yet, may also be followed by trailer lines up to the end of the body:
        some encoders write `0;chunk-signature=...\\r\\n\\r\\n` and the trailer after it."""
        self._state = (_State.END_OR_TRAILER if self._state == _State.TRAILER and not self._trailers
                       else _State.DONE)

    def _checked_trailers(self) -> dict[str, str]:
        """The trailers, the signed ones verified (`ChunkSigner.verify_trailer`)."""
        fields = [(name, value) for name, value in self._trailers if name != TRAILER_SIGNATURE]
        signature = next((v for n, v in self._trailers if n == TRAILER_SIGNATURE), None)
        if self.signer is not None and self.signer.trailer_signed:
            if signature is None:
                raise ShimError("SignatureDoesNotMatch", "The signed trailer carries no "
                                "x-amz-trailer-signature.", 403)
            self.signer.verify_trailer(fields, signature)
        elif self.signer is not None and self._trailers:
            # The trailer signature covers them only with the -TRAILER payload: trailing
            # fields after signed chunks without it would be unsigned additions.
            raise ShimError("MalformedTrailerError", "Trailers need the "
                            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER payload.", 400)
        return dict(fields)

    def _line_error(self, problem: str) -> ShimError:
        if self._state in (_State.SIZE, _State.DATA_END):
            return ShimError("InvalidChunkSizeError", f"A chunk-size line {problem}.", 400)
        return ShimError("MalformedTrailerError", f"A trailer line {problem}.", 400)


def _chunk_signature(extensions: bytes, required: bool) -> bytes:
    """The `chunk-signature` extension of a size line (other extensions are ignored)."""
    signature = b""
    for extension in extensions.split(b";") if extensions else []:
        name, _, value = extension.partition(b"=")
        if name.strip() == b"chunk-signature":
            signature = value.strip()
    if required and not _HEX64.fullmatch(signature):
        raise ShimError("SignatureDoesNotMatch", "A chunk carries no valid chunk-signature.", 403)
    return signature


# --- the payload's digests ------------------------------------------------------------------


class _ChunkHash(Protocol):
    """hashlib's SHA-256, fed views of the body without copies."""

    def update(self, data: Buffer, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32:
    """zlib's CRC-32, big-endian, as S3's x-amz-checksum-crc32."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class _Crc32c:
    """CRC-32C (Castagnoli), big-endian, as S3's x-amz-checksum-crc32c."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = google_crc32c.extend(self.value, data)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


@dataclass(frozen=True)
class _Algorithm:
    label: str
    """As S3's messages name it (CRC32, SHA256, ...)."""
    size: int
    """Digest size in bytes."""
    make: Callable[[], _Hasher] | None
    """None: the shim cannot compute it (see VERIFIED below)."""


_ALGORITHMS: Final[dict[str, _Algorithm]] = {
    "crc32": _Algorithm("CRC32", 4, _Crc32),
    "crc32c": _Algorithm("CRC32C", 4, _Crc32c),
    "sha1": _Algorithm("SHA1", 20, hashlib.sha1),
    "sha256": _Algorithm("SHA256", 32, hashlib.sha256),
    "sha512": _Algorithm("SHA512", 64, hashlib.sha512),
    "md5": _Algorithm("MD5", 16, hashlib.md5),
    # CRC-64/NVME and the XXHASH family need awscrt (botocore[crt]), which the shim does not
    # carry: they are accepted and NOT verified. S3 still checks them on AWS; here the MD5
    # (ETag) and, when sent, Content-MD5 or x-amz-content-sha256 remain.
    "crc64nvme": _Algorithm("CRC64NVME", 8, None),
    "xxhash64": _Algorithm("XXHASH64", 8, None),
    "xxhash3": _Algorithm("XXHASH3", 8, None),
    "xxhash128": _Algorithm("XXHASH128", 16, None),
}
CHECKSUM_PREFIX: Final = "x-amz-checksum-"


@dataclass
class _Check:
    """One announced digest: its algorithm, and its expected value unless it comes in a
    trailer (`field` names the field or trailer)."""

    name: str
    field: str
    expected: bytes | None


@dataclass
class BodyDigests:
    """Checks a payload against the digests its request announced, and computes its MD5.

    `update` with the (decoded) payload, then `end` with the body's trailers; `end` returns
    the MD5 in hex, the part's ETag."""

    md5_expected: bytes | None = None
    sha256_expected: str | None = None
    checks: list[_Check] = field(default_factory=list)
    size: int = 0
    _hashers: dict[str, _Hasher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._hashers["md5"] = hashlib.md5()
        if self.sha256_expected is not None:
            self._hashers["sha256"] = hashlib.sha256()
        for check in self.checks:
            make = _ALGORITHMS[check.name].make
            if make is not None and check.name not in self._hashers:
                self._hashers[check.name] = make()

    @classmethod
    def from_fields(cls, fields: Sequence[tuple[str, str]], trailers_expected: bool) -> BodyDigests:
        """What the request's fields announce. `trailers_expected`: the body is aws-chunked,
        so a checksum may come as a trailer (`x-amz-trailer`)."""
        return cls(_content_md5(fields), _content_sha256(fields),
                   _checksum_checks(fields, trailers_expected))

    def update(self, data: bytes) -> None:
        self.size += len(data)
        for hasher in self._hashers.values():
            hasher.update(data)

    def end(self, trailers: Mapping[str, str] | None = None) -> str:
        """Check every announced digest; return the payload's MD5 (hex)."""
        md5 = self._hashers["md5"].digest()
        if self.md5_expected is not None and not hmac.compare_digest(md5, self.md5_expected):
            raise ShimError("BadDigest", "The Content-MD5 you specified did not match what we "
                            "received.", 400)
        if self.sha256_expected is not None and \
                self._hashers["sha256"].digest().hex() != self.sha256_expected:
            raise ShimError("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' "
                            "header does not match what was computed.", 400)
        for check in self.checks:
            self._verify(check, trailers or {})
        return md5.hex()

    def checksums(self) -> dict[str, str]:
        """The checksums computed, as x-amz-checksum-* field values (base64), after `end`."""
        return {CHECKSUM_PREFIX + name: base64.b64encode(hasher.digest()).decode("ascii")
                for name, hasher in self._hashers.items()
                if any(check.name == name for check in self.checks)}

    def _verify(self, check: _Check, trailers: Mapping[str, str]) -> None:
        expected = check.expected
        if expected is None:
            value = trailers.get(check.field)
            if value is None:
                raise ShimError("InvalidRequest", f"The trailer {check.field} announced by "
                                "x-amz-trailer is missing.", 400)
            expected = _checksum_value(check.name, value)
        hasher = self._hashers.get(check.name)
        if hasher is not None and not hmac.compare_digest(hasher.digest(), expected):
            label = _ALGORITHMS[check.name].label
            raise ShimError("BadDigest", f"The {label} you specified did not match the "
                            "calculated checksum.", 400)


def _values(fields: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [value.strip() for key, value in fields if key.lower() == name]


def _single(fields: Sequence[tuple[str, str]], name: str) -> str | None:
    values = _values(fields, name)
    if len(values) > 1:
        raise ShimError("InvalidRequest", f"The request carries {name} more than once.", 400)
    return values[0] if values else None


def _content_md5(fields: Sequence[tuple[str, str]]) -> bytes | None:
    """Content-MD5: the base64 of the 16-byte MD5 (RFC 1864); else InvalidDigest."""
    value = _single(fields, "content-md5")
    if value is None:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise ShimError("InvalidDigest", "The Content-MD5 you specified is not valid.", 400)
    return digest


def _content_sha256(fields: Sequence[tuple[str, str]]) -> str | None:
    """x-amz-content-sha256 when it is a digest (64 hex); None for UNSIGNED-PAYLOAD and the
    STREAMING-* values, which say how the body is sent, not what it is."""
    value = _single(fields, "x-amz-content-sha256")
    if value is None or value in PAYLOAD_KEYWORDS:
        return None
    if re.fullmatch(r"[0-9a-fA-F]{64}", value) is None:
        raise ShimError("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                        "a STREAMING- value, or a valid sha256 value.", 400)
    return value.lower()


def _checksum_checks(fields: Sequence[tuple[str, str]], trailers_expected: bool) -> list[_Check]:
    """The x-amz-checksum-<algorithm> fields, and the one x-amz-trailer announces. S3 takes
    one checksum per request ("Expecting a single x-amz-checksum- header")."""
    checks = []
    for key, value in fields:
        name = key.lower().removeprefix(CHECKSUM_PREFIX)
        if key.lower().startswith(CHECKSUM_PREFIX) and name in _ALGORITHMS:
            checks.append(_Check(name, key.lower(), _checksum_value(name, value)))
    trailer = _single(fields, "x-amz-trailer")
    if trailer is not None:
        checks.extend(_trailer_checks(trailer, trailers_expected))
    if len(checks) > 1:
        raise ShimError("InvalidRequest", "Expecting a single x-amz-checksum- header. Multiple "
                        "checksum Types are not allowed.", 400)
    return checks


def _trailer_checks(trailer: str, trailers_expected: bool) -> list[_Check]:
    if not trailers_expected:
        raise ShimError("InvalidRequest", "x-amz-trailer needs an aws-chunked body.", 400)
    checks = []
    for item in trailer.split(","):
        name = item.strip().lower()
        algorithm = name.removeprefix(CHECKSUM_PREFIX)
        if not name.startswith(CHECKSUM_PREFIX) or algorithm not in _ALGORITHMS:
            raise ShimError("InvalidRequest", f"The trailer {item.strip()!r} is not a "
                            "checksum S3 defines.", 400)
        checks.append(_Check(algorithm, name, None))
    return checks


def _checksum_value(name: str, value: str) -> bytes:
    """A checksum field's value: base64 of the digest (big-endian for the CRCs)."""
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != _ALGORITHMS[name].size:
        raise ShimError("InvalidRequest", f"Value for {CHECKSUM_PREFIX}{name} header is "
                        "invalid.", 400)
    return digest
