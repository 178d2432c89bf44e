"""Shared fixtures: the legacy whole-file server, shim processes, payload files, node, Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.demo_server import WholeFileServer
from tests.harness import PayloadFactory, ShimLauncher, require_node
from tests.legacy_servers import LegacyServer
from tests.links import CuttingProxy, MakeProxy
from tests.redis_server import RedisServer
from tests.scale_out import Cluster, clusters


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[WholeFileServer]:
    """A started WholeFileServer storing into tmp_path/"legacy"; stopped at teardown."""
    server = WholeFileServer(tmp_path / "legacy")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def recording_legacy() -> Iterator[LegacyServer]:
    """A started scriptable LegacyServer (mode "ok") that records every request it gets;
    stopped at teardown."""
    server = LegacyServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shim(legacy: WholeFileServer, tmp_path: Path) -> Iterator[ShimLauncher]:
    """Factory ``shim(config=None, kind="mitmdump") -> ShimProcess`` in front of ``legacy``.

    Every shim it started is killed at teardown, and their output is printed (pytest shows
    it in the report of a failed test).
    """
    launcher = ShimLauncher(legacy.url, tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()
        if launcher.started:
            print(launcher.report())


@pytest.fixture
def payload(tmp_path: Path) -> PayloadFactory:
    """Factory ``payload(size) -> Path`` writing random bytes below tmp_path/"payloads"."""
    return PayloadFactory(tmp_path / "payloads")


@pytest.fixture
def node() -> None:
    """Require node and tus-js-client: skip if missing, but fail under CI."""
    require_node()


@pytest.fixture
def cutting_proxy() -> Iterator[MakeProxy]:
    """Factory ``cutting_proxy(port, cut_every, stall_at=None) -> CuttingProxy``: a link that
    drops in front of ``port`` (tests/links.py); every one made is stopped at teardown."""
    made: list[CuttingProxy] = []

    def make(port: int, cut_every: int, stall_at: int | None = None) -> CuttingProxy:
        proxy = CuttingProxy(port, cut_every, stall_at)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server (tests/redis_server.py) on 127.0.0.1 and a free port, working
    in tmp_path/"redis", without persistence; stopped at teardown, its output printed (pytest
    shows it in the report of a failed test)."""
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.close()
        print(f"==== redis-server in {server.directory} ====\n{server.output()}")


@pytest.fixture
def cluster(shim: ShimLauncher, recording_legacy: LegacyServer, redis_server: RedisServer,
            tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """`cluster(count=3, **config_sections)`: shim instances sharing one Redis and one folder
    behind a round-robin balancer (tests/scale_out.py)."""
    yield from clusters(shim, recording_legacy, redis_server, tmp_path)
