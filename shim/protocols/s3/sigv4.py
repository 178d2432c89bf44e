"""AWS Signature Version 4 with the Authorization header, as S3 verifies it.

Amazon S3 API Reference, "Authenticating Requests (AWS Signature Version 4)":
- "Authenticating Requests: Using the Authorization Header": the header's three components
  (Credential, SignedHeaders, Signature), the credential scope
  `<access key>/<YYYYMMDD>/<region>/s3/aws4_request`, and `x-amz-content-sha256`, which S3
  requires on every signed request (a hex SHA-256, `UNSIGNED-PAYLOAD`, or a `STREAMING-*`
  value for aws-chunked bodies);
- "Signature Calculations for the Authorization Header: Transferring Payload in Multiple
  Chunks (Chunked Upload)": the chained chunk signatures (`ChunkSigner`);
- "Signature calculations for trailing headers (chunked uploads)": the trailer signature.

The canonical request and the string to sign are botocore's (`botocore.auth.S3SigV4Auth`),
not written here: the request the client sent is rebuilt as a `botocore.awsrequest.AWSRequest`
with the headers it signed and its own timestamp, and botocore computes what the signature
must be. S3 does not normalise the path (botocore's S3 signer neither), so the path is the
raw one the client sent, percent-encoded as it was on the wire. Any region is accepted: the
shim is not AWS, the scope names whichever region the client was configured with.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote

from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.compat import HTTPHeaders  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from shim.errors import ShimError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TERMINATOR = "aws4_request"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_PAYLOAD_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
PAYLOAD_KEYWORDS = frozenset({UNSIGNED_PAYLOAD, STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER,
                              STREAMING_UNSIGNED_TRAILER})
"""The `x-amz-content-sha256` values that are not digests ("Authenticating Requests: Using
the Authorization Header"). The SigV4a forms (STREAMING-AWS4-ECDSA-P256-SHA256-*) go with
an AWS4-ECDSA-P256-SHA256 Authorization header, which the shim does not accept."""
SIGNED_CHUNKS = frozenset({STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER})
"""Payload values whose aws-chunked chunks carry chunk signatures (`ChunkSigner`)."""
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"[0-9]{8}")
_TIMESTAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z")


@dataclass(frozen=True)
class Signed:
    """A request whose signature checked out, and what its body's chunks are signed with."""

    access_key: str
    region: str
    date: str
    """YYYYMMDD, the credential scope's date."""
    timestamp: str
    """The request's X-Amz-Date (YYYYMMDDTHHMMSSZ)."""
    signature: str
    """The header signature: the seed of the chunk signatures."""
    signing_key: bytes
    payload: str
    """The `x-amz-content-sha256` value the client signed."""

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{SERVICE}/{TERMINATOR}"

    @property
    def signed_chunks(self) -> bool:
        """Whether an aws-chunked body's chunks carry signatures to verify."""
        return self.payload in SIGNED_CHUNKS


@dataclass(frozen=True)
class Authorization:
    """The components of an `AWS4-HMAC-SHA256` Authorization header, not yet verified."""

    access_key: str
    date: str
    region: str
    signed_headers: tuple[str, ...]
    signature: str


def verify(method: str, raw_path: str, query: str, fields: Sequence[tuple[str, str]],
           secrets: Mapping[str, str], now: float, *, max_skew: float = 900.0) -> Signed:
    """Verify a request's Authorization header; return what it was signed with.

    `raw_path` and `query` are the request target as the client sent it (percent-encoded),
    `fields` its header fields, `secrets` the secret access key of each access key id, `now`
    the current time (seconds since the epoch). S3 refuses a request more than 15 minutes
    from its clock ("RequestTimeTooSkewed"), hence the default `max_skew`."""
    auth = parse_authorization(_authorization_field(fields))
    timestamp = _timestamp(fields)
    if auth.date != timestamp[:8]:
        raise _malformed(f"Invalid credential date \"{auth.date}\". This date is not the same "
                         f"as X-Amz-Date: \"{timestamp[:8]}\".")
    secret = secrets.get(auth.access_key)
    if secret is None:
        raise ShimError("InvalidAccessKeyId", "The AWS Access Key Id you provided does not "
                        "exist in our records.", 403)
    _check_skew(timestamp, now, max_skew)
    payload = _payload(fields)
    signed_fields = _signed_fields(fields, auth.signed_headers)
    key = signing_key(secret, auth.date, auth.region)
    signature = _matching_signature(method, raw_path, query, signed_fields, payload, timestamp,
                                    auth, secret)
    if signature is None:
        raise ShimError("SignatureDoesNotMatch", "The request signature we calculated does not "
                        "match the signature you provided. Check your key and signing method.",
                        403)
    return Signed(auth.access_key, auth.region, auth.date, timestamp, auth.signature, key, payload)


def access_key_of(fields: Sequence[tuple[str, str]]) -> str | None:
    """The access key id an Authorization header names, unverified (for `s3.auth: none`,
    where the key id only names the owner); None without a readable one."""
    values = _values(fields, "authorization")
    if len(values) != 1:
        return None
    try:
        return parse_authorization(values[0]).access_key
    except ShimError:
        return None


def parse_authorization(value: str) -> Authorization:
    """`AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/s3/aws4_request,
    SignedHeaders=<h1;h2;...>, Signature=<64 hex>` ("Using the Authorization Header").
    Another scheme is AccessDenied; a broken header AuthorizationHeaderMalformed."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme != ALGORITHM:
        raise ShimError("AccessDenied", f"Only {ALGORITHM} authorization is accepted.", 403)
    parts = _components(rest)
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in parts]
    if missing:
        raise _malformed(f"The authorization header is missing {', '.join(missing)}.")
    access_key, date, region = _credential(parts["Credential"])
    signed = tuple(parts["SignedHeaders"].split(";"))
    if not all(signed) or any(name != name.strip().lower() for name in signed):
        raise _malformed("SignedHeaders must be lower-case header names separated by ';'.")
    signature = parts["Signature"]
    if not _HEX64.fullmatch(signature):
        raise _malformed("The signature must be 64 lower-case hexadecimal digits.")
    return Authorization(access_key, date, region, signed, signature)


def signing_key(secret: str, date: str, region: str) -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), "s3"), "aws4_request")
    ("Authenticating Requests: Using the Authorization Header", the signing key). botocore
    derives the same key inside `SigV4Auth.signature` without exposing it, and the chunk
    signatures need it."""
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, SERVICE, TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


class ChunkSigner:
    """The chained signatures of an aws-chunked body ("Transferring Payload in Multiple
    Chunks": "Defining the Chunk Body"; "Signature calculations for trailing headers").

    Each chunk's string to sign is
    `AWS4-HMAC-SHA256-PAYLOAD \\n timestamp \\n scope \\n previous signature \\n sha256("")
    \\n sha256(chunk data)`, signed with the signing key; the previous signature of the first
    chunk is the header's (the seed). The trailer's is
    `AWS4-HMAC-SHA256-TRAILER \\n timestamp \\n scope \\n previous signature \\n
    sha256(trailer lines)`, each trailer line being `name:value\\n`. botocore has no API for
    these (it does not sign chunks), hence the few HMACs here."""

    def __init__(self, signed: Signed) -> None:
        self.signed = signed
        self.previous = signed.signature
        self._head = f"{signed.timestamp}\n{signed.scope}\n"

    @property
    def trailer_signed(self) -> bool:
        """Whether the body ends with a signed trailer (`x-amz-trailer-signature`)."""
        return self.signed.payload == STREAMING_PAYLOAD_TRAILER

    def chunk_signature(self, data_sha256: str) -> str:
        """The expected signature of the next chunk, given its data's SHA-256 (hex)."""
        return self._sign(f"AWS4-HMAC-SHA256-PAYLOAD\n{self._head}{self.previous}\n"
                          f"{EMPTY_SHA256}\n{data_sha256}")

    def verify_chunk(self, data_sha256: str, signature: str) -> None:
        """Check the next chunk's signature and move the chain on to it."""
        expected = self.chunk_signature(data_sha256)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise ShimError("SignatureDoesNotMatch", "The chunk signature we calculated does not "
                            "match the chunk-signature you provided.", 403)
        self.previous = expected

    def trailer_signature(self, trailers: Sequence[tuple[str, str]]) -> str:
        """The expected `x-amz-trailer-signature` over the trailer lines, in their order."""
        lines = "".join(f"{name}:{value}\n" for name, value in trailers)
        digest = hashlib.sha256(lines.encode("utf-8")).hexdigest()
        return self._sign(f"AWS4-HMAC-SHA256-TRAILER\n{self._head}{self.previous}\n{digest}")

    def verify_trailer(self, trailers: Sequence[tuple[str, str]], signature: str) -> None:
        if not hmac.compare_digest(self.trailer_signature(trailers).encode(), signature.encode()):
            raise ShimError("SignatureDoesNotMatch", "The trailer signature we calculated does "
                            "not match the x-amz-trailer-signature you provided.", 403)

    def _sign(self, string_to_sign: str) -> str:
        return hmac.new(self.signed.signing_key, string_to_sign.encode("utf-8"),
                        hashlib.sha256).hexdigest()


# --- the Authorization header ---------------------------------------------------------------


def _authorization_field(fields: Sequence[tuple[str, str]]) -> str:
    values = _values(fields, "authorization")
    if not values:
        raise ShimError("AccessDenied", "Access Denied: the request is not signed.", 403)
    if len(values) > 1:
        raise _malformed("The request carries more than one Authorization header.")
    return values[0]


def _components(rest: str) -> dict[str, str]:
    """`name=value` components separated by commas (botocore writes `, `, the AWS examples
    `,`: whitespace around them is not significant)."""
    parts: dict[str, str] = {}
    for component in rest.split(","):
        name, equals, value = component.strip().partition("=")
        if not equals or name in parts or name not in ("Credential", "SignedHeaders", "Signature"):
            raise _malformed(f"The authorization header component {component.strip()!r} is "
                             "not understood.")
        parts[name] = value.strip()
    return parts


def _credential(credential: str) -> tuple[str, str, str]:
    """`<access key>/<YYYYMMDD>/<region>/s3/aws4_request` -> (access key, date, region)."""
    parts = credential.split("/")
    if len(parts) != 5 or not all(parts):
        raise _malformed(f"The credential {credential!r} is not "
                         "<access key>/<date>/<region>/s3/aws4_request.")
    access_key, date, region, service, terminator = parts
    if not _DATE.fullmatch(date):
        raise _malformed(f"The credential's date {date!r} is not YYYYMMDD.")
    if service != SERVICE or terminator != TERMINATOR:
        raise _malformed(f"The credential scope must end in /{SERVICE}/{TERMINATOR}.")
    return access_key, date, region


def _malformed(message: str) -> ShimError:
    return ShimError("AuthorizationHeaderMalformed", message, 400)


# --- the rest of the request ------------------------------------------------------------------


def _values(fields: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in fields if key.lower() == name]


def _timestamp(fields: Sequence[tuple[str, str]]) -> str:
    """X-Amz-Date, or failing it Date (RFC 9110 HTTP-date), as YYYYMMDDTHHMMSSZ: SigV4 signs
    with either ("Authenticating Requests: Using the Authorization Header", x-amz-date)."""
    amz = _values(fields, "x-amz-date")
    if len(amz) == 1 and _TIMESTAMP.fullmatch(amz[0].strip()) and _valid_time(amz[0].strip()):
        return amz[0].strip()
    dates = _values(fields, "date")
    if not amz and len(dates) == 1:
        try:
            when = parsedate_to_datetime(dates[0])
        except (TypeError, ValueError):
            when = None
        if when is not None:
            # "-0000" (botocore writes it) parses without a zone: it is UTC all the same.
            when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
            return time.strftime(TIMESTAMP_FORMAT, time.gmtime(when.timestamp()))
    raise ShimError("AccessDenied", "AWS authentication requires a valid Date or x-amz-date "
                    "header", 403)


def _valid_time(timestamp: str) -> bool:
    try:
        time.strptime(timestamp, TIMESTAMP_FORMAT)
    except ValueError:
        return False
    return True


def _check_skew(timestamp: str, now: float, max_skew: float) -> None:
    signed_at = calendar.timegm(time.strptime(timestamp, TIMESTAMP_FORMAT))
    if abs(signed_at - now) > max_skew:
        raise ShimError("RequestTimeTooSkewed", "The difference between the request time and "
                        "the current time is too large.", 403)


def _signed_fields(fields: Sequence[tuple[str, str]],
                   signed: tuple[str, ...]) -> list[tuple[str, str]]:
    """The fields the client signed, in the order received. S3 wants `host` signed, and
    refuses x-amz-* fields the signature does not cover ("There were headers present in the
    request which were not signed"): unsigned, they could have been added on the way."""
    if "host" not in signed:
        raise ShimError("AccessDenied", "The host header must be signed (SignedHeaders).", 403)
    names = set(signed)
    unsigned = sorted({key.lower() for key, _ in fields
                       if key.lower().startswith("x-amz-") and key.lower() not in names})
    if unsigned:
        raise ShimError("AccessDenied", "There were headers present in the request which were "
                        f"not signed: {', '.join(unsigned)}", 403)
    present = {key.lower() for key, _ in fields}
    absent = [name for name in signed if name not in present]
    if absent:
        raise ShimError("SignatureDoesNotMatch", "The request does not carry the signed "
                        f"headers {', '.join(absent)}.", 403)
    return [(key.lower(), value) for key, value in fields if key.lower() in names]


def _payload(fields: Sequence[tuple[str, str]]) -> str:
    """`x-amz-content-sha256`, which S3 requires on every SigV4 request."""
    values = _values(fields, "x-amz-content-sha256")
    if not values:
        raise ShimError("InvalidRequest", "Missing required header for this request: "
                        "x-amz-content-sha256", 400)
    value = values[0].strip()
    if len(values) > 1 or not (value in PAYLOAD_KEYWORDS or _HEX64.fullmatch(value)):
        raise ShimError("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                        "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
                        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, or a valid sha256 value.",
                        400)
    return value


# --- botocore computes the signature ----------------------------------------------------------


class _ReceivedRequestAuth(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 signer, fed a request as received rather than one to send.

    Two of its choices are a client's, not the protocol's, and are undone here: it leaves out
    of the signature some headers it would not sign itself (User-Agent, Expect, ...), while a
    verifier must take exactly the headers the client named; and it hashes the body for the
    payload line, while the payload line is the client's `x-amz-content-sha256`."""

    def __init__(self, credentials: Any, region: str, payload: str) -> None:
        super().__init__(credentials, SERVICE, region)
        self._payload = payload

    def headers_to_sign(self, request: Any) -> Any:
        headers = HTTPHeaders()
        for name, value in request.headers.items():
            headers[name.lower()] = value
        return headers

    def payload(self, request: Any) -> str:
        return self._payload


def _matching_signature(method: str, raw_path: str, query: str,
                        signed_fields: list[tuple[str, str]], payload: str, timestamp: str,
                        auth: Authorization, secret: str) -> str | None:
    """The signature botocore computes for the request, when it equals the client's.

    The path is the raw one first (what every SDK signs: S3 does not normalise paths), then
    its canonical spelling (each segment percent-decoded and encoded again, upper-case hex),
    which S3 itself would compute for a client that sent a path less encoded than it signed."""
    signer = _ReceivedRequestAuth(Credentials(auth.access_key, secret), auth.region, payload)
    for path in _path_spellings(raw_path):
        request = AWSRequest(method=method.upper(), url=f"http://s3.invalid{path}",
                             params=_query_params(query))
        for name, value in signed_fields:
            request.headers[name] = value
        request.context["timestamp"] = timestamp
        try:
            string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
        except (AttributeError, TypeError, ValueError):
            # botocore's headers hold only ASCII text: a signed field with other bytes (say
            # a value in UTF-8) cannot be put in canonical form, so it cannot match
            return None
        expected: str = signer.signature(string_to_sign, request)
        if hmac.compare_digest(expected.encode(), auth.signature.encode()):
            return expected
    return None


def _path_spellings(raw_path: str) -> list[str]:
    path = raw_path or "/"
    canonical = "/".join(quote(unquote(segment), safe="") for segment in path.split("/"))
    return [path] if canonical == path else [path, canonical]


def _query_params(query: str) -> list[tuple[str, str]]:
    """The query as (name, value) pairs, percent-decoded: botocore encodes them again the
    canonical way (RFC 3986 unreserved characters bare, upper-case hex, `=` after a name
    without a value) and sorts them. `+` stays `+`: SigV4 does not read it as a space."""
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs
