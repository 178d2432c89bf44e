"""The shared store: records, indexes and leases in Redis, bytes in a folder every instance
mounts (`storage.backend: redis`).

Several shim instances behind a load balancer use one RedisStore each, on one Redis and one
shared folder, so any instance can serve any request of any upload. Each change of a record
and of every index derived from it is one Lua script, which Redis runs atomically: the
compare-and-set on `Upload.version`, the caps on uploads in progress and the indexes can
never disagree, as they may for a moment in LocalStore's two databases.

Keys, all under a namespace (`shim:` by default), none ever scanned:
- `u:<id>`: a hash, the record's JSON (`j`) and its version (`v`); `ids`: the set of ids.
- `l:<key>`: the upload a secondary key names; `links`: a sorted set of every key (all
  score 0), for prefix lookups in key order with ZRANGEBYLEX; `lo:<id>`: an upload's keys.
- `expiry` and `outbox`: sorted sets of ids by expiry time and by due time.
- `inc`: a hash, incomplete upload -> the account it counts against; `inc:<account>`: a set
  of that account's; what the caps count.
- `lease:<name>`: the holder, with a Redis expiry (PX): a crashed instance's leases lapse on
  Redis' own clock, so the instances' clocks need not agree.

A single Redis (with replicas and Sentinel for fail-over if wanted), not Redis Cluster: the
scripts touch keys they name at run time. Redis must not evict (`maxmemory-policy
noeviction`): a forgotten record is an upload lost.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from shim.data_folder import DataFolder
from shim.lifecycle import AWAITING_DELIVERY
from shim.model import Upload
from shim.records import from_json, to_json
from shim.store import CapReached, Caps, Conflict, StoreError, cap_account, key_bytes, successor

NAMESPACE = "shim:"
SOCKET_TIMEOUT = 10.0
"""Seconds a Redis command may take before the store call fails (StoreError)."""
RETRIES = 3
"""Times a command is sent again on a new connection when its connection broke: after a
Redis restart every pooled connection is dead, and each would fail one request otherwise. A
script that ran before its connection broke and is sent again meets its own new version
(Conflict), which `transition` handles by reading the record again."""

# KEYS: none (single Redis). ARGV: namespace, id, expected version, record JSON, expiry time
# or "", due time or "", account it counts against while incomplete or "", caps per account
# and total (0: none), the account the caps are for.
_SAVE = """
local ns, id, expected = ARGV[1], ARGV[2], tonumber(ARGV[3])
local record = ns .. 'u:' .. id
local current = tonumber(redis.call('HGET', record, 'v') or '0')
if current ~= expected then return {'conflict'} end
local per_account, total = tonumber(ARGV[8]), tonumber(ARGV[9])
if per_account > 0 and redis.call('SCARD', ns .. 'inc:' .. ARGV[10]) >= per_account then
  return {'cap', 'per_account'}
end
if total > 0 and redis.call('HLEN', ns .. 'inc') >= total then return {'cap', 'total'} end
redis.call('HSET', record, 'v', expected + 1, 'j', ARGV[4])
redis.call('SADD', ns .. 'ids', id)
if ARGV[5] ~= '' then redis.call('ZADD', ns .. 'expiry', ARGV[5], id)
else redis.call('ZREM', ns .. 'expiry', id) end
if ARGV[6] ~= '' then redis.call('ZADD', ns .. 'outbox', ARGV[6], id)
else redis.call('ZREM', ns .. 'outbox', id) end
local was = redis.call('HGET', ns .. 'inc', id)
if was and was ~= ARGV[7] then redis.call('SREM', ns .. 'inc:' .. was, id) end
if ARGV[7] ~= '' then
  redis.call('HSET', ns .. 'inc', id, ARGV[7])
  redis.call('SADD', ns .. 'inc:' .. ARGV[7], id)
elseif was then
  redis.call('HDEL', ns .. 'inc', id)
end
return {'ok', expected + 1}
"""

# ARGV: namespace, id, the version to remove ("" : whatever there is, the record stays).
_FORGET = """
local ns, id = ARGV[1], ARGV[2]
if ARGV[3] ~= '' then
  local current = tonumber(redis.call('HGET', ns .. 'u:' .. id, 'v') or '0')
  if current == 0 or current ~= tonumber(ARGV[3]) then return 0 end
  redis.call('DEL', ns .. 'u:' .. id)
  redis.call('SREM', ns .. 'ids', id)
end
redis.call('ZREM', ns .. 'expiry', id)
redis.call('ZREM', ns .. 'outbox', id)
local was = redis.call('HGET', ns .. 'inc', id)
if was then
  redis.call('SREM', ns .. 'inc:' .. was, id)
  redis.call('HDEL', ns .. 'inc', id)
end
for _, key in ipairs(redis.call('SMEMBERS', ns .. 'lo:' .. id)) do
  if redis.call('GET', ns .. 'l:' .. key) == id then
    redis.call('DEL', ns .. 'l:' .. key)
    redis.call('ZREM', ns .. 'links', key)
  end
end
redis.call('DEL', ns .. 'lo:' .. id)
return 1
"""

# ARGV: namespace, key, upload id.
_LINK = """
local ns, key, id = ARGV[1], ARGV[2], ARGV[3]
local was = redis.call('GET', ns .. 'l:' .. key)
if was and was ~= id then redis.call('SREM', ns .. 'lo:' .. was, key) end
redis.call('SET', ns .. 'l:' .. key, id)
redis.call('ZADD', ns .. 'links', 0, key)
redis.call('SADD', ns .. 'lo:' .. id, key)
return 1
"""

_UNLINK = """
local ns, key, id = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', ns .. 'l:' .. key) ~= id then return 0 end
redis.call('DEL', ns .. 'l:' .. key)
redis.call('ZREM', ns .. 'links', key)
redis.call('SREM', ns .. 'lo:' .. id, key)
return 1
"""

# ARGV: namespace, first key, the bound below which keys are taken ('+': none), limit.
_LINKS = """
local ns = ARGV[1]
local keys = redis.call('ZRANGEBYLEX', ns .. 'links', '[' .. ARGV[2], ARGV[3], 'LIMIT', 0, ARGV[4])
local found = {}
for _, key in ipairs(keys) do
  local id = redis.call('GET', ns .. 'l:' .. key)
  if id then table.insert(found, key); table.insert(found, id) end
