"""End to end: boto3 through a real shim (mitmdump) speaking the S3 multipart upload API, in
front of a whole-file legacy server that counts what it gets.

Every test asserts what a user would notice: boto3's calls succeed (or fail with the S3
error code an SDK reports), and the legacy server gets each object exactly once, whole and
byte-exact, at the configured path, with the key's own headers and never the client's S3
signature or any `x-amz-*` field but the object's metadata.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import PayloadFactory, ShimLauncher, ShimProcess, sha256_of, subprocess_env
from tests.legacy_servers import LegacyServer
from tests.links import MakeProxy
from tests.pki import issue, make_ca

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
KEY_ID, SECRET = "AKIDSHIMTEST0001", "shim-test-secret-0001"
OTHER_ID, OTHER_SECRET = "AKIDSHIMTEST0002", "shim-test-secret-0002"
LEGACY_TOKEN = "Bearer legacy-token-for-0001"
BUCKET = "site-photos"
S3_CONFIG: dict[str, Any] = {"s3": {
    "paths": ["/s3/"],
    "credentials": [
        {"access_key": KEY_ID, "secret": SECRET, "forward_headers": {"Authorization": LEGACY_TOKEN}},
        {"access_key": OTHER_ID, "secret": OTHER_SECRET},
    ],
}}
TRANSFER = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB,
                          max_concurrency=4)


def client(url: str, key_id: str = KEY_ID, secret: str = SECRET, **extra: Any) -> BaseClient:
    """A boto3 S3 client for the shim at `url` (path-style, any region)."""
    return boto3.client(
        "s3", endpoint_url=f"{url}/s3", aws_access_key_id=key_id, aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10,
                                                                  "mode": "standard"},
                      connect_timeout=10, read_timeout=60), **extra)


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def delivered(legacy: WholeFileServer) -> list[ReceivedRequest]:
    return [r for r in legacy.received if r.method == "PUT"]


def assert_once(legacy: WholeFileServer, file: Path, path: str) -> ReceivedRequest:
    """The legacy server got `file` once at `path`, byte-exact, with the key's own
    Authorization and no S3 field but the object's metadata."""
    [delivery] = delivered(legacy)
    assert (delivery.path, delivery.size, delivery.sha256) == (
        path, file.stat().st_size, sha256_of(file))
    assert delivery.complete
    assert delivery.header("Authorization") == LEGACY_TOKEN
    leaked = [name for name, _ in delivery.headers if name.lower().startswith("x-amz-")
              and not name.lower().startswith("x-amz-meta-")]
    assert leaked == []
    return delivery


@pytest.fixture
def s3_shim(shim: ShimLauncher) -> ShimProcess:
    return shim(S3_CONFIG)




def test_upload_file_in_parallel_parts_through_a_dropping_link_arrives_once(
        s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory,
        cutting_proxy: MakeProxy) -> None:
    """64 MiB in 8 MiB parts, 4 at a time, over a link that drops the connection carrying
    every 20th MiB: boto3 retries the parts cut off, and the file arrives once."""
    file = payload(64 * MIB)
    proxy = cutting_proxy(s3_shim.port, cut_every=20 * MIB)
    s3 = client(proxy.url)
    s3.upload_file(str(file), BUCKET, "jobs/2026/site a.bin", Config=TRANSFER,
                   ExtraArgs={"ContentType": "application/x-site", "Metadata": {"site": "A7"}})
    assert proxy.cuts >= 3
    delivery = assert_once(legacy, file, f"/uploads/{BUCKET}/jobs/2026/site%20a.bin")
    assert delivery.header("Content-Type") == "application/x-site"
    assert delivery.header("x-amz-meta-site") == "A7"
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_a_small_file_is_one_put_object(s3_shim: ShimProcess, legacy: WholeFileServer,
                                        payload: PayloadFactory) -> None:
    file = payload(300 * 1024)
    s3 = client(s3_shim.url)
    answer = s3.put_object(Bucket=BUCKET, Key="notes.txt", Body=file.read_bytes())
    assert answer["ETag"] == '"' + hashlib.md5(file.read_bytes()).hexdigest() + '"'
    assert_once(legacy, file, f"/uploads/{BUCKET}/notes.txt")


