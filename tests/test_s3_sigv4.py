"""Pure tests of AWS Signature Version 4 verification (shim/protocols/s3/sigv4.py).

Requests are signed by botocore itself (a real boto3 client whose requests are captured
before they are sent, or `S3SigV4Auth.add_auth`), and the chunk signatures are checked against
the worked examples of AWS's documentation ("Signature Calculations for the Authorization
Header: Transferring Payload in Multiple Chunks", "Example: PUT Object"; "Signature
calculations for trailing headers").
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials

from shim.errors import ShimError
from shim.protocols.s3 import sigv4

KEY, SECRET = "AKIDSHIMTEST", "shim/secret+KEY"
SECRETS = {KEY: SECRET, "OTHER": "other-secret"}

# AWS's worked example (sigv4-streaming.html, "Example: PUT Object").
AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_TIME = "20130524T000000Z"
AWS_NOW = calendar.timegm(time.strptime(AWS_TIME, sigv4.TIMESTAMP_FORMAT))
AWS_SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
AWS_CHUNKS = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
              "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
              "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]
# The trailer example (sigv4-streaming-trailers.html).
AWS_TRAILER_SEED = "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e"
AWS_TRAILER_CHUNKS = ["b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
                      "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
                      "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992"]
AWS_TRAILER_SIGNATURE = "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"


def aws_example_fields(payload: str = sigv4.STREAMING_PAYLOAD) -> list[tuple[str, str]]:
    """The request of "Example: PUT Object", as received."""
    trailer = payload == sigv4.STREAMING_PAYLOAD_TRAILER
    signed = ("content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
              "x-amz-storage-class;x-amz-trailer" if trailer else
              "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
              "x-amz-decoded-content-length;x-amz-storage-class")
    seed = AWS_TRAILER_SEED if trailer else AWS_SEED
    fields = [("Host", "s3.amazonaws.com"), ("x-amz-date", AWS_TIME),
              ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
              ("Authorization", f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/20130524/us-east-1/s3/"
                                f"aws4_request,SignedHeaders={signed},Signature={seed}"),
              ("x-amz-content-sha256", payload), ("Content-Encoding", "aws-chunked"),
              ("x-amz-decoded-content-length", "66560")]
    return [*fields, ("x-amz-trailer", "x-amz-checksum-crc32c")] if trailer else \
        [*fields, ("Content-Length", "66824")]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_aws_example_verifies_and_its_chunk_signatures_chain() -> None:
    signed = sigv4.verify("PUT", "/examplebucket/chunkObject.txt", "", aws_example_fields(),
                          {AWS_KEY: AWS_SECRET}, AWS_NOW)
    assert (signed.access_key, signed.region, signed.date, signed.signature) == (
        AWS_KEY, "us-east-1", "20130524", AWS_SEED)
    assert signed.signed_chunks and signed.scope == "20130524/us-east-1/s3/aws4_request"
    signer = sigv4.ChunkSigner(signed)
    for data, expected in zip((b"a" * 65536, b"a" * 1024, b""), AWS_CHUNKS, strict=True):
        assert signer.chunk_signature(sha(data)) == expected
        signer.verify_chunk(sha(data), expected)
    assert signer.previous == AWS_CHUNKS[-1]


def test_the_aws_trailer_example_verifies_with_its_trailer_signature() -> None:
    signed = sigv4.verify("PUT", "/examplebucket/chunkObject.txt", "",
                          aws_example_fields(sigv4.STREAMING_PAYLOAD_TRAILER),
                          {AWS_KEY: AWS_SECRET}, AWS_NOW)
    signer = sigv4.ChunkSigner(signed)
    assert signer.trailer_signed
    for data, expected in zip((b"a" * 65536, b"a" * 1024, b""), AWS_TRAILER_CHUNKS, strict=True):
        signer.verify_chunk(sha(data), expected)
    trailers = [("x-amz-checksum-crc32c", "sOO8/Q==")]
    assert signer.trailer_signature(trailers) == AWS_TRAILER_SIGNATURE
    signer.verify_trailer(trailers, AWS_TRAILER_SIGNATURE)
    with pytest.raises(ShimError) as refused:
        signer.verify_trailer([("x-amz-checksum-crc32c", "AAAAAA==")], AWS_TRAILER_SIGNATURE)
    assert (refused.value.code, refused.value.status) == ("SignatureDoesNotMatch", 403)


def test_a_chunk_signed_out_of_order_breaks_the_chain() -> None:
    signer = sigv4.ChunkSigner(sigv4.verify("PUT", "/examplebucket/chunkObject.txt", "",
                                            aws_example_fields(), {AWS_KEY: AWS_SECRET}, AWS_NOW))
    with pytest.raises(ShimError) as refused:
        signer.verify_chunk(sha(b"a" * 1024), AWS_CHUNKS[1])  # the second chunk first
    assert refused.value.code == "SignatureDoesNotMatch"
    assert signer.previous == AWS_SEED  # a refused chunk does not move the chain


# --- requests signed by boto3 ----------------------------------------------------------------


class Sent:
    """A request as the shim would receive it."""

    def __init__(self, request: Any) -> None:
        url = urlsplit(request.url)
        self.method: str = request.method
        self.path, self.query = url.path, url.query
        self.fields: list[tuple[str, str]] = [
            (k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()]
        if not any(k.lower() == "host" for k, _ in self.fields):
            self.fields.insert(0, ("Host", url.netloc))  # urllib3 adds it on the wire
        self.now = calendar.timegm(time.strptime(self.field("x-amz-date"), sigv4.TIMESTAMP_FORMAT))

    def field(self, name: str) -> str:
        return next(v for k, v in self.fields if k.lower() == name)

    def verify(self, secrets: dict[str, str] = SECRETS, **changes: Any) -> sigv4.Signed:
        parts: dict[str, Any] = {"method": self.method, "raw_path": self.path,
                                 "query": self.query, "fields": self.fields,
                                 "secrets": secrets, "now": self.now}
        parts.update(changes)
        return sigv4.verify(**parts)

    def with_field(self, name: str, value: str) -> list[tuple[str, str]]:
        return [(k, value if k.lower() == name else v) for k, v in self.fields]


class _Raw:
    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def boto3_sent(call: Callable[[Any], Any], region: str = "us-east-1", key: str = KEY,
               secret: str = SECRET, endpoint: str = "http://127.0.0.1:9") -> list[Sent]:
    """The requests a boto3 S3 client signs for `call(client)`; answered 200 without network."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          aws_access_key_id=key, aws_secret_access_key=secret,
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1, "mode": "standard"}))
    sent: list[Sent] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        sent.append(Sent(request))
        return AWSResponse(request.url, 200, {"ETag": '"0"'}, _Raw())

    client.meta.events.register("before-send.s3", capture)
    call(client)
    return sent


