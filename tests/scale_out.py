"""Three shim instances on one Redis and one folder behind a round-robin balancer: the
`cluster` fixture (tests/conftest.py) and what the scale-out tests share (issue 13)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.balancer import RoundRobinBalancer
from tests.harness import ShimLauncher, ShimProcess
from tests.legacy_servers import LegacyServer, Received
from tests.redis_server import RedisServer

KIB = 1024
MIB = 1024 * KIB
LEASE_TTL = 2.0
"""Leases of a SIGKILLed instance lapse after this (storage.lease_ttl), so the survivors take
its uploads within a test's patience."""
TIMEOUT = 60.0


def shared_config(redis: RedisServer, folder: Path, **sections: Any) -> dict[str, Any]:
    """The config every instance gets: one Redis, one folder."""
    storage = {"backend": "redis", "redis_url": redis.url, "dir": str(folder),
               "fsync": False, "lease_ttl": LEASE_TTL}
    tus = {"forward": {"path": "/uploads/{filename}"}}
    return {"storage": storage, "tus": tus, **sections}


@dataclass
class Cluster:
    """The instances, the balancer in front of them, and the legacy server behind."""

    shims: list[ShimProcess]
    balancer: RoundRobinBalancer
    legacy: LegacyServer
    redis: RedisServer

    @property
    def url(self) -> str:
        return self.balancer.url

    def served_by(self) -> set[int]:
        """The instances that took at least one connection."""
        return {index for index in self.balancer.connections if index is not None}


def clusters(shim: ShimLauncher, recording_legacy: LegacyServer, redis_server: RedisServer,
             tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Behind the `cluster` fixture: `cluster(count=3, **config_sections)` starts `count`
    instances (mitmdump) sharing `redis_server` and tmp_path/"shared", and a balancer."""
    started: list[Cluster] = []

    def start(count: int = 3, **sections: Any) -> Cluster:
        config = shared_config(redis_server, tmp_path / "shared", **sections)
        shims = [shim(config, upstream_url=recording_legacy.url) for _ in range(count)]
        balancer = RoundRobinBalancer([("127.0.0.1", s.port) for s in shims])
        started.append(Cluster(shims, balancer, recording_legacy, redis_server))
        return started[-1]

    yield start
    for group in started:  # before Redis stops: its going would only clutter their output
        group.balancer.close()
        for instance in group.shims:
            instance.kill()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def accepted_once(legacy: LegacyServer, path: str, data: bytes) -> Received:
    """The one request the legacy server accepted at `path`, which carried exactly `data`."""
    accepted = [r for r in legacy.accepted() if r.path == path]
    assert len(accepted) == 1, legacy.requests()
    request = accepted[0]
    assert (request.complete, request.size, request.sha256) == (True, len(data), sha256(data))
    return request