end
return found
"""

# KEYS: the lease. ARGV: holder, milliseconds.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisStore(DataFolder):
    """Records, indexes and leases in Redis at `url`; bytes in `directory`, a folder every
    instance mounts (see the module docstring)."""

    def __init__(self, url: str, directory: str | Path, fsync: bool = True,
                 namespace: str = NAMESPACE) -> None:
        super().__init__(directory, fsync)
        self.url = url
        self.ns = namespace
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
            health_check_interval=30, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES))
        self._scripts = {name: self.redis.register_script(code) for name, code in (
            ("save", _SAVE), ("forget", _FORGET), ("link", _LINK), ("unlink", _UNLINK),
            ("links", _LINKS), ("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE))}

    # --- plumbing -------------------------------------------------------------------------

    async def _call[T](self, step: Awaitable[T]) -> T:
        """A Redis round trip; what goes wrong on the way is a StoreError."""
        try:
            return await step
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis: {exc}") from exc

    def _run(self, script: str, args: list[Any], keys: list[str] | None = None) -> Awaitable[Any]:
        return self._call(self._scripts[script](keys=keys or [], args=args))

    async def ping(self) -> None:
        """Raise StoreError when Redis does not answer."""
        await self._call(self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    # --- records --------------------------------------------------------------------------

    async def load(self, upload_id: str) -> Upload | None:
        raw = await self._call(self.redis.hget(f"{self.ns}u:{upload_id}", "j"))
        return from_json(_text(raw)) if raw is not None else None

    async def save(self, upload: Upload) -> Upload:
        return await self._save(upload, None)

    async def create(self, upload: Upload, caps: Caps | None = None) -> Upload:
        return await self._save(upload, caps)

    async def _save(self, upload: Upload, caps: Caps | None) -> Upload:
        saved = replace(upload, version=upload.version + 1)
        awaiting = saved.state in AWAITING_DELIVERY
        expires = saved.expires
        result = await self._run("save", [
            self.ns, saved.id, upload.version, to_json(saved),
            "" if expires is None or awaiting else repr(expires),
            repr(saved.next_attempt) if awaiting else "",
            cap_account(saved) or "",
            caps.per_account if caps else 0, caps.total if caps else 0,
            caps.account if caps else ""])
        outcome = _text(result[0])
        if outcome == "conflict":
            raise Conflict(f"upload {upload.id} changed since it was read")
        if outcome == "cap":
            raise CapReached(_text(result[1]))
        return saved

    async def remove(self, upload: Upload) -> None:
        if not await self._run("forget", [self.ns, upload.id, upload.version]):
            raise Conflict(f"upload {upload.id} changed since it was read")
        await self.discard(upload.id)

    async def forget(self, upload_id: str) -> None:
        await self._run("forget", [self.ns, upload_id, ""])

    async def ids(self) -> list[str]:
        async def scan() -> list[str]:
            return [_text(upload_id)
                    async for upload_id in self.redis.sscan_iter(f"{self.ns}ids", count=1000)]

        return await self._call(scan())

    # --- secondary keys -------------------------------------------------------------------

    async def link(self, key: str, upload_id: str) -> None:
        await self._run("link", [self.ns, key_bytes(key), upload_id])

    async def resolve(self, key: str) -> str | None:
        found = await self._call(self.redis.get(self.ns.encode() + b"l:" + key_bytes(key)))
        return _text(found) if found is not None else None

    async def unlink(self, key: str, upload_id: str) -> None:
        await self._run("unlink", [self.ns, key_bytes(key), upload_id])

    async def links(self, prefix: str, limit: int = 1000) -> list[tuple[str, str]]:
        start = key_bytes(prefix)
        end = successor(start)
        found = await self._run("links", [self.ns, start, b"(" + end if end is not None
                                          else b"+", limit])
        pairs = zip(found[::2], found[1::2], strict=True)
        return [(_text(key), _text(upload_id)) for key, upload_id in pairs]

    # --- derived indexes ------------------------------------------------------------------

    async def expired(self, now: float, limit: int = 500) -> list[str]:
        return await self._ids_by_score("expiry", f"({now!r}", limit)

    async def due(self, now: float, limit: int = 100) -> list[str]:
        return await self._ids_by_score("outbox", repr(now), limit)

    async def _ids_by_score(self, index: str, below: str, limit: int) -> list[str]:
        found = await self._call(self.redis.zrangebyscore(
            f"{self.ns}{index}", "-inf", below, start=0, num=limit))
        return [_text(upload_id) for upload_id in found]

    async def next_due(self) -> float | None:
        first = await self._call(self.redis.zrange(f"{self.ns}outbox", 0, 0, withscores=True))
        return float(first[0][1]) if first else None

    async def incomplete(self, owner: str | None = None) -> int:
        if owner is None:
            return int(await self._call(self.redis.hlen(f"{self.ns}inc")))
        return int(await self._call(self.redis.scard(f"{self.ns}inc:{owner}")))

    # --- leases ---------------------------------------------------------------------------

    def _lease(self, name: str) -> str:
        return f"{self.ns}lease:{name}"

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        return bool(await self._run("acquire", [holder, _millis(ttl)], [self._lease(name)]))

    async def renew(self, name: str, holder: str, ttl: float) -> bool:
        return bool(await self._run("renew", [holder, _millis(ttl)], [self._lease(name)]))

    async def release(self, name: str, holder: str) -> None:
        await self._run("release", [holder], [self._lease(name)])

    async def holder(self, name: str) -> str | None:
        found = await self._call(self.redis.get(self._lease(name)))
        return _text(found) if found is not None else None

    async def health(self) -> str | None:
        """Why this store cannot take uploads now (None: it can)."""
        try:
            await self.ping()
        except StoreError as exc:
            return f"{exc} ({safe_url(self.url)})"
        return await super().health()


def _text(raw: Any) -> str:
    """A Redis reply as text (the client hands out bytes; keys may hold surrogate escapes)."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def _millis(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if credentials or at else url

