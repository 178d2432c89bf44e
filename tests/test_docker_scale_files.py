"""The scaled-out stack: compose.scale.yaml, docker/shim-scale.yaml, docker/nginx-scale.conf.

No Docker engine runs here, so, as in test_docker_files.py, the files are parsed and checked
for what the stack relies on: three shims from the one image, running its own CMD, sharing
one volume and the Redis that compose runs, reachable only through nginx, which balances
round robin without stickiness and streams bodies through. Where the real programs happen to
be installed, they are run on the files: ``redis-server`` with the compose command's flags,
and ``nginx -t`` on the balancer's config (its upstream hosts, which only Docker's DNS knows,
replaced by 127.0.0.1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from shim import __main__ as shim_main
from shim import config as shim_config
from tests.harness import REPO_ROOT, subprocess_env
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.test_docker_files import DOCKERFILE, env_of, parse_dockerfile, stages

COMPOSE = REPO_ROOT / "compose.scale.yaml"
EXAMPLE_COMPOSE = REPO_ROOT / "compose.example.yaml"
SCALE_CONFIG = REPO_ROOT / "docker" / "shim-scale.yaml"
NGINX_CONF = REPO_ROOT / "docker" / "nginx-scale.conf"
SHIMS = ("shim-1", "shim-2", "shim-3")
SHARED_VOLUME = "shared-data"
PUBLIC_PORT = 8000
REDIS_DEFAULT_PORT = 6379
STICKY = frozenset({"ip_hash", "hash", "sticky", "sticky_cookie_insert", "least_conn", "random"})
"""Upstream directives that replace round robin (ip_hash, hash and sticky pin clients)."""
TIMEOUT = 30.0


# --- compose helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.scale.yaml, loaded (PyYAML resolves its anchors and merge keys as compose does)."""
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage: what every container of the image starts with."""
    return env_of(stages(parse_dockerfile(DOCKERFILE.read_text()))[-1])


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either compose form (mapping, or KEY=value list)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's volumes, from the short (``src:dst[:ro]``) or the long syntax."""
    result = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            result.append(Mount(source, target, "ro" in ",".join(mode).split(",")))
        else:
            result.append(Mount(volume["source"], volume["target"], bool(volume.get("read_only"))))
    return result


def named(mount: Mount) -> bool:
    """A named volume, not a bind mount of a host path."""
    return not mount.source.startswith((".", "/", "~"))


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """The services it depends on, each with its condition (short form: service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command") or []
    return raw.split() if isinstance(raw, str) else [str(arg) for arg in raw]


def redis_service(compose: dict[str, Any]) -> str:
    """The one service that runs redis-server."""
    found = [str(name) for name, service in compose["services"].items()
             if command(service)[:1] == ["redis-server"]]
    assert len(found) == 1, found
    return found[0]


# --- a small nginx.conf parser --------------------------------------------------------------------


@dataclass
class Directive:
    """One nginx directive: its name, its arguments, and its block (None: a simple one)."""

    name: str
    args: list[str]
    block: list[Directive] | None = None
    parents: list[Directive] = field(default_factory=list, repr=False)
    """The blocks it is in, outermost first (events, http, server, location, ...)."""

    def find(self, name: str) -> list[Directive]:
        """Directives called ``name`` in this block and every block inside it."""
        return find(self.block or [], name)


TOKEN = re.compile(r"""\s+|#[^\n]*|"((?:\\.|[^"\\])*)"|'((?:\\.|[^'\\])*)'|([{};])|([^\s{};"'#]+)""")


def parse_nginx(text: str) -> list[Directive]:
    """The config's directives, nested as written; comments dropped, quotes removed."""
    root: list[Directive] = []
    stack: list[list[Directive]] = [root]
    parents: list[Directive] = []
    words: list[str] = []
    position = 0
    while position < len(text):
        match = TOKEN.match(text, position)
        assert match, f"cannot parse nginx config at {text[position:position + 40]!r}"
        position = match.end()
        double, single, punct, word = match.groups()
        if punct is None and (word is not None or double is not None or single is not None):
            words.append(word if word is not None else (double if double is not None else single))
        elif punct == ";":
            assert words, "an empty directive"
            stack[-1].append(Directive(words[0], words[1:], None, list(parents)))
            words = []
        elif punct == "{":
            assert words, "a block without a name"
            block: list[Directive] = []
            directive = Directive(words[0], words[1:], block, list(parents))
            stack[-1].append(directive)
            stack.append(block)
            parents.append(directive)
            words = []
        elif punct == "}":
            assert not words and len(stack) > 1, "unbalanced }"
            stack.pop()
            parents.pop()
    assert not words and len(stack) == 1, "the config ends inside a directive or block"
    return root


