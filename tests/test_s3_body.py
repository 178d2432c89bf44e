"""Pure tests of S3 request bodies (shim/protocols/s3/body.py): the aws-chunked decoder and
the payload's digests.

Bodies come from botocore where it makes them (`AwsChunkedWrapper`, and a boto3 client's
requests captured before they are sent), from AWS's documented examples for signed chunks
("Example: PUT Object" in the chunked-upload and trailing-header pages), and by hand for
the malformed ones. Every split of a body into two pieces must decode the same.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import io
import itertools
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum, Sha1Checksum, Sha256Checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.errors import ShimError
from shim.protocols.s3 import sigv4
from shim.protocols.s3.body import AwsChunkedDecoder, BodyDigests

AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_TIME = "20130524T000000Z"
AWS_NOW = calendar.timegm(time.strptime(AWS_TIME, sigv4.TIMESTAMP_FORMAT))
AWS_DATA = b"a" * 66560
AWS_CRC32C = "sOO8/Q=="  # CRC-32C of AWS_DATA, as the trailer example gives it


def aws_signed(payload: str = sigv4.STREAMING_PAYLOAD) -> sigv4.Signed:
    """The verified request of AWS's "Example: PUT Object" (and its trailer variant)."""
    trailer = payload == sigv4.STREAMING_PAYLOAD_TRAILER
    signed = ("content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
              "x-amz-storage-class;x-amz-trailer" if trailer else
              "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
              "x-amz-decoded-content-length;x-amz-storage-class")
    seed = ("106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e" if trailer else
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9")
    fields = [("Host", "s3.amazonaws.com"), ("x-amz-date", AWS_TIME),
              ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
              ("Authorization", f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/20130524/us-east-1/s3/"
                                f"aws4_request,SignedHeaders={signed},Signature={seed}"),
              ("x-amz-content-sha256", payload), ("Content-Encoding", "aws-chunked"),
              ("x-amz-decoded-content-length", "66560"),
              ("x-amz-trailer", "x-amz-checksum-crc32c") if trailer else ("Content-Length", "66824")]
    return sigv4.verify("PUT", "/examplebucket/chunkObject.txt", "", fields,
                        {AWS_KEY: AWS_SECRET}, AWS_NOW)


AWS_BODY = (b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
            b"\r\n" + b"a" * 65536 + b"\r\n"
            b"400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
            b"\r\n" + b"a" * 1024 + b"\r\n"
            b"0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"
            b"\r\n\r\n")
AWS_TRAILER_BODY = (
    b"10000;chunk-signature=b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2"
    b"\r\n" + b"a" * 65536 + b"\r\n"
    b"400;chunk-signature=1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7"
    b"\r\n" + b"a" * 1024 + b"\r\n"
    b"0;chunk-signature=2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992\r\n"
    b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
    b"x-amz-trailer-signature:d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435\r\n"
    b"\r\n")


def decode(body: bytes, pieces: Sequence[int] = (), **options: Any) -> tuple[bytes, dict[str, str]]:
    """Decode `body` fed cut at the offsets `pieces`; return (payload, trailers)."""
    decoder = AwsChunkedDecoder(**options)
    cuts = [0, *pieces, len(body)]
    payload = b"".join(decoder.feed(body[a:b]) for a, b in itertools.pairwise(cuts))
    return payload, decoder.end()


def refused(body: bytes, **options: Any) -> ShimError:
    with pytest.raises(ShimError) as raised:
        decode(body, **options)
    return raised.value


def botocore_body(payload: bytes, chunk_size: int, checksum: Any = Crc32Checksum,
                  name: str = "x-amz-checksum-crc32") -> bytes:
    """The aws-chunked body botocore sends for `payload` (with a trailing checksum)."""
    return bytes(AwsChunkedWrapper(io.BytesIO(payload), checksum_cls=checksum,
                                   checksum_name=name, chunk_size=chunk_size).read())


def signed_body(payload: bytes, sizes: Sequence[int], signed: sigv4.Signed,
                trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """An aws-chunked body with chunk signatures, as the AWS pages define it."""
    signer = sigv4.ChunkSigner(signed)
    out, start = [], 0
    for size in [*sizes, 0]:
        data = payload[start:start + size]
        start += size
        signer.previous = signer.chunk_signature(hashlib.sha256(data).hexdigest())
        out.append(f"{size:x};chunk-signature={signer.previous}\r\n".encode() + data +
                   (b"\r\n" if size else b""))
    for name, value in trailers:
        out.append(f"{name}:{value}\r\n".encode())
    if signer.trailer_signed:
        out.append(f"x-amz-trailer-signature:{signer.trailer_signature(trailers)}\r\n".encode())
    return b"".join([*out, b"\r\n"])


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def crc32(data: bytes) -> str:
    return b64(zlib.crc32(data).to_bytes(4, "big"))


# --- decoding ------------------------------------------------------------------------------------


def test_a_botocore_body_decodes_with_its_trailer() -> None:
    payload = bytes(range(256)) * 40
    body = botocore_body(payload, 1000)
    assert decode(body, decoded_length=len(payload)) == (payload, {"x-amz-checksum-crc32":
                                                                   crc32(payload)})


@pytest.mark.parametrize(("checksum", "name"), [(Crc32Checksum, "x-amz-checksum-crc32"),
                                                (Sha1Checksum, "x-amz-checksum-sha1"),
                                                (Sha256Checksum, "x-amz-checksum-sha256")])
def test_every_split_of_a_small_botocore_body_decodes_the_same(checksum: Any, name: str) -> None:
    payload = b"0123456789abcdefghij"
    body = botocore_body(payload, 7, checksum, name)
    expected = decode(body)
    assert expected[0] == payload and set(expected[1]) == {name}
    for cut in range(len(body) + 1):
        assert decode(body, [cut]) == expected, cut
    for first in range(0, len(body) + 1, 3):
        for second in range(first, len(body) + 1):
            assert decode(body, [first, second]) == expected, (first, second)


def test_an_empty_payload_is_one_terminating_chunk() -> None:
    assert decode(botocore_body(b"", 5), decoded_length=0) == (b"", {"x-amz-checksum-crc32":
                                                                     crc32(b"")})
    assert decode(b"0\r\n\r\n") == (b"", {})


def test_the_aws_signed_example_decodes_and_verifies() -> None:
    assert decode(AWS_BODY, signer=sigv4.ChunkSigner(aws_signed()), decoded_length=66560) == (
        AWS_DATA, {})
    decoder = AwsChunkedDecoder(sigv4.ChunkSigner(aws_signed()), 66560)
    assert b"".join(decoder.feed(AWS_BODY[i:i + 1]) for i in range(len(AWS_BODY))) == AWS_DATA
    assert decoder.end() == {}


def test_the_aws_trailer_example_decodes_and_its_checksum_verifies() -> None:
    assert len(AWS_TRAILER_BODY) == 66946
    payload, trailers = decode(AWS_TRAILER_BODY, [65000, 66900],
                               signer=sigv4.ChunkSigner(aws_signed(sigv4.STREAMING_PAYLOAD_TRAILER)),
                               decoded_length=66560)
    assert payload == AWS_DATA and trailers == {"x-amz-checksum-crc32c": AWS_CRC32C}
    digests = BodyDigests.from_fields([("x-amz-trailer", "x-amz-checksum-crc32c")], True)
    digests.update(payload)
    assert digests.end(trailers) == hashlib.md5(AWS_DATA).hexdigest()


def test_a_trailer_after_an_empty_line_is_read_too() -> None:
    """Some encoders end the chunks with `0...\\r\\n\\r\\n` and put the trailer after it."""
    body = AWS_TRAILER_BODY.replace(b"\r\nx-amz-checksum", b"\r\n\r\nx-amz-checksum")[:-2]
    payload, trailers = decode(body, signer=sigv4.ChunkSigner(
        aws_signed(sigv4.STREAMING_PAYLOAD_TRAILER)))
    assert payload == AWS_DATA and trailers == {"x-amz-checksum-crc32c": AWS_CRC32C}


def test_every_split_of_a_small_signed_body_verifies() -> None:
    signed = aws_signed(sigv4.STREAMING_PAYLOAD_TRAILER)
    payload = b"hello, signed world"
    body = signed_body(payload, [5, 9, 5], signed, [("x-amz-checksum-crc32", crc32(payload))])
    expected = (payload, {"x-amz-checksum-crc32": crc32(payload)})
    for cut in range(len(body) + 1):
        assert decode(body, [cut], signer=sigv4.ChunkSigner(signed),
                      decoded_length=len(payload)) == expected, cut


def test_the_last_crlf_may_be_missing() -> None:
    assert decode(b"3\r\nabc\r\n0\r\n") == (b"abc", {})
    assert decode(b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n") == (
        b"abc", {"x-amz-checksum-crc32": "AAAAAA=="})


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=3000), chunk=st.integers(1, 700),
       cuts=st.lists(st.integers(0, 4000), max_size=6), signed=st.booleans())
