"""End to end: the AWS CLI (`aws s3 cp`, awscli from PyPI) and rclone (`rclone copyto`, an S3
remote of provider Other) through a real shim (mitmdump) speaking the S3 multipart upload API,
in front of a whole-file legacy server that counts what it gets (issue 11, "Tests").

Both tools are real processes with their own configuration, given through environment
variables that point into the test's folder, so the user's ~/.aws and rclone.conf are never
read or written. Each test asserts what a user would notice: the tool exits 0, and the legacy
server gets each object exactly once, whole and byte-exact, at /uploads/<bucket>/<key>, with
the key's own headers and never the client's S3 signature or any `x-amz-*` field but the
object's metadata. The big files go in 8 MiB parts (the shim's log shows one upload per part),
the small ones in one PutObject.

rclone also checks the bucket and the object before and after the upload (see RCLONE_FLAGS):
the shim answers those itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import PayloadFactory, ShimLauncher, ShimProcess, in_ci, sha256_of
from tests.links import MakeProxy

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
KIB = 1024
PART = 8 * MIB
"""Both tools' multipart threshold and part size here: a 40 MiB file goes in five parts."""
KEY_ID, SECRET = "AKIDSHIMTOOLS001", "shim-tools-secret-001"
LEGACY_TOKEN = "Bearer legacy-token-for-tools"
BUCKET = "site-photos"
S3_CONFIG: dict[str, Any] = {"s3": {
    "paths": ["/s3/"],
    "credentials": [
        {"access_key": KEY_ID, "secret": SECRET, "forward_headers": {"Authorization": LEGACY_TOKEN}},
    ],
}}
TOOL_TIMEOUT = 90.0
"""Seconds one tool run may take; a run on a quiet machine takes one or two."""

AWS_CONFIG = f"""\
[default]
region = us-east-1
s3 =
  addressing_style = path
  multipart_threshold = {PART // MIB}MB
  multipart_chunksize = {PART // MIB}MB
"""
"""The CLI's config file (AWS CLI User Guide, "AWS CLI S3 configuration"): path-style
addressing, since the shim's endpoint has the bucket in the path, and 8 MiB parts."""

RCLONE_FLAGS = (
    "--s3-upload-cutoff", "8M",  # multipart above 8 MiB (default 200 MiB)
    "--s3-chunk-size", "8M",
    "--s3-upload-concurrency", "4",
    "-v",
)
"""rclone 1.60's `copyto` as a user runs it, with smaller parts: it HEADs the object first
(404 NoSuchKey: not there yet), PUTs the bucket (CreateBucket: 200), uploads, then HEADs the
object to check its size and MD5, which the shim answers for an object it delivered."""

PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})
CREATED_RE = re.compile(r"upload event=created id=\S+ protocol=s3 .*?total=(\d+|None)")


# --- the tools ----------------------------------------------------------------------------


def tool_env(tmp_path: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without the user's settings for either tool (rclone's AWS SDK
    reads `AWS_*` too, e.g. AWS_CA_BUNDLE) or a proxy for loopback, with HOME in the test's
    folder so that nothing under the user's ~ is read or written."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("AWS_", "RCLONE_")) and k.lower() not in PROXY_VARIABLES}
    env["HOME"] = str(tmp_path)
    env.update(extra)
    return env


def aws_env(tmp_path: Path) -> dict[str, str]:
    """The CLI's own config and (empty) credentials files, and the key in the environment."""
    config, credentials = tmp_path / "aws-config", tmp_path / "aws-credentials"
    config.write_text(AWS_CONFIG)
    credentials.write_text("")
    return tool_env(tmp_path, {
        "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1"})


