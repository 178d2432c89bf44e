"""The embedded store: diskcache for the records, SQLite indexes beside it, local files.

Layout under `storage.dir`:
- `data/<id>`: an upload's bytes.
- `meta/`: a diskcache (SQLite) holding each `Upload` as JSON under `upload:<id>`. Eviction
  is off: a cache that forgot an upload would lose what a client was told is stored.
- `index.sqlite`: secondary keys, the expiry index, the outbox and leases, each a table with
  an index, so lookups never scan every upload.

Records and indexes live in two databases, so the indexes are hints kept a superset of the
truth: an index entry is written before the record that needs it and removed after the
record that no longer does, and every reader re-checks the record it finds.

All SQLite work runs on one worker thread (which also serialises compare-and-set within the
process; diskcache's transaction makes it hold across processes); file work runs on the
default executor. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import diskcache

from shim.lifecycle import AWAITING_DELIVERY, State
from shim.model import Answer, Target, Upload
from shim.store import CapReached, Caps, ChunkWriter, Conflict, FileRange, StoreError

FLUSH_EVERY = 2 * 1024 * 1024
"""Bytes of a body after which its data file is flushed in the background (ChunkWriter)."""
FREE_BYTES_FOR = 0.5
"""Seconds a reading of the disk's free space is used for (see LocalStore.free_bytes)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (key BLOB PRIMARY KEY, upload_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS links_upload ON links (upload_id);
CREATE TABLE IF NOT EXISTS expiry (upload_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS expiry_at ON expiry (at);
CREATE TABLE IF NOT EXISTS outbox (upload_id TEXT PRIMARY KEY, due REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due);
CREATE TABLE IF NOT EXISTS incomplete (upload_id TEXT PRIMARY KEY, owner TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incomplete_owner ON incomplete (owner);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
"""


class FolderInUse(Exception):
    """Another process serves from this storage folder."""


_CLAIMED: dict[str, int] = {}
"""Folders this process holds, and their lock's descriptor (kept open until it exits)."""


def claim_folder(directory: str | Path) -> None:
    """Take a storage folder for this process: an exclusive lock on `<dir>/shim.lock`, which
    names the holder's pid. The local store assumes one process per folder (its leases are
    dropped at start), so a second shim must not start on it; an operator's command line,
    whose every change is compare-and-set, does not take it. A process may claim a folder
    again (mitmdump's script reload makes a new addon); the kernel releases the lock however
    the process ends, SIGKILL included."""
    folder = Path(os.path.realpath(directory))
    if str(folder) in _CLAIMED:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "shim.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FolderInUse(f"{folder} is in use by another shim (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _CLAIMED[str(folder)] = fd


class LocalStore:
    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._data = self.directory / "data"
        self._data.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._meta = diskcache.Cache(str(self.directory / "meta"), eviction_policy="none",
                                     size_limit=2**62)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shim-store")
        self._index: sqlite3.Connection | None = None
        self._index_path = self.directory / "index.sqlite"
        self._free: tuple[float, int] | None = None
        """When the disk's free space was read, and what it was."""

    # --- plumbing -------------------------------------------------------------------------

    async def _db[T](self, work: Callable[[], T]) -> T:
        """Run `work` on the store's thread; its database errors become StoreError."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db_thread, work)
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: closed
            raise StoreError(str(exc)) from exc

    def _sql(self) -> sqlite3.Connection:
        """The index connection, opened on the store's thread (SQLite wants one thread)."""
        if self._index is None:
            self._index = sqlite3.connect(self._index_path, isolation_level=None, timeout=30)
            self._index.execute("PRAGMA journal_mode=WAL")
            self._index.execute("PRAGMA synchronous=NORMAL")
            self._index.executescript(_SCHEMA)
        return self._index

    async def close(self) -> None:
        def shut() -> None:
            if self._index is not None:
                self._index.close()
                self._index = None
            self._meta.close()

        await self._db(shut)
        self._db_thread.shutdown(wait=True)

    # --- records --------------------------------------------------------------------------

    async def load(self, upload_id: str) -> Upload | None:
        return await self._db(lambda: self._load(upload_id))

    def _load(self, upload_id: str) -> Upload | None:
        raw = self._meta.get(f"upload:{upload_id}")
        return _from_json(raw) if isinstance(raw, str) else None

    async def save(self, upload: Upload) -> Upload:
        return await self._db(lambda: self._save(upload))

    def _save(self, upload: Upload) -> Upload:
        saved = replace(upload, version=upload.version + 1)
        self._index_before(saved)
        with self._meta.transact():
            current = self._load(upload.id)
            if (current.version if current is not None else 0) != upload.version:
                raise Conflict(f"upload {upload.id} changed since it was read")
            self._meta.set(f"upload:{upload.id}", _to_json(saved))
        self._index_after(saved)
        return saved

    async def create(self, upload: Upload, caps: Caps | None = None) -> Upload:
        def work() -> Upload:
            if caps is not None:
                reached = self._cap_reached(caps)
                if reached is not None:
                    raise CapReached(reached)
            return self._save(upload)

        return await self._db(work)

    def _cap_reached(self, caps: Caps) -> str | None:
        row = self._sql().execute("SELECT COUNT(*), COALESCE(SUM(owner = ?), 0) FROM incomplete",
                                  (caps.account,)).fetchone()
        total, of_account = int(row[0]), int(row[1])
        if caps.per_account and of_account >= caps.per_account:
            return "per_account"
        if caps.total and total >= caps.total:
            return "total"
        return None

    def _index_before(self, upload: Upload) -> None:
        """Entries the new record needs, written first (see the module docstring)."""
        sql = self._sql()
        expires = upload.expires
        if expires is not None and upload.state not in AWAITING_DELIVERY:
            # Terminated ones too: their record goes when they expire.
            sql.execute("INSERT OR REPLACE INTO expiry VALUES (?, ?)", (upload.id, expires))
        if upload.state in AWAITING_DELIVERY:
            sql.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?)",
                        (upload.id, upload.next_attempt))
        if _incomplete(upload):
            account = upload.account if upload.account is not None else upload.owner
            sql.execute("INSERT OR REPLACE INTO incomplete VALUES (?, ?)", (upload.id, account))

    def _index_after(self, upload: Upload) -> None:
        """Entries the new record no longer needs, removed once it is written."""
        sql = self._sql()
        if upload.expires is None or upload.state in AWAITING_DELIVERY:
            sql.execute("DELETE FROM expiry WHERE upload_id = ?", (upload.id,))
        if upload.state not in AWAITING_DELIVERY:
            sql.execute("DELETE FROM outbox WHERE upload_id = ?", (upload.id,))
        if not _incomplete(upload):
            sql.execute("DELETE FROM incomplete WHERE upload_id = ?", (upload.id,))

    async def remove(self, upload: Upload) -> None:
        def work() -> None:
            with self._meta.transact():
                current = self._load(upload.id)
                if current is None or current.version != upload.version:
                    raise Conflict(f"upload {upload.id} changed since it was read")
                self._meta.delete(f"upload:{upload.id}")
            self._forget(upload.id)

        await self._db(work)
        await self.discard(upload.id)

    async def forget(self, upload_id: str) -> None:
        await self._db(lambda: self._forget(upload_id))

    def _forget(self, upload_id: str) -> None:
        sql = self._sql()
        sql.execute("DELETE FROM expiry WHERE upload_id = ?", (upload_id,))
        sql.execute("DELETE FROM outbox WHERE upload_id = ?", (upload_id,))
        sql.execute("DELETE FROM links WHERE upload_id = ?", (upload_id,))
        sql.execute("DELETE FROM incomplete WHERE upload_id = ?", (upload_id,))

    async def ids(self) -> list[str]:
        return await self._db(lambda: [key[len("upload:"):] for key in self._meta.iterkeys()
                                       if isinstance(key, str) and key.startswith("upload:")])

    # --- secondary keys -------------------------------------------------------------------

    async def link(self, key: str, upload_id: str) -> None:
        await self._db(lambda: self._sql().execute(
            "INSERT OR REPLACE INTO links VALUES (?, ?)", (_key(key), upload_id)))

    async def resolve(self, key: str) -> str | None:
        def work() -> str | None:
            row = self._sql().execute("SELECT upload_id FROM links WHERE key = ?",
                                      (_key(key),)).fetchone()
            return str(row[0]) if row else None

        return await self._db(work)

    async def unlink(self, key: str, upload_id: str) -> None:
        await self._db(lambda: self._sql().execute(
            "DELETE FROM links WHERE key = ? AND upload_id = ?", (_key(key), upload_id)))

    async def links(self, prefix: str, limit: int = 1000) -> list[tuple[str, str]]:
        def work() -> list[tuple[str, str]]:
            start = _key(prefix)
            end = _successor(start)
            query = "SELECT key, upload_id FROM links WHERE key >= ?" + (
                " AND key < ?" if end is not None else "") + " ORDER BY key LIMIT ?"
            values = (start, end, limit) if end is not None else (start, limit)
            rows = self._sql().execute(query, values).fetchall()
            return [(bytes(key).decode("utf-8", "surrogateescape"), str(upload_id))
                    for key, upload_id in rows]

        return await self._db(work)

    # --- derived indexes ------------------------------------------------------------------

    async def expired(self, now: float, limit: int = 500) -> list[str]:
        return await self._db(lambda: [str(row[0]) for row in self._sql().execute(
            "SELECT upload_id FROM expiry WHERE at < ? ORDER BY at LIMIT ?", (now, limit))])

    async def due(self, now: float, limit: int = 100) -> list[str]:
        return await self._db(lambda: [str(row[0]) for row in self._sql().execute(
            "SELECT upload_id FROM outbox WHERE due <= ? ORDER BY due LIMIT ?", (now, limit))])

    async def incomplete(self, owner: str | None = None) -> int:
        def work() -> int:
            if owner is None:
                row = self._sql().execute("SELECT COUNT(*) FROM incomplete").fetchone()
            else:
                row = self._sql().execute("SELECT COUNT(*) FROM incomplete WHERE owner = ?",
                                          (owner,)).fetchone()
            return int(row[0])

        return await self._db(work)

    async def next_due(self) -> float | None:
        def work() -> float | None:
            row = self._sql().execute("SELECT MIN(due) FROM outbox").fetchone()
            return float(row[0]) if row and row[0] is not None else None

        return await self._db(work)

    # --- leases ---------------------------------------------------------------------------

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        def work() -> bool:
            now = time.time()
            cursor = self._sql().execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "holder = excluded.holder, until = excluded.until "
                "WHERE leases.until < ? OR leases.holder = excluded.holder",
                (name, holder, now + ttl, now))
            return cursor.rowcount == 1

        return await self._db(work)

    async def renew(self, name: str, holder: str, ttl: float) -> bool:
        def work() -> bool:
            cursor = self._sql().execute("UPDATE leases SET until = ? WHERE name = ? AND holder = ?",
                                         (time.time() + ttl, name, holder))
            return cursor.rowcount == 1

        return await self._db(work)

    async def release(self, name: str, holder: str) -> None:
        await self._db(lambda: self._sql().execute(
            "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))

    async def holder(self, name: str) -> str | None:
        def work() -> str | None:
            row = self._sql().execute("SELECT holder FROM leases WHERE name = ? AND until >= ?",
                                      (name, time.time())).fetchone()
            return str(row[0]) if row else None

        return await self._db(work)

    async def drop_leases(self) -> None:
        """Forget every lease: at start-up of the one process that owns this folder."""
        await self._db(lambda: self._sql().execute("DELETE FROM leases"))

    # --- bytes ----------------------------------------------------------------------------

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


def _incomplete(upload: Upload) -> bool:
    return upload.state is State.RECEIVING and not upload.complete


def _key(key: str) -> bytes:
    """Keys as bytes: a request path may hold bytes that are not UTF-8 (mitmproxy passes them
    on as surrogate escapes), which SQLite text cannot hold."""
    return key.encode("utf-8", "surrogateescape")


def _successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _to_json(upload: Upload) -> str:
    record = asdict(upload)
    if upload.answer is not None:
        record["answer"]["body"] = base64.b64encode(upload.answer.body).decode("ascii")
    return json.dumps(record)


def _from_json(text: str) -> Upload:
    record: dict[str, Any] = json.loads(text)
    if record.get("target") is not None:
        target = record["target"]
        target["headers"] = _pairs(target["headers"])
        record["target"] = Target(**target)
    answer = record.get("answer")
    if answer is not None:
        answer["headers"] = _pairs(answer["headers"])
        answer["body"] = base64.b64decode(answer["body"])
        record["answer"] = Answer(**answer)
    record["parts"] = tuple(record["parts"])
    record["state"] = State(record.get("state") or _first_round_state(record))
    record.setdefault("keyed", True)  # written before the field: its delivery is hashed
    known = {f.name for f in fields(Upload)}
    return Upload(**{name: value for name, value in record.items() if name in known})


def _first_round_state(record: dict[str, Any]) -> State:
    """The state of a record written before states existed (flags `terminated`, `answer`)."""
    if record.get("terminated"):
        return State.TERMINATED
    return State.DELIVERED if record.get("answer") is not None else State.RECEIVING


def _pairs(items: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in items)