def test_any_split_decodes_the_same(payload: bytes, chunk: int, cuts: list[int],
                                    signed: bool) -> None:
    if signed:
        sizes = [len(payload[i:i + chunk]) for i in range(0, len(payload), chunk)]
        body = signed_body(payload, sizes, aws_signed())
        options: dict[str, Any] = {"signer": sigv4.ChunkSigner(aws_signed())}
    else:
        body, options = botocore_body(payload, chunk), {}
    pieces = sorted(min(cut, len(body)) for cut in cuts)
    decoded, trailers = decode(body, pieces, decoded_length=len(payload), **options)
    assert decoded == payload
    assert trailers == ({} if signed else {"x-amz-checksum-crc32": crc32(payload)})


def test_memory_stays_small_whatever_the_body() -> None:
    decoder = AwsChunkedDecoder()
    for _ in range(64):  # 64 MiB through, 1 MiB at a time
        out = decoder.feed(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
        assert len(out) == 0x100000
        assert len(decoder._line) <= 4096
    decoder.feed(b"0\r\n\r\n")
    assert decoder.end() == {} and decoder.decoded == 64 * 1024 * 1024


# --- malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code"), [
    (b"zz\r\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"\r\n", "InvalidChunkSizeError"),
    (b"-3\r\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b" 3\r\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"0x3\r\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"1" * 17 + b"\r\n", "InvalidChunkSizeError"),
    (b"3;" + b"x" * 5000 + b"\r\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"3\nabc\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"3\r\nabcd\r\n0\r\n\r\n", "InvalidChunkSizeError"),
    (b"3\r\nabc0\r\n\r\n", "InvalidChunkSizeError"),
    (b"4000001\r\n", "InvalidChunkSizeError"),  # over the 64 MiB chunk limit
    (b"", "IncompleteBody"),
    (b"5", "IncompleteBody"),
    (b"5\r\nab", "IncompleteBody"),
    (b"5\r\nabcde", "IncompleteBody"),
    (b"5\r\nabcde\r\n", "IncompleteBody"),
    (b"5\r\nabcde\r\n0\r\nx-amz-checksum-crc32:AAAA", "IncompleteBody"),
    (b"0\r\nno-colon\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\nbad name:1\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\n:1\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\nx-a:\xff\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\nx-a:1\r\nX-A:2\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\n" + b"".join(b"x-%d:1\r\n" % i for i in range(17)) + b"\r\n", "MalformedTrailerError"),
    (b"0\r\nx-a:" + b"1" * 5000 + b"\r\n\r\n", "MalformedTrailerError"),
    (b"0\r\nx-a:1\r\n\r\nmore", "InvalidRequest"),
    (b"0\r\n\r\nnot a trailer\r\n", "MalformedTrailerError"),
])
def test_malformed_bodies_are_refused_with_s3s_codes(body: bytes, code: str) -> None:
    error = refused(body)
    assert (error.code, error.status) == (code, 400)


def test_a_chunk_over_the_limit_is_refused_before_its_data() -> None:
    decoder = AwsChunkedDecoder(max_chunk=10)
    assert decoder.feed(b"a\r\n0123456789\r\n") == b"0123456789"
    with pytest.raises(ShimError) as raised:
        decoder.feed(b"b\r\n")
    assert raised.value.code == "InvalidChunkSizeError"


def test_the_decoded_length_must_be_the_payloads() -> None:
    body = botocore_body(b"12345", 2)
    assert refused(body, decoded_length=6).code == "IncompleteBody"
    assert refused(body, decoded_length=4).code == "InvalidRequest"
    assert decode(body, decoded_length=5)[0] == b"12345"


def signed_refusal(body: bytes, payload: str = sigv4.STREAMING_PAYLOAD) -> ShimError:
    return refused(body, signer=sigv4.ChunkSigner(aws_signed(payload)))


def test_a_changed_byte_fails_its_chunk_signature() -> None:
    for offset in (100, 65700, len(AWS_BODY) - 10):
        body = AWS_BODY[:offset] + b"b" + AWS_BODY[offset + 1:]
        error = signed_refusal(body)
        assert (error.code, error.status) == ("SignatureDoesNotMatch", 403), offset
    # the terminating chunk's signature: its size line is intact, its signature changed
    assert signed_refusal(AWS_BODY.replace(b"b6c6ea8a", b"b6c6ea8b")).code == \
        "SignatureDoesNotMatch"


def test_chunks_in_another_order_fail() -> None:
    first = AWS_BODY[:AWS_BODY.index(b"400;")]
    second = AWS_BODY[AWS_BODY.index(b"400;"):AWS_BODY.index(b"0;chunk")]
    assert signed_refusal(second + first + AWS_BODY[AWS_BODY.index(b"0;chunk"):]).code == \
        "SignatureDoesNotMatch"


@pytest.mark.parametrize("body", [
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3;chunk-signature=\r\nabc\r\n0\r\n\r\n",
    b"3;chunk-signature=" + b"G" * 64 + b"\r\nabc\r\n0\r\n\r\n",
])
def test_a_signed_body_needs_every_chunk_signature(body: bytes) -> None:
    assert (signed_refusal(body).code, signed_refusal(body).status) == ("SignatureDoesNotMatch", 403)


def test_a_signed_trailer_is_verified() -> None:
    wrong = AWS_TRAILER_BODY.replace(b"sOO8/Q==", b"AAAAAA==")
    assert signed_refusal(wrong, sigv4.STREAMING_PAYLOAD_TRAILER).code == "SignatureDoesNotMatch"
    start = AWS_TRAILER_BODY.index(b"x-amz-trailer-signature")
    unsigned = AWS_TRAILER_BODY[:start] + b"\r\n"
    assert signed_refusal(unsigned, sigv4.STREAMING_PAYLOAD_TRAILER).code == "SignatureDoesNotMatch"
    added = AWS_TRAILER_BODY[:start] + b"x-amz-extra:1\r\n" + AWS_TRAILER_BODY[start:]
    assert signed_refusal(added, sigv4.STREAMING_PAYLOAD_TRAILER).code == "SignatureDoesNotMatch"


def test_trailers_after_signed_chunks_need_the_trailer_payload() -> None:
    body = AWS_BODY[:-2] + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    assert signed_refusal(body).code == "MalformedTrailerError"


def test_unsigned_bodies_ignore_chunk_signatures() -> None:
    assert decode(AWS_BODY.replace(b"ad80c730", b"00000000")) == (AWS_DATA, {})


# --- digests -------------------------------------------------------------------------------------


def digests_of(fields: list[tuple[str, str]], payload: bytes, trailers: dict[str, str] | None = None,
               chunked: bool = False) -> str:
    digests = BodyDigests.from_fields(fields, trailers_expected=chunked)
    for i in range(0, len(payload), 7):
        digests.update(payload[i:i + 7])
    return digests.end(trailers or {})


def digest_refusal(fields: list[tuple[str, str]], payload: bytes = b"payload",
                   trailers: dict[str, str] | None = None, chunked: bool = False) -> ShimError:
    with pytest.raises(ShimError) as raised:
        digests_of(fields, payload, trailers, chunked)
    return raised.value


class _Raw:
    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def boto3_sent(call: Callable[[Any], Any], endpoint: str) -> tuple[list[tuple[str, str]], bytes]:
    """The fields and body of the request boto3 sends for `call(client)`, not sent anywhere."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="AKID", aws_secret_access_key="secret",
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1, "mode": "standard"}))
    sent: list[tuple[list[tuple[str, str]], bytes]] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        body = request.body.read() if hasattr(request.body, "read") else request.body or b""
        fields = [(k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()]
        sent.append((fields, bytes(body)))
        return AWSResponse(request.url, 200, {"ETag": '"0"'}, _Raw())

    client.meta.events.register("before-send.s3", capture)
    call(client)
    return sent[0]


PAYLOAD = b"The quick brown fox jumps over the lazy dog" * 100


@pytest.mark.parametrize("algorithm", [None, "CRC32", "SHA1", "SHA256"])
def test_a_plain_body_boto3_sends_checks_out(algorithm: str | None) -> None:
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    fields, body = boto3_sent(lambda c: c.upload_part(
        Bucket="b", Key="k", UploadId="u", PartNumber=1, Body=PAYLOAD,
        ContentMD5=b64(hashlib.md5(PAYLOAD).digest()), **extra), "http://127.0.0.1:9")
    assert body == PAYLOAD
    assert digests_of(fields, body) == hashlib.md5(PAYLOAD).hexdigest()
    changed = PAYLOAD[:-1] + b"!"
    assert digest_refusal(fields, changed).code == "BadDigest"  # Content-MD5 is checked first
    without_md5 = [(k, v) for k, v in fields if k.lower() != "content-md5"]
    assert digest_refusal(without_md5, changed).code == "XAmzContentSHA256Mismatch"
    unsigned = [(k, "UNSIGNED-PAYLOAD" if k.lower() == "x-amz-content-sha256" else v)
                for k, v in without_md5]
    if algorithm is not None or any(k.lower().startswith("x-amz-checksum-") for k, _ in fields):
        error = digest_refusal(unsigned, changed)
        assert (error.code, error.status) == ("BadDigest", 400)
        assert "did not match the calculated checksum" in error.message
    else:
        assert digests_of(unsigned, changed) == hashlib.md5(changed).hexdigest()


@pytest.mark.parametrize("algorithm", [None, "CRC32", "SHA1", "SHA256"])
def test_an_aws_chunked_body_boto3_sends_over_https_checks_out(algorithm: str | None) -> None:
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    fields, body = boto3_sent(lambda c: c.put_object(Bucket="b", Key="k", Body=PAYLOAD, **extra),
                              "https://127.0.0.1:9")
    field = dict((k.lower(), v) for k, v in fields)
    assert field["content-encoding"] == "aws-chunked"
    assert field["x-amz-content-sha256"] == sigv4.STREAMING_UNSIGNED_TRAILER
    trailer = field["x-amz-trailer"]
    payload, trailers = decode(body, [len(body) // 3, len(body) - 5],
                               decoded_length=int(field["x-amz-decoded-content-length"]))
    assert payload == PAYLOAD and set(trailers) == {trailer}
    assert digests_of(fields, payload, trailers, chunked=True) == hashlib.md5(PAYLOAD).hexdigest()
    error = digest_refusal(fields, PAYLOAD.upper(), trailers, chunked=True)
    assert (error.code, error.status) == ("BadDigest", 400)


@pytest.mark.parametrize(("name", "value", "data"), [
    ("x-amz-checksum-crc32", "y/Q5Jg==", b"123456789"),  # CRC-32 check value 0xCBF43926
    ("x-amz-checksum-crc32c", "4waSgw==", b"123456789"),  # CRC-32C check value 0xE3069283
    ("x-amz-checksum-crc32c", AWS_CRC32C, AWS_DATA),
    ("x-amz-checksum-sha1", b64(hashlib.sha1(b"x").digest()), b"x"),
    ("x-amz-checksum-sha256", b64(hashlib.sha256(b"x").digest()), b"x"),
    ("x-amz-checksum-sha512", b64(hashlib.sha512(b"x").digest()), b"x"),
    ("x-amz-checksum-md5", b64(hashlib.md5(b"x").digest()), b"x"),
])
def test_each_checksum_is_verified_in_a_field_or_a_trailer(name: str, value: str,
                                                           data: bytes) -> None:
    md5 = hashlib.md5(data).hexdigest()
    assert digests_of([(name.upper(), value)], data) == md5
    assert digest_refusal([(name, value)], data + b"!").code == "BadDigest"
    assert digests_of([("x-amz-trailer", name)], data, {name: value}, chunked=True) == md5
    error = digest_refusal([("x-amz-trailer", name)], data + b"!", {name: value}, chunked=True)
    assert (error.code, error.status) == ("BadDigest", 400)
    digests = BodyDigests.from_fields([(name, value)], False)
    digests.update(data)
    digests.end()
    assert digests.checksums() == {name: value}


@pytest.mark.parametrize("name", ["x-amz-checksum-crc64nvme", "x-amz-checksum-xxhash64"])
def test_checksums_the_shim_cannot_compute_are_accepted_unverified(name: str) -> None:
    """CRC-64/NVME and XXHASH need awscrt: not verified (the MD5 still is)."""
    assert digests_of([(name, "AAAAAAAAAAA=")], b"x") == hashlib.md5(b"x").hexdigest()
    assert digests_of([("x-amz-trailer", name)], b"x", {name: "AAAAAAAAAAA="}, chunked=True)
    assert digest_refusal([(name, "AAAA")]).code == "InvalidRequest"  # still 8 bytes


def test_content_md5_must_be_base64_of_sixteen_bytes() -> None:
    for value in ("abc", "not base64!", b64(b"x" * 15), b64(b"x" * 17), hashlib.md5(b"").hexdigest()):
        error = digest_refusal([("Content-MD5", value)])
        assert (error.code, error.status) == ("InvalidDigest", 400), value
    assert digest_refusal([("Content-MD5", b64(hashlib.md5(b"other").digest()))]).code == "BadDigest"


def test_x_amz_content_sha256_is_a_digest_or_a_keyword() -> None:
    for keyword in sorted(sigv4.PAYLOAD_KEYWORDS):
        assert digests_of([("x-amz-content-sha256", keyword)], b"x") == hashlib.md5(b"x").hexdigest()
    upper = hashlib.sha256(b"x").hexdigest().upper()
    assert digests_of([("x-amz-content-sha256", upper)], b"x") == hashlib.md5(b"x").hexdigest()
    error = digest_refusal([("x-amz-content-sha256", "abc")])
    assert (error.code, error.status) == ("InvalidArgument", 400)


@pytest.mark.parametrize(("fields", "chunked", "trailers"), [
    ([("x-amz-trailer", "x-amz-checksum-crc32")], False, {}),  # no aws-chunked body
    ([("x-amz-trailer", "x-amz-meta-color")], True, {}),
    ([("x-amz-trailer", "x-amz-checksum-crc16")], True, {}),
    ([("x-amz-trailer", "x-amz-checksum-crc32")], True, {}),  # announced, never came
    ([("x-amz-trailer", "x-amz-checksum-crc32")], True, {"x-amz-checksum-crc32": "%%%"}),
    ([("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-sha1", "A" * 27 + "=")], False, {}),
    ([("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-trailer", "x-amz-checksum-crc32")], True, {}),
    ([("x-amz-checksum-crc32", "AAAAAAAA")], False, {}),
    ([("x-amz-checksum-crc32", "AAAAAA==="), ], False, {}),
    ([("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg=="), ("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")],
     False, {}),
])
def test_checksum_announcements_s3_refuses(fields: list[tuple[str, str]], chunked: bool,
                                           trailers: dict[str, str]) -> None:
    error = digest_refusal(fields, b"", trailers, chunked)
    assert (error.code, error.status) == ("InvalidRequest", 400)


def test_fields_that_only_name_an_algorithm_are_not_checksums() -> None:
    fields = [("x-amz-sdk-checksum-algorithm", "CRC32"), ("x-amz-checksum-algorithm", "CRC32"),
              ("x-amz-checksum-type", "FULL_OBJECT"), ("x-amz-checksum-mode", "ENABLED")]
    assert digests_of(fields, b"x") == hashlib.md5(b"x").hexdigest()


# --- what each refusal says ---------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code", "message"), [
    (b"zz\r\n", "InvalidChunkSizeError", "The chunk size b'zz' is not 1 to 16 hexadecimal digits."),
    (b"y" * 40 + b"\r\n", "InvalidChunkSizeError",
     f"The chunk size {b'y' * 32!r} is not 1 to 16 hexadecimal digits."),
    (b"4000001\r\n", "InvalidChunkSizeError", "A chunk of 67108865 bytes is larger than 67108864."),
    (b"3\r\nabcd\r\n", "InvalidChunkSizeError", "A chunk carries more data than its size."),
    (b"3;" + b"x" * 5000, "InvalidChunkSizeError", "A chunk-size line is longer than 4 KiB."),
    (b"3\n", "InvalidChunkSizeError", "A chunk-size line does not end in CRLF."),
    (b"3\r\nabc\n", "InvalidChunkSizeError", "A chunk-size line does not end in CRLF."),
    (b"0\r\nx-a:1\n", "MalformedTrailerError", "A trailer line does not end in CRLF."),
    (b"0\r\nx-a:" + b"1" * 5000, "MalformedTrailerError", "A trailer line is longer than 4 KiB."),
    (b"0\r\nno-colon\r\n", "MalformedTrailerError", "A trailer line is not name:value."),
    (b"0\r\nx-a:1\r\nX-A:2\r\n", "MalformedTrailerError", "Too many trailers, or x-a twice."),
    (b"0\r\nx-a:1\r\n\r\nmore", "InvalidRequest", "The aws-chunked body goes on after its end."),
    (b"5\r\nab", "IncompleteBody", "The aws-chunked body ended inside a chunk."),
])
def test_each_malformed_body_says_what_is_wrong(body: bytes, code: str, message: str) -> None:
    decoder = AwsChunkedDecoder()
    with pytest.raises(ShimError) as raised:
        decoder.feed(body)
        decoder.end()
    assert (raised.value.code, raised.value.status, raised.value.message) == (code, 400, message)


def test_a_length_other_than_the_decoded_length_says_both() -> None:
    body = botocore_body(b"12345", 2)
    assert (refused(body, decoded_length=6).message, refused(body, decoded_length=6).status) == (
        "The body carries 5 bytes, x-amz-decoded-content-length said 6.", 400)
    error = refused(body, decoded_length=4)
    assert (error.code, error.status, error.message) == (
        "InvalidRequest", 400, "The aws-chunked body is longer than x-amz-decoded-content-length (4).")


def test_a_body_is_over_at_its_end() -> None:
    decoder = AwsChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n") == b"abc"
    assert decoder.end() == {}
    with pytest.raises(ShimError) as raised:
        decoder.feed(b"\r\n")
    assert raised.value.code == "InvalidRequest"


@pytest.mark.parametrize("step", [1, 7, 3000, 4096, 4097, 1 << 20])
def test_a_line_of_4_kib_and_its_line_end_is_the_longest_read(step: int) -> None:
    for total, fits in ((4096, True), (4097, True), (4098, False)):
        line = b"x-a:" + b"1" * (total - 6) + b"\r\n"
        body = b"3\r\nabc\r\n0\r\n" + line + b"\r\n"
        decoder = AwsChunkedDecoder()
        try:
            payload = b"".join(decoder.feed(body[i:i + step]) for i in range(0, len(body), step))
            trailers = decoder.end()
        except ShimError as error:
            assert not fits and error.message == "A trailer line is longer than 4 KiB.", (total, step)
        else:
            assert fits and payload == b"abc" and trailers == {"x-a": "1" * (total - 6)}, (total, step)


def test_a_trailer_value_may_hold_a_colon_and_other_extensions_are_ignored() -> None:
    assert decode(b"3;foo=bar;baz\r\nabc\r\n0\r\nx-a: 1:2 \r\n\r\n") == (b"abc", {"x-a": "1:2"})


def test_a_signed_chunk_finds_its_signature_among_other_extensions() -> None:
    body = AWS_BODY.replace(b";chunk-signature=", b";x=1; chunk-signature = ")
    assert decode(body, signer=sigv4.ChunkSigner(aws_signed()), decoded_length=66560) == (AWS_DATA, {})


def test_a_signed_chunk_without_its_signature_says_so() -> None:
    error = signed_refusal(b"3\r\nabc\r\n0\r\n\r\n")
    assert (error.code, error.status, error.message) == (
        "SignatureDoesNotMatch", 403, "A chunk carries no valid chunk-signature.")


def test_signed_trailer_refusals_say_why() -> None:
    start = AWS_TRAILER_BODY.index(b"x-amz-trailer-signature")
    error = signed_refusal(AWS_TRAILER_BODY[:start] + b"\r\n", sigv4.STREAMING_PAYLOAD_TRAILER)
    assert (error.code, error.status, error.message) == (
        "SignatureDoesNotMatch", 403, "The signed trailer carries no x-amz-trailer-signature.")
    error = signed_refusal(AWS_BODY[:-2] + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n")
    assert (error.code, error.status, error.message) == (
        "MalformedTrailerError", 400,
        "Trailers need the STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER payload.")


def test_digest_refusals_say_which_digest() -> None:
    md5 = b64(hashlib.md5(b"other").digest())
    error = digest_refusal([("Content-MD5", md5)])
    assert (error.code, error.status, error.message) == (
        "BadDigest", 400, "The Content-MD5 you specified did not match what we received.")
    error = digest_refusal([("x-amz-content-sha256", hashlib.sha256(b"other").hexdigest())])
    assert (error.code, error.status, error.message) == (
        "XAmzContentSHA256Mismatch", 400,
        "The provided 'x-amz-content-sha256' header does not match what was computed.")
    error = digest_refusal([("x-amz-checksum-sha1", b64(hashlib.sha1(b"other").digest()))])
    assert error.message == "The SHA1 you specified did not match the calculated checksum."


def test_the_digests_count_the_payload() -> None:
    digests = BodyDigests.from_fields([], trailers_expected=False)
    digests.update(b"abc")
    digests.update(b"de")
    assert digests.size == 5 and digests.end() == hashlib.md5(b"abcde").hexdigest()


def test_a_body_longer_than_announced_is_refused_before_its_extra_data() -> None:
    decoder = AwsChunkedDecoder(decoded_length=4)
    assert decoder.feed(b"2\r\nab\r\n2\r\ncd\r\n") == b"abcd"
    with pytest.raises(ShimError) as raised:
        decoder.feed(b"1\r\n")
    assert raised.value.code == "InvalidRequest"


@pytest.mark.parametrize(("fields", "chunked", "trailers", "code", "message"), [
    ([("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg==!")], False, {}, "InvalidDigest",
     "The Content-MD5 you specified is not valid."),
    ([("Content-MD5", "1B2M2Y8A sgTpgAmY7PhCfg==")], False, {}, "InvalidDigest",
     "The Content-MD5 you specified is not valid."),
    ([("Content-MD5", "AA=="), ("Content-MD5", "AA==")], False, {}, "InvalidRequest",
     "The request carries content-md5 more than once."),
    ([("x-amz-content-sha256", "abc")], False, {}, "InvalidArgument",
     "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, a STREAMING- value, or a valid sha256 value."),
    ([("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-sha1", "A" * 27 + "=")], False, {},
     "InvalidRequest",
     "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."),
    ([("x-amz-trailer", "x-amz-checksum-crc32,x-amz-checksum-sha1")], True, {}, "InvalidRequest",
     "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."),
    ([("x-amz-trailer", "x-amz-meta-color")], True, {}, "InvalidRequest",
     "The trailer 'x-amz-meta-color' is not a checksum S3 defines."),
    ([("x-amz-trailer", "x-amz-checksum-crc32")], False, {}, "InvalidRequest",
     "x-amz-trailer needs an aws-chunked body."),
    ([("x-amz-trailer", "x-amz-checksum-crc32")], True, {}, "InvalidRequest",
     "The trailer x-amz-checksum-crc32 announced by x-amz-trailer is missing."),
    ([("x-amz-checksum-crc32", "AAAAAAAA")], False, {}, "InvalidRequest",
     "Value for x-amz-checksum-crc32 header is invalid."),
])
def test_each_digest_announcement_refused_says_why(fields: list[tuple[str, str]], chunked: bool,
                                                   trailers: dict[str, str], code: str,
                                                   message: str) -> None:
    error = digest_refusal(fields, b"", trailers, chunked)
    assert (error.code, error.status, error.message) == (code, 400, message)
