"""A `shim.store.Store` around a real `LocalStore` that fails when a test tells it to.

Every call is passed on to the wrapped store unless a fault is armed:

- ``fail_saves(n)``: the next ``n`` calls of ``save`` (or ``create``) raise `StoreError` (a full
  disk, a broken database); nothing is written.
- ``fail_saves_in(state)``: every ``save`` of a record whose state is ``state`` raises
  `StoreError` until ``fail_saves_in(None)``.
- ``conflict_once(change, state)``: the next ``save`` (of a record in ``state``, if given)
  first saves ``change(stored record)`` itself, behind the caller's back, so the caller's
  compare-and-set meets a newer version and the wrapped store raises `Conflict`.
- ``disk_full = True``: ``free_bytes`` reports 0.

``calls`` counts the calls of each method, so a test can tell which the code under test used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

from shim.lifecycle import State
from shim.local_store import LocalStore
from shim.model import Upload
from shim.store import Caps, ChunkWriter, FileRange, StoreError

__all__ = ["FaultyStore"]


def _unchanged(upload: Upload) -> Upload:
    return upload


class FaultyStore:
    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.disk_full = False
        """When set, `free_bytes` reports 0."""
        self.calls: Counter[str] = Counter()
        self.failed_saves = 0
        """How many saves were made to fail so far."""
        self._fail_next = 0
        self._fail_state: State | None = None
        self._conflict: tuple[Callable[[Upload], Upload], State | None] | None = None

    # --- arming faults ----------------------------------------------------------------------

    def fail_saves(self, count: int = 1) -> None:
        """The next `count` saves raise StoreError."""
        self._fail_next = count

    def fail_saves_in(self, state: State | None) -> None:
        """Every save of a record in `state` raises StoreError; None stops that."""
        self._fail_state = state

    def conflict_once(self, change: Callable[[Upload], Upload] = _unchanged,
                      state: State | None = None) -> None:
        """The next save (of a record in `state`, if given) meets a concurrent change: the
        stored record is saved as `change(stored)` first, bumping its version."""
        self._conflict = (change, state)

    # --- records ----------------------------------------------------------------------------

    async def load(self, upload_id: str) -> Upload | None:
        self.calls["load"] += 1
        return await self.inner.load(upload_id)

    async def save(self, upload: Upload) -> Upload:
        self.calls["save"] += 1
        await self._inject(upload)
        return await self.inner.save(upload)

    async def create(self, upload: Upload, caps: Caps | None = None) -> Upload:
        self.calls["create"] += 1
        await self._inject(upload)
        return await self.inner.create(upload, caps)

    async def _inject(self, upload: Upload) -> None:
        """The armed fault of a save, if any (a creation is a save too)."""
        if self._fail_next > 0:
            self._fail_next -= 1
            self.failed_saves += 1
            raise StoreError("injected: the next save fails")
        if self._fail_state is not None and upload.state is self._fail_state:
            self.failed_saves += 1
            raise StoreError(f"injected: saves of {self._fail_state} records fail")
        if self._conflict is not None and self._conflict[1] in (None, upload.state):
            change, _ = self._conflict
            self._conflict = None
            stored = await self.inner.load(upload.id)
            if stored is not None:
                await self.inner.save(change(stored))

    async def remove(self, upload: Upload) -> None:
        self.calls["remove"] += 1
        await self.inner.remove(upload)

    async def ids(self) -> list[str]:
        self.calls["ids"] += 1
        return await self.inner.ids()

    # --- secondary keys -----------------------------------------------------------------------

    async def link(self, key: str, upload_id: str) -> None:
        self.calls["link"] += 1
        await self.inner.link(key, upload_id)

    async def resolve(self, key: str) -> str | None:
        self.calls["resolve"] += 1
        return await self.inner.resolve(key)

    async def unlink(self, key: str, upload_id: str) -> None:
        self.calls["unlink"] += 1
        await self.inner.unlink(key, upload_id)

    async def links(self, prefix: str, limit: int = 1000) -> list[tuple[str, str]]:
        self.calls["links"] += 1
        return await self.inner.links(prefix, limit)

    # --- derived indexes ----------------------------------------------------------------------

    async def expired(self, now: float, limit: int = 500) -> list[str]:
        self.calls["expired"] += 1
        return await self.inner.expired(now, limit)

    async def due(self, now: float, limit: int = 100) -> list[str]:
        self.calls["due"] += 1
        return await self.inner.due(now, limit)

    async def forget(self, upload_id: str) -> None:
        self.calls["forget"] += 1
        await self.inner.forget(upload_id)

    async def next_due(self) -> float | None:
        self.calls["next_due"] += 1
        return await self.inner.next_due()

    async def incomplete(self, owner: str | None = None) -> int:
        self.calls["incomplete"] += 1
        return await self.inner.incomplete(owner)

    # --- leases -------------------------------------------------------------------------------

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        self.calls["acquire"] += 1
        return await self.inner.acquire(name, holder, ttl)

    async def renew(self, name: str, holder: str, ttl: float) -> bool:
        self.calls["renew"] += 1
        return await self.inner.renew(name, holder, ttl)

    async def release(self, name: str, holder: str) -> None:
        self.calls["release"] += 1
        await self.inner.release(name, holder)

    async def holder(self, name: str) -> str | None:
        self.calls["holder"] += 1
        return await self.inner.holder(name)

    async def drop_leases(self) -> None:
        self.calls["drop_leases"] += 1
        await self.inner.drop_leases()

    # --- bytes --------------------------------------------------------------------------------

    async def open_writer(self, upload_id: str, offset: int, create: bool = True) -> ChunkWriter:
        self.calls["open_writer"] += 1
        return await self.inner.open_writer(upload_id, offset, create)

    async def close_writer(self, upload_id: str, writer: ChunkWriter, keep: int | None,
                           sync: bool) -> int:
        self.calls["close_writer"] += 1
        return await self.inner.close_writer(upload_id, writer, keep, sync)

    def ranges(self, upload_ids: Sequence[str], limits: Sequence[int]
               ) -> AsyncIterator[FileRange]:
        self.calls["ranges"] += 1
        return self.inner.ranges(upload_ids, limits)

    async def size(self, upload_id: str) -> int:
        self.calls["size"] += 1
        return await self.inner.size(upload_id)

    async def truncate(self, upload_id: str, size: int) -> None:
        self.calls["truncate"] += 1
        await self.inner.truncate(upload_id, size)

    async def discard(self, upload_id: str) -> None:
        self.calls["discard"] += 1
        await self.inner.discard(upload_id)

    async def free_bytes(self) -> int:
        self.calls["free_bytes"] += 1
        return 0 if self.disk_full else await self.inner.free_bytes()

    async def close(self) -> None:
        self.calls["close"] += 1
        await self.inner.close()