def aws(env: Mapping[str, str], url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the AWS CLI (the venv's awscli, as `python -m awscli`) against the shim at `url`."""
    return run([sys.executable, "-m", "awscli", *args, "--endpoint-url", f"{url}/s3"], env)


def rclone_env(tmp_path: Path, url: str) -> dict[str, str]:
    """An on-the-fly remote `shim:` (rclone docs, "Config file": RCLONE_CONFIG_<NAME>_<KEY>)
    and an empty config file of the test's own."""
    config = tmp_path / "rclone.conf"
    config.write_text("")
    remote = {"TYPE": "s3", "PROVIDER": "Other", "ENDPOINT": f"{url}/s3",
              "ACCESS_KEY_ID": KEY_ID, "SECRET_ACCESS_KEY": SECRET, "REGION": "us-east-1",
              "FORCE_PATH_STYLE": "true"}
    return tool_env(tmp_path, {
        "RCLONE_CONFIG": str(config),
        **{f"RCLONE_CONFIG_SHIM_{name}": value for name, value in remote.items()}})


def rclone_copyto(rclone: str, env: Mapping[str, str], file: Path, key: str,
                  *extra: str) -> subprocess.CompletedProcess[str]:
    return run([rclone, "copyto", str(file), f"shim:{BUCKET}/{key}", *RCLONE_FLAGS, *extra], env)


def run(command: Sequence[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a tool to its end and insist it exited 0 (its output in the failure message)."""
    done = subprocess.run(list(command), env=dict(env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    assert done.returncode == 0, f"{command[:4]} exited {done.returncode}:\n{done.stdout[-3000:]}" \
        f"\n{done.stderr[-3000:]}"
    return done


# --- what arrived -------------------------------------------------------------------------


def assert_once(legacy: WholeFileServer, file: Path, key: str) -> ReceivedRequest:
    """The legacy server got `file` once at /uploads/<bucket>/<key>, byte-exact, with the
    key's own Authorization and no S3 field but the object's metadata."""
    path = f"/uploads/{BUCKET}/{quote(key)}"
    [delivery] = [r for r in legacy.received if r.path == path]
    assert (delivery.method, delivery.size, delivery.sha256) == (
        "PUT", file.stat().st_size, sha256_of(file))
    assert delivery.complete
    assert delivery.header("Authorization") == LEGACY_TOKEN
    leaked = [name for name, _ in delivery.headers if name.lower().startswith("x-amz-")
              and not name.lower().startswith("x-amz-meta-")]
    assert leaked == []
    return delivery


def upload_sizes(shim: ShimProcess) -> list[int]:
    """The sizes of the uploads the shim's log shows, smallest first: each part and each
    PutObject is one; a multipart upload's own entry has no size and is left out."""
    return sorted(int(total) for total in CREATED_RE.findall(shim.output()) if total != "None")


def content_md5(file: Path) -> str:
    return base64.b64encode(hashlib.md5(file.read_bytes()).digest()).decode()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def s3_shim(shim: ShimLauncher) -> ShimProcess:
    return shim(S3_CONFIG)


@pytest.fixture
def rclone() -> str:
    """The rclone executable; skip when it is missing, but fail under CI, which installs it.
    Asked for before the shim, so that a skip starts nothing."""
    found = shutil.which("rclone")
    if found is not None:
        return found
    if in_ci():
        pytest.fail("rclone is not installed under CI (.ci/run installs the Debian package)",
                    pytrace=False)
    pytest.skip("rclone is not installed (Debian: apt-get install rclone)")




# --- the AWS CLI --------------------------------------------------------------------------


def test_aws_s3_cp_sends_a_big_file_in_parts_and_a_small_one_whole(
        s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory,
        tmp_path: Path) -> None:
    big, small = payload(40 * MIB), payload(100 * KIB)
    env = aws_env(tmp_path)
    aws(env, s3_shim.url, "s3", "cp", str(big), f"s3://{BUCKET}/jobs/2026/site a.bin")
    aws(env, s3_shim.url, "s3", "cp", str(small), f"s3://{BUCKET}/notes.txt",
        "--content-type", "text/plain", "--metadata", "site=A7")
    assert_once(legacy, big, "jobs/2026/site a.bin")
    delivered = assert_once(legacy, small, "notes.txt")
    assert (delivered.header("Content-Type"), delivered.header("x-amz-meta-site")) == (
        "text/plain", "A7")
    assert len(legacy.received) == 2
    assert upload_sizes(s3_shim) == sorted([PART] * 5 + [small.stat().st_size])
    listed = aws(env, s3_shim.url, "s3api", "list-multipart-uploads", "--bucket", BUCKET,
                 "--output", "json")
    assert json.loads(listed.stdout).get("Uploads", []) == []


def test_aws_s3_cp_through_a_dropping_link_arrives_once(
        s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory,
        tmp_path: Path, cutting_proxy: MakeProxy) -> None:
    """A link that drops the connection carrying every 15th MiB: the CLI sends the parts
    cut off again, and the file arrives once."""
    big = payload(40 * MIB)
    proxy = cutting_proxy(s3_shim.port, cut_every=15 * MIB)
    aws(aws_env(tmp_path), proxy.url, "s3", "cp", str(big), f"s3://{BUCKET}/cut/big.bin")
    assert proxy.cuts >= 2
    assert_once(legacy, big, "cut/big.bin")
    assert len(legacy.received) == 1


# --- rclone -------------------------------------------------------------------------------


def test_rclone_copyto_sends_a_big_file_in_parts_and_a_small_one_whole(
        rclone: str, s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory,
        tmp_path: Path) -> None:
    big, small = payload(40 * MIB), payload(100 * KIB)
    env = rclone_env(tmp_path, s3_shim.url)
    rclone_copyto(rclone, env, big, "jobs/2026/site a.bin")
    rclone_copyto(rclone, env, small, "notes.txt")
    delivered = assert_once(legacy, big, "jobs/2026/site a.bin")
    assert_once(legacy, small, "notes.txt")
    assert len(legacy.received) == 2
    assert upload_sizes(s3_shim) == sorted([PART] * 5 + [small.stat().st_size])
    # rclone keeps the whole file's MD5 in metadata, since a multipart ETag is not one
    assert delivered.header("x-amz-meta-md5chksum") == content_md5(big)
    assert delivered.header("x-amz-meta-mtime") is not None


def test_rclone_copyto_through_a_dropping_link_arrives_once(
        rclone: str, s3_shim: ShimProcess, legacy: WholeFileServer, payload: PayloadFactory,
        tmp_path: Path, cutting_proxy: MakeProxy) -> None:
    """rclone's low-level retries send the parts cut off again; `--retries 1` keeps it from
    starting the whole copy over, so these retries alone must manage."""
    big = payload(40 * MIB)
    proxy = cutting_proxy(s3_shim.port, cut_every=15 * MIB)
    rclone_copyto(rclone, rclone_env(tmp_path, proxy.url), big, "cut/big.bin",
                  "--low-level-retries", "10", "--retries", "1")
    assert proxy.cuts >= 2
    assert_once(legacy, big, "cut/big.bin")
    assert len(legacy.received) == 1
