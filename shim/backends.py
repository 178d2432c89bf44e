"""The store a configuration names (`storage.backend`), and what goes with it.

- `local`: `LocalStore` on `storage.dir`, which one shim process takes for itself
  (`claim_folder`); no signals, since there is no other instance to tell.
- `redis`: `RedisStore` on `storage.redis_url` with the bytes in `storage.dir`, a folder every
  instance mounts, and `RedisSignals` on the same Redis to reach the other instances.
"""

from __future__ import annotations

import os

from shim.config import StorageConfig
from shim.local_store import LocalStore, claim_folder
from shim.redis_store import RedisStore
from shim.signals import RedisSignals

AnyStore = LocalStore | RedisStore


def open_store(storage: StorageConfig, serving: bool) -> AnyStore:
    """The configured store. `serving`: for a shim that serves from it (a local folder is
    then claimed: FolderInUse if another shim has it), not for the operator's command line.
    OSError when the folder cannot be used."""
    folder = os.path.realpath(storage.dir)
    if storage.backend == "redis":
        return RedisStore(storage.redis_url, folder, fsync=storage.fsync)
    if serving:
        claim_folder(folder)
    return LocalStore(folder, fsync=storage.fsync)


def signals_for(store: AnyStore) -> RedisSignals | None:
    """How an instance reaches the others that share `store` (None: it is alone)."""
    if isinstance(store, RedisStore):
        return RedisSignals(store.redis, f"{store.ns}signals")
    return None