OPERATIONS: dict[str, Callable[[Any], Any]] = {
    "put-object": lambda c: c.put_object(Bucket="b", Key="k.bin", Body=b"payload",
                                         Metadata={"who": "me"}),
    "upload-part": lambda c: c.upload_part(Bucket="b", Key="k.bin", UploadId="u/1+2",
                                           PartNumber=7, Body=b"part"),
    "list-parts": lambda c: c.list_parts(Bucket="b", Key="k.bin", UploadId="u-1", MaxParts=5,
                                         PartNumberMarker=2),
    "list-uploads": lambda c: c.list_multipart_uploads(Bucket="b", Prefix="dir/a b",
                                                       KeyMarker="x~y"),
    "abort": lambda c: c.abort_multipart_upload(Bucket="b", Key="k.bin", UploadId="u-1"),
}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_requests_boto3_signs_verify(operation: str) -> None:
    sent = boto3_sent(OPERATIONS[operation])[0]
    signed = sent.verify()
    assert (signed.access_key, signed.region) == (KEY, "us-east-1")
    assert signed.payload == sent.field("x-amz-content-sha256")
    assert signed.signature == sent.field("authorization").rpartition("Signature=")[2]


@pytest.mark.parametrize("key", ["dir/a b+c~%.txt", "ünï/ç", "a/%2F/b", "sp ace/plus+/semi;colon",
                                 "q?uery#frag&amp=1", "~tilde/!*'()[]$@,"])