def walk(directives: list[Directive]) -> list[Directive]:
    """Every directive, at any depth, in the order written."""
    result = []
    for directive in directives:
        result.append(directive)
        result.extend(walk(directive.block or []))
    return result


def find(directives: list[Directive], name: str) -> list[Directive]:
    """Every directive called ``name``, at any depth."""
    return [d for d in walk(directives) if d.name == name]


def effective(location: Directive, name: str) -> list[list[str]]:
    """The arguments of ``name`` as they apply in ``location``: from the innermost block that
    sets it (nginx's inheritance), one list per occurrence there."""
    for block in [location, *reversed(location.parents)]:
        here = [d.args for d in block.block or [] if d.name == name]
        if here:
            return here
    return []


def seconds(value: str) -> float:
    """An nginx time (``90``, ``90s``, ``5m``, ``1h``, ``500ms``) in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
    return int(match.group(1)) * factor


@pytest.fixture(scope="module")
def nginx() -> list[Directive]:
    return parse_nginx(NGINX_CONF.read_text())


def upstream(directives: list[Directive], name: str) -> Directive:
    found = [u for u in find(directives, "upstream") if u.args == [name]]
    assert len(found) == 1, f"upstream {name}: {found}"
    return found[0]


def proxied_location(directives: list[Directive]) -> tuple[Directive, str]:
    """The one location that proxies, and the upstream group it names."""
    passes = find(directives, "proxy_pass")
    assert len(passes) == 1, passes
    url = urlsplit(passes[0].args[0])
    assert url.scheme == "http" and not url.port and url.path in ("", "/"), passes[0].args
    location = passes[0].parents[-1]
    assert location.name == "location" and location.args == ["/"], location
    return location, str(url.hostname)


# --- compose.scale.yaml ---------------------------------------------------------------------------


def test_the_stack_is_redis_three_shims_a_balancer_and_the_legacy_server(
    compose: dict[str, Any],
) -> None:
    """Exactly these services, and the legacy stand-in is the example's own, unchanged."""
    services = compose["services"]
    assert set(services) == {"redis", "lb", "legacy", *SHIMS}, sorted(services)
    assert redis_service(compose) == "redis"
    example = yaml.safe_load(EXAMPLE_COMPOSE.read_text())
    assert services["legacy"] == example["services"]["legacy"]


def test_every_shim_runs_the_same_image_command_and_shares_one_volume(
    compose: dict[str, Any], image_env: dict[str, str]
) -> None:
    """Built from this repo alike, no ``command`` (the image's CMD), the one named volume on
    the image's /data, SHIM_CONFIG naming the read-only mount of docker/shim-scale.yaml,
    LEGACY_URL naming the legacy service at the port its command listens on, and a mitmproxy
    folder of its own on the volume (three processes writing a first CA into one folder at
    once would read each other's half-written files)."""
    services = compose["services"]
    builds = [services[name].get("build") for name in SHIMS]
    assert builds[0] in (".", {"context": "."}) and all(b == builds[0] for b in builds), builds
    legacy_cmd = command(services["legacy"])
    legacy_listen = legacy_cmd[legacy_cmd.index("--listen") + 1]
    confdirs = set()
    for name in SHIMS:
        shim = services[name]
        assert "command" not in shim and "entrypoint" not in shim, name
        shared = [m for m in mounts(shim) if m.target == "/data"]
        assert shared == [Mount(SHARED_VOLUME, "/data", False)], (name, shim["volumes"])
        assert SHARED_VOLUME in compose["volumes"]
        env = environment(shim)
        config_mounts = [m for m in mounts(shim) if m.target == env["SHIM_CONFIG"]]
        assert len(config_mounts) == 1, (name, env["SHIM_CONFIG"], shim["volumes"])
        assert (REPO_ROOT / config_mounts[0].source).resolve() == SCALE_CONFIG
        assert config_mounts[0].read_only, config_mounts
        legacy_url = urlsplit(env["LEGACY_URL"])
        assert legacy_url.hostname == "legacy" and legacy_listen == f"0.0.0.0:{legacy_url.port}"
        confdir = env.get("SHIM_CONFDIR", image_env["SHIM_CONFDIR"])
        assert PurePosixPath(confdir).is_relative_to("/data"), confdir
        confdirs.add(confdir)
        assert depends_on(shim) == {"redis": "service_healthy", "legacy": "service_started"}
    assert len(confdirs) == len(SHIMS), confdirs