RESUME_SCRIPT = """
import json, sys, boto3
from botocore.config import Config
url, bucket, key, path, key_id, secret = sys.argv[1:7]
s3 = boto3.client("s3", endpoint_url=url + "/s3", aws_access_key_id=key_id,
                  aws_secret_access_key=secret, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
with open(path, "rb") as f:
    data = f.read()
part = 5 * 1024 * 1024
for number in (1, 3):
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                   Body=data[(number - 1) * part:number * part])
print(json.dumps({"upload_id": upload_id}))
"""


def test_a_new_process_lists_the_parts_uploads_the_rest_and_completes(
        s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory) -> None:
    """A first process uploads parts 1 and 3 and goes away; a second one finds the upload,
    lists its parts, sends the missing ones and completes it."""
    file = payload(17 * MIB)
    first = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, s3_shim.url, BUCKET, "big.iso",
                            str(file), KEY_ID, SECRET], capture_output=True, text=True,
                           timeout=120, env=subprocess_env(), check=False)
    assert first.returncode == 0, first.stderr
    upload_id = json.loads(first.stdout)["upload_id"]
    assert delivered(legacy) == []

    s3 = client(s3_shim.url)
    [found] = s3.list_multipart_uploads(Bucket=BUCKET)["Uploads"]
    assert (found["Key"], found["UploadId"]) == ("big.iso", upload_id)
    stored = {p["PartNumber"]: p for p in s3.list_parts(Bucket=BUCKET, Key="big.iso",
                                                        UploadId=upload_id)["Parts"]}
    assert sorted(stored) == [1, 3]
    data, part = file.read_bytes(), 5 * MIB
    etags = {n: p["ETag"] for n, p in stored.items()}
    for number in (2, 4):
        etags[number] = s3.upload_part(Bucket=BUCKET, Key="big.iso", UploadId=upload_id,
                                       PartNumber=number,
                                       Body=data[(number - 1) * part:number * part])["ETag"]
    done = s3.complete_multipart_upload(
        Bucket=BUCKET, Key="big.iso", UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]})
    assert done["ETag"].endswith('-4"')
    assert_once(legacy, file, f"/uploads/{BUCKET}/big.iso")


def test_a_wrong_secret_and_an_unknown_key_are_refused_as_s3_refuses_them(
        s3_shim: ShimProcess, legacy: WholeFileServer) -> None:
    with pytest.raises(ClientError) as wrong:
        client(s3_shim.url, secret="not-the-secret").put_object(Bucket=BUCKET, Key="a", Body=b"x")
    assert error_code(wrong) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as unknown:
        client(s3_shim.url, key_id="AKIDNOBODY").put_object(Bucket=BUCKET, Key="a", Body=b"x")
    assert error_code(unknown) == "InvalidAccessKeyId"
    assert legacy.received == []