def test_keys_with_any_characters_verify_on_their_raw_path(key: str) -> None:
    sent = boto3_sent(lambda c: c.put_object(Bucket="b", Key=key, Body=b"x"))[0]
    assert "%" in sent.path or key.isascii()
    sent.verify()


@pytest.mark.parametrize("path", ["/b/dir%2Fkey", "/b/dir%2fkey", "/b/%E2%82%AC%20%2B~", "/b/a+b"])
def test_a_path_is_signed_exactly_as_sent(path: str) -> None:
    """botocore's S3 signer does not normalise or re-encode the path: an encoded slash stays
    one, lower-case hex stays lower-case, `+` stays `+`."""
    request = AWSRequest("PUT", f"http://s3.local{path}", data=b"")
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    fields = [("Host", "s3.local"), *request.headers.items()]
    now = calendar.timegm(time.strptime(request.headers["X-Amz-Date"], sigv4.TIMESTAMP_FORMAT))
    assert sigv4.verify("PUT", path, "", fields, SECRETS, now).access_key == KEY
    with pytest.raises(ShimError):
        sigv4.verify("PUT", path.replace("/b/", "/b/x"), "", fields, SECRETS, now)


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1", "moon-base-1"])
def test_any_region_is_accepted(region: str) -> None:
    sent = boto3_sent(OPERATIONS["list-parts"], region=region)[0]
    assert sent.verify().region == region


def test_a_multipart_upload_as_boto3_sends_it_verifies_end_to_end() -> None:
    def upload(client: Any) -> None:
        client.create_multipart_upload(Bucket="b", Key="big.bin")
        client.upload_part(Bucket="b", Key="big.bin", UploadId="u", PartNumber=1, Body=b"1" * 100)
        client.complete_multipart_upload(
            Bucket="b", Key="big.bin", UploadId="u",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"0"'}]})

    sent = boto3_sent(upload)
    assert [s.method for s in sent] == ["POST", "PUT", "POST"]
    assert [s.query for s in sent] == ["uploads", "uploadId=u&partNumber=1", "uploadId=u"]
    for request in sent:
        request.verify()


def test_https_uploads_with_an_unsigned_trailer_verify() -> None:
    sent = boto3_sent(OPERATIONS["upload-part"], endpoint="https://127.0.0.1:9")[0]
    signed = sent.verify()
    assert signed.payload == sigv4.STREAMING_UNSIGNED_TRAILER and not signed.signed_chunks


def test_a_date_header_signs_in_place_of_x_amz_date() -> None:
    request = AWSRequest("GET", "http://s3.local/b/k?uploadId=u",
                         headers={"Date": "Thu, 01 Jan 2026 00:00:00 GMT"})
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    fields = [("Host", "s3.local"), *[(k, v) for k, v in request.headers.items()]]
    assert not any(k.lower() == "x-amz-date" for k, _ in fields)
    sent_at = parsedate_to_datetime(request.headers["Date"]).timestamp()
    signed = sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, sent_at)
    assert signed.timestamp == time.strftime(sigv4.TIMESTAMP_FORMAT, time.gmtime(sent_at))