def test_only_the_balancer_publishes_a_port_on_the_loopback(compose: dict[str, Any]) -> None:
    """lb publishes 127.0.0.1:8000 to nginx's listener; no other service (the shims, Redis,
    the legacy server) publishes anything, so nothing gets past the balancer."""
    services = compose["services"]
    for name, service in services.items():
        if name != "lb":
            assert not service.get("ports"), f"{name} publishes {service.get('ports')}"
    lb = services["lb"]
    assert str(lb["image"]).startswith("nginx:"), lb["image"]
    assert [str(p) for p in lb["ports"]] == [f"127.0.0.1:{PUBLIC_PORT}:{PUBLIC_PORT}"]
    conf = [m for m in mounts(lb) if m.target == "/etc/nginx/nginx.conf"]
    assert len(conf) == 1 and conf[0].read_only, lb["volumes"]
    assert (REPO_ROOT / conf[0].source).resolve() == NGINX_CONF
    assert set(depends_on(lb)) == set(SHIMS), lb.get("depends_on")
    listens = [d.args for d in find(parse_nginx(NGINX_CONF.read_text()), "listen")]
    assert listens == [[str(PUBLIC_PORT)]], listens


def test_redis_persists_evicts_nothing_and_reports_its_health(compose: dict[str, Any]) -> None:
    """AOF on, noeviction (a lost or evicted record is a lost upload), its data on a named
    volume, and a redis-cli ping healthcheck, which the shims wait for."""
    redis_svc = compose["services"][redis_service(compose)]
    assert str(redis_svc["image"]).startswith("redis:7"), redis_svc["image"]
    argv = command(redis_svc)
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flags.get("--appendonly") == "yes" and flags.get("--maxmemory-policy") == "noeviction"
    data = [m for m in mounts(redis_svc) if m.target == "/data"]
    assert len(data) == 1 and named(data[0]) and data[0].source in compose["volumes"], data
    test = redis_svc["healthcheck"]["test"]
    assert "redis-cli ping" in (test if isinstance(test, str) else " ".join(test)), test


def test_every_named_volume_is_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {m.source for s in compose["services"].values() for m in mounts(s) if named(m)}
    assert used <= declared, used - declared
    for mount in (m for s in compose["services"].values() for m in mounts(s) if not named(m)):
        assert (REPO_ROOT / mount.source).exists(), mount


# --- docker/shim-scale.yaml -----------------------------------------------------------------------


def test_the_shim_config_names_the_compose_redis_and_the_shared_volume(
    compose: dict[str, Any],
) -> None:
    """It loads as the shim loads it; the Redis it names is the compose service that runs
    redis-server, at the port that one listens on; its storage.dir is where every shim mounts
    the shared volume; leases lapse sooner than by default."""
    config = shim_config.load(SCALE_CONFIG)
    storage = config.storage
    assert storage.backend == "redis"
    url = urlsplit(storage.redis_url)
    redis_name = redis_service(compose)
    assert url.scheme == "redis" and url.hostname == redis_name, storage.redis_url
    argv = command(compose["services"][redis_name])
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else REDIS_DEFAULT_PORT
    assert (url.port or REDIS_DEFAULT_PORT) == port, storage.redis_url
    targets = {m.target for name in SHIMS for m in mounts(compose["services"][name])
               if m.source == SHARED_VOLUME}
    assert targets == {storage.dir}, (targets, storage.dir)
    assert 0 < storage.lease_ttl < shim_config.StorageConfig().lease_ttl, storage.lease_ttl


def test_the_shims_send_no_interim_response_that_nginx_would_take_for_the_answer() -> None:
    """nginx's proxy takes an upstream 1xx (but 103, from 1.29) for the final response and
    stops sending the request body on; the only 1xx the shim sends is the IETF draft's 104,
    for an interop version it speaks: behind nginx it must speak none (or IETF be off)."""
    ietf = shim_config.load(SCALE_CONFIG).ietf
    assert not ietf.enabled or ietf.versions == (), ietf


# --- docker/nginx-scale.conf ----------------------------------------------------------------------


def test_nginx_balances_round_robin_over_exactly_the_three_shims(
    nginx: list[Directive], image_env: dict[str, str]
) -> None:
    """The proxied group lists each shim service once, at the port the image listens on
    (SHIM_LISTEN), with no stickiness of any kind (any instance serves any request)."""
    _, group = proxied_location(nginx)
    shims = upstream(nginx, group)
    _, listen_port = shim_main.split_listen(image_env["SHIM_LISTEN"])
    servers = shims.find("server")
    assert sorted(s.args[0] for s in servers) == [f"{name}:{listen_port}" for name in SHIMS]
    assert not [d.name for d in walk(nginx) if d.name in STICKY]
    for server in servers:
        extra = [a for a in server.args[1:] if a != "resolve"]
        assert not any(a.startswith(("backup", "down", "weight")) for a in extra), server.args
    if any("resolve" in s.args for s in servers):  # nginx >= 1.27.3 needs both for it
        assert shims.find("zone"), "resolve needs the upstream in a shared memory zone"
        assert effective(shims, "resolver"), "resolve needs a resolver"


