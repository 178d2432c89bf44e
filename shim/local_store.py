"""The embedded store: diskcache for the records, SQLite indexes beside it, local files.

Layout under `storage.dir`:
- `data/<id>`: an upload's bytes (`shim.data_folder`).
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
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import diskcache

from shim.data_folder import FLUSH_EVERY, FREE_BYTES_FOR, DataFolder
from shim.lifecycle import AWAITING_DELIVERY
from shim.model import Upload
from shim.records import from_json, to_json
from shim.store import CapReached, Caps, Conflict, StoreError, cap_account, key_bytes, successor

__all__ = ["FLUSH_EVERY", "FREE_BYTES_FOR", "FolderInUse", "LocalStore", "claim_folder"]

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


class LocalStore(DataFolder):
    """Records in diskcache, indexes and leases in SQLite, bytes in a DataFolder: one shim
    process per folder (see `claim_folder`)."""

    def __init__(self, directory: str | Path, fsync: bool = True) -> None:
        super().__init__(directory, fsync)
        self._meta = diskcache.Cache(str(self.directory / "meta"), eviction_policy="none",
                                     size_limit=2**62)
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shim-store")
        self._index: sqlite3.Connection | None = None
        self._index_path = self.directory / "index.sqlite"

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
        return from_json(raw) if isinstance(raw, str) else None

    async def save(self, upload: Upload) -> Upload:
        return await self._db(lambda: self._save(upload))

    def _save(self, upload: Upload) -> Upload:
        saved = replace(upload, version=upload.version + 1)
        self._index_before(saved)
        with self._meta.transact():
            current = self._load(upload.id)
            if (current.version if current is not None else 0) != upload.version:
                raise Conflict(f"upload {upload.id} changed since it was read")
            self._meta.set(f"upload:{upload.id}", to_json(saved))
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
        account = cap_account(upload)
        if account is not None:
            sql.execute("INSERT OR REPLACE INTO incomplete VALUES (?, ?)", (upload.id, account))

    def _index_after(self, upload: Upload) -> None:
        """Entries the new record no longer needs, removed once it is written."""
        sql = self._sql()
        if upload.expires is None or upload.state in AWAITING_DELIVERY:
            sql.execute("DELETE FROM expiry WHERE upload_id = ?", (upload.id,))
        if upload.state not in AWAITING_DELIVERY:
            sql.execute("DELETE FROM outbox WHERE upload_id = ?", (upload.id,))
        if cap_account(upload) is None:
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
            "INSERT OR REPLACE INTO links VALUES (?, ?)", (key_bytes(key), upload_id)))

    async def resolve(self, key: str) -> str | None:
        def work() -> str | None:
            row = self._sql().execute("SELECT upload_id FROM links WHERE key = ?",
                                      (key_bytes(key),)).fetchone()
            return str(row[0]) if row else None

        return await self._db(work)

    async def unlink(self, key: str, upload_id: str) -> None:
        await self._db(lambda: self._sql().execute(
            "DELETE FROM links WHERE key = ? AND upload_id = ?", (key_bytes(key), upload_id)))

    async def links(self, prefix: str, limit: int = 1000) -> list[tuple[str, str]]:
        def work() -> list[tuple[str, str]]:
            start = key_bytes(prefix)
            end = successor(start)
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