def test_a_path_sent_less_encoded_than_signed_verifies_as_s3_would() -> None:
    """S3 signs the canonical spelling of the path; a client that sends `!` bare but signs
    `%21` (as the spec's encoding has it) is accepted."""
    sent = boto3_sent(lambda c: c.put_object(Bucket="b", Key="a!b(c)", Body=b""))[0]
    assert sent.path == "/b/a%21b%28c%29"
    sent.verify(raw_path="/b/a!b(c)")
    sent.verify(raw_path="/b/a%21b%28c%29")
    with pytest.raises(ShimError):
        sent.verify(raw_path="/b/a!b(d)")


def test_a_query_sent_in_another_spelling_verifies() -> None:
    sent = boto3_sent(OPERATIONS["list-uploads"])[0]
    assert "prefix=dir%2Fa%20b" in sent.query
    sent.verify(query=sent.query.replace("dir%2Fa%20b", "dir/a%20b").replace("%7E", "~"))
    sent.verify(query="&".join(reversed(sent.query.split("&"))))


# --- refusals ----------------------------------------------------------------------------------


def refused(sent: Sent, **changes: Any) -> ShimError:
    with pytest.raises(ShimError) as raised:
        sent.verify(**changes)
    return raised.value


@pytest.fixture
def put() -> Sent:
    return boto3_sent(OPERATIONS["put-object"])[0]


def test_a_changed_signed_header_does_not_match(put: Sent) -> None:
    for name, value in [("x-amz-meta-who", "you"), ("host", "elsewhere:80"),
                        ("x-amz-content-sha256", "0" * 64), ("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")]:
        if any(k.lower() == name for k, _ in put.fields):
            error = refused(put, fields=put.with_field(name, value))
            assert (error.code, error.status) == ("SignatureDoesNotMatch", 403), name


def test_a_changed_path_or_query_does_not_match(put: Sent) -> None:
    assert refused(put, raw_path="/b/other.bin").code == "SignatureDoesNotMatch"
    assert refused(put, query="uploads").code == "SignatureDoesNotMatch"
    parts = boto3_sent(OPERATIONS["list-parts"])[0]
    assert refused(parts, query=parts.query.replace("max-parts=5", "max-parts=6")).code == \
        "SignatureDoesNotMatch"
    assert refused(parts, method="DELETE").code == "SignatureDoesNotMatch"


def test_a_wrong_secret_does_not_match() -> None:
    sent = boto3_sent(OPERATIONS["abort"], secret="not-the-secret")[0]
    assert (refused(sent).code, refused(sent).status) == ("SignatureDoesNotMatch", 403)


def test_an_unknown_access_key_is_refused() -> None:
    sent = boto3_sent(OPERATIONS["abort"], key="AKIDNOBODY")[0]
    assert (refused(sent).code, refused(sent).status) == ("InvalidAccessKeyId", 403)


@pytest.mark.parametrize("skew", [-901.0, 901.0, 86400.0])
def test_a_request_too_far_from_now_is_refused(put: Sent, skew: float) -> None:
    error = refused(put, now=put.now + skew)
    assert (error.code, error.status) == ("RequestTimeTooSkewed", 403)
    put.verify(now=put.now + skew / abs(skew) * 899)


def test_a_scope_dated_another_day_is_malformed(put: Sent) -> None:
    authorization = put.field("authorization")
    date = put.field("x-amz-date")[:8]
    other = authorization.replace(f"/{date}/", "/20000101/")
    error = refused(put, fields=put.with_field("authorization", other))
    assert (error.code, error.status) == ("AuthorizationHeaderMalformed", 400)


GOOD = ("AWS4-HMAC-SHA256 Credential=AKIDSHIMTEST/20260101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=" + "0" * 64)