def test_nginx_streams_bodies_and_passes_the_clients_host(nginx: list[Directive]) -> None:
    """No body size limit, no buffering either way, HTTP/1.1 (else chunked bodies are
    buffered), the client's Host (the shim builds upload URLs from it) and X-Forwarded-*."""
    location, _ = proxied_location(nginx)
    assert effective(location, "client_max_body_size") == [["0"]]
    assert effective(location, "proxy_request_buffering") == [["off"]]
    assert effective(location, "proxy_buffering") == [["off"]]
    assert effective(location, "proxy_http_version") == [["1.1"]]
    headers = {args[0].lower(): args[1] for args in effective(location, "proxy_set_header")}
    assert headers.get("host") == "$http_host", headers
    assert headers.get("x-forwarded-for") == "$proxy_add_x_forwarded_for", headers
    assert headers.get("x-forwarded-proto") == "$scheme", headers


def test_nginx_waits_for_slow_answers_and_retries_connection_errors_only(
    nginx: list[Directive],
) -> None:
    """Idle timeouts above the shims' own waits (delivery.wait for a final request,
    upstream.timeout for a request passed through), so the shim's answer arrives before
    nginx's 504; another shim tried on errors and timeouts, at most once per shim, and never
    ``non_idempotent`` (a sent POST/PATCH is not replayed elsewhere)."""
    location, _ = proxied_location(nginx)
    defaults = shim_config.Config()
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = effective(location, name)
        assert seconds(value[0]) > max(defaults.delivery.wait, defaults.upstream.timeout), name
    (next_upstream,) = effective(location, "proxy_next_upstream")
    assert set(next_upstream) <= {"error", "timeout"} and "error" in next_upstream, next_upstream
    assert effective(location, "proxy_next_upstream_tries") == [[str(len(SHIMS))]]
    everywhere = [a for d in find(nginx, "proxy_next_upstream") for a in d.args]
    assert "non_idempotent" not in everywhere, everywhere


# --- the real programs, when installed ------------------------------------------------------------


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """``nginx -t`` on a copy whose upstream servers are 127.0.0.1 (the shim services' names
    exist only in Docker's DNS, and a literal address needs no ``resolve``), with its prefix,
    pid and temporary folders in tmp_path so that it runs as any user. Skipped without nginx."""
    binary = shutil.which("nginx")
    if binary is None:
        pytest.skip("nginx is not installed")
    text = NGINX_CONF.read_text()
    copy, replaced = re.subn(r"(?m)^(\s*server\s+)[\w.-]+:(\d+)[^;]*;", r"\g<1>127.0.0.1:\2;", text)
    assert replaced == len(SHIMS), replaced
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    temp_paths = ["client_body", "proxy"] + [m for m in ("fastcgi", "uwsgi", "scgi")
                                            if f"--without-http_{m}_module" not in built]
    for name in temp_paths:
        (tmp_path / name).mkdir()
    settings = "".join(f"    {name}_temp_path {tmp_path / name};\n" for name in temp_paths)
    copy = copy.replace("http {\n", "http {\n" + settings, 1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(copy)
    done = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
         "-g", f"pid {tmp_path / 'nginx.pid'};", "-c", str(conf)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr


def test_redis_runs_with_the_compose_flags_and_the_shim_config_opens_it(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """redis-server with the compose command's own flags (on 127.0.0.1 and a free port, as
    tests/redis_server.py runs it) has AOF on and noeviction; the operator command line opens
    the store of docker/shim-scale.yaml on it (its Redis and folder moved here) and lists no
    upload. Skipped without redis-server."""
    if not REDIS_SERVER.exists():
        pytest.skip("redis-server is not installed")
    argv = command(compose["services"][redis_service(compose)])
    server = RedisServer(tmp_path / "redis", extra_args=argv[1:]).start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        finally:
            client.close()
        raw = yaml.safe_load(SCALE_CONFIG.read_text())
        raw["storage"].update(redis_url=server.url, dir=str(tmp_path / "data"))
        (tmp_path / "data" / "data").mkdir(parents=True)
        config = tmp_path / "shim-scale.yaml"
        config.write_text(yaml.safe_dump(raw))
        done = subprocess.run(
            [sys.executable, "-m", "shim", "uploads", "--json", "--config", str(config)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
            timeout=TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [], done.stdout
    finally:
        server.close()
