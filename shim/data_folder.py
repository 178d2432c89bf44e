"""An upload's bytes: one data file per upload in a folder, written at offsets.

Every store backend keeps bytes here; only where the records live differs. With several
shim instances the folder is one they all mount (NFS, EFS, CephFS, a shared volume): each
upload has its own file, so writers on different uploads never share one, and the write
lease (`Store.acquire`) makes one writer per upload. Nothing here blocks the event loop: file
work runs on the default executor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from shim.store import ChunkWriter, FileRange

FLUSH_EVERY = 2 * 1024 * 1024
"""Bytes of a body after which its data file is flushed in the background (ChunkWriter)."""
FREE_BYTES_FOR = 0.5
"""Seconds a reading of the disk's free space is used for (see DataFolder.free_bytes)."""


class DataFolder:
    """The byte half of the `Store` interface, over `<directory>/data/<upload id>`."""

    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._data = self.directory / "data"
        self._data.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._free: tuple[float, int] | None = None
        """When the disk's free space was read, and what it was."""

    def _path(self, upload_id: str) -> Path:
        if not upload_id or "/" in upload_id or upload_id.startswith("."):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self._data / upload_id

    async def open_writer(self, upload_id: str, offset: int, create: bool = True) -> ChunkWriter:
        path = self._path(upload_id)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = await asyncio.to_thread(os.open, path, flags, 0o600)
        return ChunkWriter(fd, offset, FLUSH_EVERY if self.fsync else 0)

    async def close_writer(self, upload_id: str, writer: ChunkWriter, keep: int | None,
                           sync: bool) -> int:
        try:
            await writer.flushed()
        except OSError:
            if sync:  # bytes to keep that may not be on the disk
                await asyncio.to_thread(os.close, writer.fd)
                raise

        def work() -> int:
            try:
                if keep is not None and os.fstat(writer.fd).st_size > keep:
                    os.ftruncate(writer.fd, keep)
                if sync and self.fsync:
                    os.fsync(writer.fd)
                return os.fstat(writer.fd).st_size
            finally:
                os.close(writer.fd)

        return await asyncio.to_thread(work)

    async def ranges(self, upload_ids: Sequence[str], limits: Sequence[int]
                     ) -> AsyncIterator[FileRange]:
        for upload_id, limit in zip(upload_ids, limits, strict=True):
            if limit == 0:
                continue  # an empty upload may never have had a data file
            file = await asyncio.to_thread(open, self._path(upload_id), "rb")
            try:
                if (await asyncio.to_thread(os.fstat, file.fileno())).st_size < limit:
                    raise OSError(f"data of upload {upload_id} is shorter than recorded")
                yield FileRange(file, 0, limit)
            finally:
                file.close()

    async def size(self, upload_id: str) -> int:
        def work() -> int:
            try:
                return self._path(upload_id).stat().st_size
            except FileNotFoundError:
                return 0

        return await asyncio.to_thread(work)

    async def truncate(self, upload_id: str, size: int) -> None:
        def work() -> None:
            path = self._path(upload_id)
            if path.exists():
                os.truncate(path, size)

        await asyncio.to_thread(work)

    async def discard(self, upload_id: str) -> None:
        await asyncio.to_thread(self._path(upload_id).unlink, missing_ok=True)

    async def free_bytes(self) -> int:
        """Free bytes on the storage disk, read at most every FREE_BYTES_FOR seconds: every
        body asks first, and a statfs off the loop each time costs a thread hop per request
        for a figure that moves slowly (a body that meets a full disk anyway gets 507 from
        its write)."""
        now = time.monotonic()
        if self._free is None or now - self._free[0] >= FREE_BYTES_FOR:
            self._free = now, (await asyncio.to_thread(shutil.disk_usage, self._data)).free
        return self._free[1]

    async def health(self) -> str | None:
        """Why bytes cannot be stored now (None: they can)."""
        if not await asyncio.to_thread(os.access, self._data, os.W_OK):
            return f"the storage folder {self.directory} is not writable"
        return None