@pytest.mark.parametrize("authorization", [
    GOOD.replace("Credential=", "Credentials="),
    GOOD.replace(", Signature=" + "0" * 64, ""),
    GOOD.replace(", SignedHeaders=host;x-amz-content-sha256;x-amz-date", ""),
    GOOD.replace("Credential=AKIDSHIMTEST/20260101/us-east-1/s3/aws4_request, ", ""),
    GOOD.replace("/s3/", "/ec2/"),
    GOOD.replace("aws4_request", "aws5_request"),
    GOOD.replace("/us-east-1/", "//"),
    GOOD.replace("/20260101/", "/2026-01-01/"),
    GOOD.replace("us-east-1/s3", "us-east-1/extra/s3"),
    GOOD + ", Signature=" + "1" * 64,
    GOOD + ", Extra=1",
    GOOD.replace("0" * 64, "0" * 63),
    GOOD.replace("0" * 64, "G" * 64),
    GOOD.replace("SignedHeaders=host", "SignedHeaders=Host"),
    GOOD.replace("SignedHeaders=host;", "SignedHeaders=;host;"),
])
def test_a_malformed_authorization_header_is_refused(authorization: str) -> None:
    fields = [("Host", "h"), ("x-amz-date", "20260101T000000Z"),
              ("x-amz-content-sha256", sigv4.UNSIGNED_PAYLOAD), ("Authorization", authorization)]
    with pytest.raises(ShimError) as raised:
        sigv4.verify("GET", "/b/k", "", fields, SECRETS,
                     calendar.timegm((2026, 1, 1, 0, 0, 0, 0, 0, 0)))
    assert (raised.value.code, raised.value.status) == ("AuthorizationHeaderMalformed", 400)


@pytest.mark.parametrize("authorization", [None, "", "AWS AKIDSHIMTEST:c2lnbmF0dXJl",
                                           "AWS4-ECDSA-P256-SHA256 Credential=x",
                                           "Bearer token"])
def test_no_or_another_authorization_scheme_is_access_denied(put: Sent,
                                                            authorization: str | None) -> None:
    fields = [(k, v) for k, v in put.fields if k.lower() != "authorization"]
    if authorization is not None:
        fields.append(("Authorization", authorization))
    error = refused(put, fields=fields)
    assert (error.code, error.status) == ("AccessDenied", 403)


def test_host_must_be_signed_and_x_amz_fields_too() -> None:
    request = AWSRequest("GET", "http://s3.local/b/k?uploadId=u")
    S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    fields = [(k, v) for k, v in request.headers.items()]
    now = time.time()
    with pytest.raises(ShimError) as raised:  # host: botocore took it from the URL, unsent
        sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now)
    assert raised.value.code == "SignatureDoesNotMatch"
    fields.append(("Host", "s3.local"))
    sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now)
    with pytest.raises(ShimError) as raised:
        sigv4.verify("GET", "/b/k", "uploadId=u", [*fields, ("x-amz-meta-added", "1")],
                     SECRETS, now)
    assert (raised.value.code, raised.value.status) == ("AccessDenied", 403)
    unsigned_host = [(k, v.replace("host;", "")) if k == "Authorization" else (k, v)
                     for k, v in fields]
    with pytest.raises(ShimError) as raised:
        sigv4.verify("GET", "/b/k", "uploadId=u", unsigned_host, SECRETS, now)
    assert (raised.value.code, raised.value.status) == ("AccessDenied", 403)


def test_unsigned_non_amz_fields_may_be_added_on_the_way(put: Sent) -> None:
    put.verify(fields=[*put.fields, ("X-Forwarded-For", "10.0.0.1"), ("Via", "1.1 proxy")])


def test_x_amz_content_sha256_is_required_and_checked(put: Sent) -> None:
    without = [(k, v) for k, v in put.fields if k.lower() != "x-amz-content-sha256"]
    error = refused(put, fields=without)
    assert (error.code, error.status) == ("InvalidRequest", 400)
    error = refused(put, fields=put.with_field("x-amz-content-sha256", "STREAMING-NONSENSE"))
    assert (error.code, error.status) == ("InvalidArgument", 400)


