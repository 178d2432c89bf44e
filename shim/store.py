"""The only code that touches disk: data files for the bytes, diskcache for the metadata.

Layout under `storage.dir`: `data/<id>` holds an upload's bytes, `meta/` is a diskcache
(SQLite) holding each `Upload` as JSON plus secondary keys (`link`). Eviction is off: a
cache that forgot an upload would lose what a client was told is stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

import diskcache

from shim.model import Answer, Target, Upload

READ_SIZE = 1024 * 1024
WRITE_BUFFER = 1024 * 1024


class ChunkWriter:
    """Appends a body to an upload's data file as it arrives.

    `write` runs on the event loop, so it only copies into a buffered file; `sync` (flush and
    fsync) is meant to run in a worker thread before a chunk is acknowledged.
    """

    def __init__(self, file: BinaryIO, offset: int, fsync: bool) -> None:
        self._file = file
        self._fsync = fsync
        self.start = offset
        self.written = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.written += len(data)

    def sync(self) -> None:
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        try:
            self._file.flush()
        finally:
            self._file.close()


class Store:
    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._data = self.directory / "data"
        self._data.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._meta = diskcache.Cache(
            str(self.directory / "meta"), eviction_policy="none", size_limit=2**62
        )

    def close(self) -> None:
        self._meta.close()

    # --- metadata -------------------------------------------------------------------------

    def load(self, upload_id: str) -> Upload | None:
        raw = self._meta.get(f"upload:{upload_id}")
        return _from_json(raw) if isinstance(raw, str) else None

    def save(self, upload: Upload) -> None:
        self._meta.set(f"upload:{upload.id}", _to_json(upload))

    def ids(self) -> list[str]:
        return [key[len("upload:") :] for key in self._meta.iterkeys() if key.startswith("upload:")]

    def link(self, key: str, upload_id: str) -> None:
        """Remember `key` (e.g. a protocol's natural key for an upload) as naming an upload."""
        self._meta.set(f"link:{key}", upload_id)

    def resolve(self, key: str) -> str | None:
        value = self._meta.get(f"link:{key}")
        return value if isinstance(value, str) else None

    def links(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, upload id) whose key starts with `prefix`; a scan, meant for reports."""
        start = f"link:{prefix}"
        return [(key[len("link:"):], self._meta[key]) for key in self._meta.iterkeys()
                if isinstance(key, str) and key.startswith(start)]

    def unlink(self, key: str) -> None:
        self._meta.delete(f"link:{key}")

    def remove(self, upload_id: str) -> None:
        """Forget an upload: its metadata and its bytes."""
        self.discard_data(upload_id)
        self._meta.delete(f"upload:{upload_id}")

    # --- bytes ----------------------------------------------------------------------------

    def _path(self, upload_id: str) -> Path:
        if not upload_id or "/" in upload_id or upload_id.startswith("."):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self._data / upload_id

    def size(self, upload_id: str) -> int:
        try:
            return self._path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def writer(self, upload_id: str, offset: int) -> ChunkWriter:
        """Open the data file for writing at `offset`, dropping anything stored past it."""
        path = self._path(upload_id)
        path.touch(exist_ok=True)
        file = open(path, "r+b", buffering=WRITE_BUFFER)  # noqa: SIM115 - ChunkWriter closes it
        file.truncate(offset)
        file.seek(offset)
        return ChunkWriter(file, offset, self._fsync)

    def truncate(self, upload_id: str, size: int) -> None:
        path = self._path(upload_id)
        if path.exists():
            with open(path, "r+b") as file:
                file.truncate(size)

    def discard_data(self, upload_id: str) -> None:
        self._path(upload_id).unlink(missing_ok=True)

    async def read(self, upload_ids: Sequence[str], limits: Sequence[int]) -> AsyncIterator[bytes]:
        """Yield the bytes of several uploads back to back, `limits[i]` bytes of the i-th."""
        for upload_id, limit in zip(upload_ids, limits, strict=True):
            if limit == 0:
                continue  # an empty upload may never have had a data file
            with open(self._path(upload_id), "rb") as file:
                remaining = limit
                while remaining > 0:
                    chunk = await asyncio.to_thread(file.read, min(READ_SIZE, remaining))
                    if not chunk:
                        raise OSError(f"data of upload {upload_id} is shorter than recorded")
                    remaining -= len(chunk)
                    yield chunk

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._data).free


def _to_json(upload: Upload) -> str:
    record = asdict(upload)
    for name in ("answer", "refusal"):
        answer = getattr(upload, name)
        if answer is not None:
            record[name]["body"] = base64.b64encode(answer.body).decode("ascii")
    return json.dumps(record)


def _from_json(text: str) -> Upload:
    record: dict[str, Any] = json.loads(text)
    if record.get("target") is not None:
        target = record["target"]
        target["headers"] = _pairs(target["headers"])
        record["target"] = Target(**target)
    for name in ("answer", "refusal"):
        answer = record.get(name)
        if answer is not None:
            answer["headers"] = _pairs(answer["headers"])
            answer["body"] = base64.b64decode(answer["body"])
            record[name] = Answer(**answer)
    record["parts"] = tuple(record["parts"])
    return Upload(**record)


def _pairs(items: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in items)