def test_completion_checks_the_parts_it_lists(s3_shim: ShimProcess, legacy: WholeFileServer) -> None:
    s3 = client(s3_shim.url)
    upload_id = s3.create_multipart_upload(Bucket=BUCKET, Key="k")["UploadId"]
    small = s3.upload_part(Bucket=BUCKET, Key="k", UploadId=upload_id, PartNumber=1,
                           Body=b"a" * 1024)["ETag"]
    last = s3.upload_part(Bucket=BUCKET, Key="k", UploadId=upload_id, PartNumber=2,
                          Body=b"b" * 1024)["ETag"]

    def complete(parts: list[dict[str, Any]]) -> str:
        with pytest.raises(ClientError) as refused:
            s3.complete_multipart_upload(Bucket=BUCKET, Key="k", UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
        return error_code(refused)

    assert complete([{"PartNumber": 1, "ETag": '"' + "0" * 32 + '"'}]) == "InvalidPart"
    assert complete([{"PartNumber": 3, "ETag": last}]) == "InvalidPart"
    assert complete([{"PartNumber": 2, "ETag": last}, {"PartNumber": 1, "ETag": small}]) == \
        "InvalidPartOrder"
    assert complete([{"PartNumber": 1, "ETag": small}, {"PartNumber": 2, "ETag": last}]) == \
        "EntityTooSmall"
    s3.abort_multipart_upload(Bucket=BUCKET, Key="k", UploadId=upload_id)
    with pytest.raises(ClientError) as gone:
        s3.list_parts(Bucket=BUCKET, Key="k", UploadId=upload_id)
    assert error_code(gone) == "NoSuchUpload"
    assert legacy.received == []


def test_each_key_sees_only_its_own_uploads(s3_shim: ShimProcess) -> None:
    mine, theirs = client(s3_shim.url), client(s3_shim.url, OTHER_ID, OTHER_SECRET)
    upload_id = mine.create_multipart_upload(Bucket=BUCKET, Key="private.bin")["UploadId"]
    assert theirs.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    with pytest.raises(ClientError) as stranger:
        theirs.upload_part(Bucket=BUCKET, Key="private.bin", UploadId=upload_id, PartNumber=1,
                           Body=b"x")
    assert error_code(stranger) == "NoSuchUpload"
    assert [u["UploadId"] for u in mine.list_multipart_uploads(Bucket=BUCKET)["Uploads"]] == \
        [upload_id]


def test_a_refusal_by_the_legacy_server_is_an_s3_error_carrying_its_status(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    proc = shim(S3_CONFIG, upstream_url=recording_legacy.url)
    recording_legacy.set_mode("status:403")
    with pytest.raises(ClientError) as refused:
        client(proc.url).put_object(Bucket=BUCKET, Key="denied.bin", Body=b"x" * 1000)
    assert error_code(refused) == "LegacyServerRefused"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(recording_legacy.requests()) == 1


def test_over_https_parts_come_aws_chunked_with_trailing_checksums(
        shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
        tmp_path: Path) -> None:
    """Over HTTPS boto3 streams every body as `aws-chunked` with its CRC32 in a trailer
    (STREAMING-UNSIGNED-PAYLOAD-TRAILER): decoded as it arrives, checked, delivered once."""
    ca = make_ca(tmp_path / "pki", "s3-test-ca")
    cert = issue(ca, tmp_path / "pki", "shim", ip="127.0.0.1")
    proc = shim(S3_CONFIG, extra_args=["--set", f"certs=*={cert.bundle_pem}"])
    s3 = client(proc.url.replace("http://", "https://"), verify=str(ca.cert_pem))
    encodings: list[str] = []
    s3.meta.events.register("before-send", lambda request, **_: encodings.append(
        bytes(request.headers.get("Content-Encoding", b"")).decode()))
    big, small = payload(20 * MIB), payload(70 * 1024)
    s3.upload_file(str(big), BUCKET, "big.bin", Config=TRANSFER)
    s3.upload_file(str(small), BUCKET, "small.bin", Config=TRANSFER)
    assert encodings.count("aws-chunked") == 4  # three parts and the small object
    [first, second] = delivered(legacy)
    assert (first.path, first.sha256) == (f"/uploads/{BUCKET}/big.bin", sha256_of(big))
    assert (second.path, second.sha256) == (f"/uploads/{BUCKET}/small.bin", sha256_of(small))


def test_head_object_describes_what_was_delivered_and_nothing_else(
        s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory) -> None:
    """A tool that checks its upload (rclone HEADs the object) finds the object the shim
    delivered, with its size, ETag and metadata; an object it never got is 404, and another
    key's objects are not there for it. Buckets always exist."""
    s3 = client(s3_shim.url)
    s3.create_bucket(Bucket=BUCKET)
    s3.head_bucket(Bucket=BUCKET)
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=BUCKET, Key="never.bin")
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    file = payload(12 * MIB)
    s3.upload_file(str(file), BUCKET, "photos/a.bin", Config=TRANSFER,
                   ExtraArgs={"Metadata": {"md5chksum": "x"}})
    s3.put_object(Bucket=BUCKET, Key="small.txt", Body=b"hello", ContentType="text/plain")
    big = s3.head_object(Bucket=BUCKET, Key="photos/a.bin")
    assert big["ContentLength"] == 12 * MIB and big["ETag"].endswith('-2"')
    assert big["Metadata"] == {"md5chksum": "x"}
    small = s3.head_object(Bucket=BUCKET, Key="small.txt")
    assert (small["ContentLength"], small["ContentType"]) == (5, "text/plain")
    assert small["ETag"] == '"' + hashlib.md5(b"hello").hexdigest() + '"'
    with pytest.raises(ClientError) as stranger:
        client(s3_shim.url, OTHER_ID, OTHER_SECRET).head_object(Bucket=BUCKET, Key="small.txt")
    assert stranger.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert len(delivered(legacy)) == 2