@pytest.mark.parametrize("date", ["", "20260101", "2026-01-01T00:00:00Z", "20261301T000000Z"])
def test_a_missing_or_invalid_date_is_access_denied(put: Sent, date: str) -> None:
    fields = [(k, v) for k, v in put.fields if k.lower() != "x-amz-date"]
    if date:
        fields.append(("X-Amz-Date", date))
    error = refused(put, fields=fields)
    assert (error.code, error.status) == ("AccessDenied", 403)


def test_the_access_key_is_read_without_verifying(put: Sent) -> None:
    assert sigv4.access_key_of(put.fields) == KEY
    assert sigv4.access_key_of([("Authorization", GOOD.replace("AKIDSHIMTEST", "SOMEONE"))]) == \
        "SOMEONE"
    assert sigv4.access_key_of([]) is None
    assert sigv4.access_key_of([("Authorization", "Bearer x")]) is None
    assert sigv4.access_key_of([("Authorization", GOOD.replace("/s3/", "/ec2/"))]) is None


def test_the_signing_key_is_the_one_botocore_signs_with() -> None:
    """The header signature is botocore's; the chunk signatures use `signing_key`: both must
    be the same key, or signed chunks would never verify."""
    request = AWSRequest("PUT", "http://s3.local/b/k", data=b"")
    auth = S3SigV4Auth(Credentials(KEY, SECRET), "s3", "eu-west-3")
    request.context["timestamp"] = "20260102T030405Z"
    string_to_sign = "AWS4-HMAC-SHA256\n20260102T030405Z\nscope\nhash"
    key = sigv4.signing_key(SECRET, "20260102", "eu-west-3")
    assert auth.signature(string_to_sign, request) == hmac.new(
        key, string_to_sign.encode(), hashlib.sha256).hexdigest()


# --- what each refusal says (S3's own wording where S3 has one) ----------------------------------


def fixed_request(method: str = "GET", url: str = "http://s3.local/b/k?uploadId=u",
                  headers: dict[str, str] | None = None,
                  when: datetime = datetime(2026, 1, 2, 3, 4, 5)) -> tuple[list[tuple[str, str]], float]:
    """A request botocore signs at `when` (naive UTC): its fields as received, and that time."""
    request = AWSRequest(method, url, headers=headers or {})
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1").add_auth(request)
    return [("Host", "s3.local"), *request.headers.items()], float(calendar.timegm(when.timetuple()))


def refusal(fields: list[tuple[str, str]], now: float, method: str = "GET", path: str = "/b/k",
            query: str = "uploadId=u") -> tuple[str, int, str]:
    with pytest.raises(ShimError) as raised:
        sigv4.verify(method, path, query, fields, SECRETS, now)
    return raised.value.code, raised.value.status, raised.value.message


def changed(fields: list[tuple[str, str]], name: str, value: str | None) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in fields if k.lower() != name]
    return kept if value is None else [*kept, (name, value)]


