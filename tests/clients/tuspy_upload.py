"""Upload one file with tuspy (the ``tusclient`` package); run as a subprocess by the tests.

Usage::

    python tests/clients/tuspy_upload.py --file PATH --chunk-size N
        (--endpoint http://127.0.0.1:PORT/files/ | --url http://127.0.0.1:PORT/files/ID)
        [--header 'Name: value' ...] [--metadata key=value ...] [--checksum]
        [--retries N] [--retry-delay SECONDS]

With ``--endpoint`` a new upload is created; with ``--url`` an existing one is resumed
(tuspy asks the server for the offset with a HEAD first).  Being a separate process, the
client can be SIGKILLed mid-upload by a test.

It prints JSON lines on stdout, flushed at once (the events of tests/js/tus_upload.mjs):

    {"event": "url", "url": ..., "offset": n}          the upload URL and the offset to
                                                       start from, once known
    {"event": "progress", "sent": n, "total": n}       after every acknowledged chunk
    {"event": "success", "url": ..., "upstreamStatus": ..., "upstreamLocation": ...}
                                                       done, exit 0 (the Shim-Upstream-*
                                                       headers of the last answer, or null)
    {"event": "error", "message": ..., "status": n}    failed, exit 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tusclient import client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed


def emit(**event: Any) -> None:
    """Print one JSON event line and flush it."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True, type=Path)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="creation URL: create a new upload")
    target.add_argument("--url", help="upload URL: resume this upload")
    parser.add_argument("--chunk-size", type=int, default=1024 * 1024)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--metadata", action="append", default=[], help="key=value")
    parser.add_argument("--checksum", action="store_true", help="send Upload-Checksum (sha1)")
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--retry-delay", type=float, default=0.2)
    return parser.parse_args(argv)


def upload(args: argparse.Namespace) -> None:
    """Create or resume the upload, then send the rest chunk by chunk."""
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {name.strip(): value.strip() for name, value in headers.items()}
    metadata = dict(m.split("=", 1) for m in args.metadata)
    endpoint = args.endpoint or args.url.rsplit("/", 1)[0] + "/"
    tus = client.TusClient(endpoint, headers=headers)
    uploader = tus.uploader(
        str(args.file),
        url=args.url,
        chunk_size=args.chunk_size,
        metadata=metadata,
        upload_checksum=args.checksum,
        retries=args.retries,
        retry_delay=args.retry_delay,
    )
    total = args.file.stat().st_size
    if uploader.url is None:
        uploader.set_url(uploader.create_url())
        uploader.offset = 0
    emit(event="url", url=uploader.url, offset=uploader.offset)
    while uploader.offset < total:
        uploader.upload_chunk()  # type: ignore[no-untyped-call]
        emit(event="progress", sent=uploader.offset, total=total)
    answered: Any = uploader.request  # None when there was nothing to send
    last: dict[str, str] = answered.response_headers if answered is not None else {}
    emit(
        event="success",
        url=uploader.url,
        upstreamStatus=last.get("shim-upstream-status"),
        upstreamLocation=last.get("shim-upstream-location"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the upload; exit 0 on success, 1 on failure."""
    args = parse_args(argv)
    try:
        upload(args)
    except (TusCommunicationError, TusUploadFailed) as exc:
        emit(event="error", message=str(exc), status=exc.status_code)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