def test_each_refusal_says_what_s3_would() -> None:
    fields, now = fixed_request()
    authorization = dict((k.lower(), v) for k, v in fields)["authorization"]
    assert refusal(changed(fields, "authorization", None), now) == (
        "AccessDenied", 403, "Access Denied: the request is not signed.")
    assert refusal([*fields, ("Authorization", authorization)], now) == (
        "AuthorizationHeaderMalformed", 400,
        "The request carries more than one Authorization header.")
    assert refusal(changed(fields, "authorization", "Bearer x"), now) == (
        "AccessDenied", 403, "Only AWS4-HMAC-SHA256 authorization is accepted.")
    assert refusal(changed(fields, "authorization", authorization.replace("/20260102/", "/20260103/")),
                   now) == ("AuthorizationHeaderMalformed", 400, 'Invalid credential date '
                            '"20260103". This date is not the same as X-Amz-Date: "20260102".')
    assert refusal(changed(fields, "authorization", authorization.replace(KEY, "AKIDNOBODY")),
                   now) == ("InvalidAccessKeyId", 403, "The AWS Access Key Id you provided does "
                            "not exist in our records.")
    assert refusal(fields, now + 901) == (
        "RequestTimeTooSkewed", 403,
        "The difference between the request time and the current time is too large.")
    assert refusal(fields, now, path="/b/other") == (
        "SignatureDoesNotMatch", 403, "The request signature we calculated does not match the "
        "signature you provided. Check your key and signing method.")
    assert refusal(changed(fields, "x-amz-date", None), now) == (
        "AccessDenied", 403, "AWS authentication requires a valid Date or x-amz-date header")
    assert refusal(changed(fields, "x-amz-content-sha256", None), now) == (
        "InvalidRequest", 400, "Missing required header for this request: x-amz-content-sha256")
    assert refusal([*fields, ("x-amz-content-sha256", sigv4.UNSIGNED_PAYLOAD)], now) == (
        "InvalidArgument", 400, "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER, or a valid sha256 value.")
    assert refusal([*fields, ("X-Amz-Meta-B", "1"), ("x-amz-meta-a", "2")], now) == (
        "AccessDenied", 403, "There were headers present in the request which were not signed: "
        "x-amz-meta-a, x-amz-meta-b")
    no_host = authorization.replace("SignedHeaders=host;", "SignedHeaders=")
    assert refusal(changed(fields, "authorization", no_host), now) == (
        "AccessDenied", 403, "The host header must be signed (SignedHeaders).")
    more = authorization.replace("x-amz-date,", "x-amz-date;x-custom;x-more,")
    assert refusal(changed(fields, "authorization", more), now) == (
        "SignatureDoesNotMatch", 403, "The request does not carry the signed headers x-custom, "
        "x-more.")


@pytest.mark.parametrize(("authorization", "message"), [
    (GOOD.replace(", Signature=" + "0" * 64, "").replace(", SignedHeaders=host;x-amz-content-sha256;"
                                                           "x-amz-date", ""),
     "The authorization header is missing SignedHeaders, Signature."),
    (GOOD.replace("SignedHeaders=host", "SignedHeaders=Host"),
     "SignedHeaders must be lower-case header names separated by ';'."),
    (GOOD.replace("0" * 64, "0" * 63), "The signature must be 64 lower-case hexadecimal digits."),
    (GOOD + ", Extra=1", "The authorization header component 'Extra=1' is not understood."),
    (GOOD.replace("/s3/", "/ec2/"), "The credential scope must end in /s3/aws4_request."),
    (GOOD.replace("/20260101/", "/2026-01-01/"), "The credential's date '2026-01-01' is not YYYYMMDD."),
    (GOOD.replace("us-east-1/s3", "us-east-1/extra/s3"),
     "The credential 'AKIDSHIMTEST/20260101/us-east-1/extra/s3/aws4_request' is not "
     "<access key>/<date>/<region>/s3/aws4_request."),
])
def test_a_malformed_authorization_header_says_what_is_wrong(authorization: str, message: str) -> None:
    with pytest.raises(ShimError) as raised:
        sigv4.parse_authorization(authorization)
    assert (raised.value.code, raised.value.status, raised.value.message) == (
        "AuthorizationHeaderMalformed", 400, message)


def test_a_component_value_may_hold_an_equals_sign() -> None:
    assert sigv4.access_key_of([("Authorization", GOOD.replace("AKIDSHIMTEST", "AK=ID"))]) == "AK=ID"


def test_two_x_amz_content_sha256_values_are_refused() -> None:
    fields, now = fixed_request()
    sha = dict((k.lower(), v) for k, v in fields)["x-amz-content-sha256"]
    code, status, _ = refusal([*fields, ("x-amz-content-sha256", sha)], now)
    assert (code, status) == ("InvalidArgument", 400)


def test_a_request_exactly_fifteen_minutes_off_is_still_taken() -> None:
    fields, now = fixed_request()
    for skew in (-900, 900):
        assert sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now + skew).access_key == KEY


def test_a_date_header_is_read_as_utc_whatever_the_local_time_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore writes Date as `..., 02 Jan 2026 03:04:05 -0000` (no zone: UTC)."""
    fields, now = fixed_request(headers={"Date": "placeholder"})
    assert not any(k.lower() == "x-amz-date" for k, _ in fields)
    assert dict(fields)["Date"].endswith("-0000")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        signed = sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert signed.timestamp == "20260102T030405Z"


def _signed_with_date(date: str, timestamp: str) -> list[tuple[str, str]]:
    """A request whose Date field is `date`, signed by botocore's signer for `timestamp`."""
    request = AWSRequest("GET", "http://s3.local/b/k?uploadId=u",
                         headers={"Host": "s3.local", "Date": date,
                                  "X-Amz-Content-SHA256": sigv4.EMPTY_SHA256})
    request.context["timestamp"] = timestamp
    auth = S3SigV4Auth(Credentials(KEY, SECRET), "s3", "us-east-1")
    signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    names = ";".join(sorted(k.lower() for k in request.headers))
    return [*request.headers.items(),
            ("Authorization", f"AWS4-HMAC-SHA256 Credential={KEY}/{timestamp[:8]}/us-east-1/s3/"
                              f"aws4_request, SignedHeaders={names}, Signature={signature}")]


def test_a_date_with_a_zone_is_converted_to_utc() -> None:
    fields = _signed_with_date("Fri, 02 Jan 2026 04:04:05 +0100", "20260102T030405Z")
    now = calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0))
    assert sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now).timestamp == \
        "20260102T030405Z"


@pytest.mark.parametrize("date", ["garbage", "Fri, 32 Jan 2026 04:04:05 GMT", ""])
def test_an_unreadable_date_is_access_denied(date: str) -> None:
    fields = _signed_with_date(date, "20260102T030405Z")
    assert refusal(fields, calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0)))[:2] == ("AccessDenied", 403)


def test_an_empty_path_is_the_root() -> None:
    fields, now = fixed_request(url="http://s3.local/?uploads")
    assert sigv4.verify("GET", "", "uploads", fields, SECRETS, now).access_key == KEY


def test_an_encoded_slash_stays_encoded_in_the_canonical_spelling() -> None:
    fields, now = fixed_request(url="http://s3.local/b/a%2Fb%21")
    assert sigv4.verify("GET", "/b/a%2Fb!", "", fields, SECRETS, now).access_key == KEY
    with pytest.raises(ShimError):
        sigv4.verify("GET", "/b/a/b!", "", fields, SECRETS, now)


def test_the_trailer_signature_covers_every_trailer_line_in_order() -> None:
    fields, now = fixed_request()
    signed = sigv4.verify("GET", "/b/k", "uploadId=u", fields, SECRETS, now)
    signer = sigv4.ChunkSigner(signed)
    trailers = [("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-meta-é", "1")]
    digest = hashlib.sha256("x-amz-checksum-crc32:AAAAAA==\nx-amz-meta-é:1\n".encode()).hexdigest()
    string_to_sign = (f"AWS4-HMAC-SHA256-TRAILER\n{signed.timestamp}\n{signed.scope}\n"
                      f"{signed.signature}\n{digest}")
    expected = hmac.new(signed.signing_key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    assert signer.trailer_signature(trailers) == expected
    with pytest.raises(ShimError) as raised:
        signer.verify_trailer(list(reversed(trailers)), expected)
    assert (raised.value.code, raised.value.status, raised.value.message) == (
        "SignatureDoesNotMatch", 403, "The trailer signature we calculated does not match the "
        "x-amz-trailer-signature you provided.")
    with pytest.raises(ShimError) as raised:
        signer.verify_chunk(sigv4.EMPTY_SHA256, "0" * 64)
    assert (raised.value.code, raised.value.status, raised.value.message) == (
        "SignatureDoesNotMatch", 403, "The chunk signature we calculated does not match the "
        "chunk-signature you provided.")
