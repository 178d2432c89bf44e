"""The shim's configuration: YAML in, a frozen, validated `Config` out.

Every key has a default, so the shim runs with no file at all. An error names the key and the
problem (`tus.forward.body: must be one of 'raw', 'multipart', not 'form'`), and the shim
refuses to start.
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

SUPPORTED_INTEROP_VERSIONS = frozenset({3, 5, 6, 7, 8, 9})
DEFAULT_MAX_SIZE = 10 * 1024**3
"""Every protocol's largest upload unless configured (0: no limit)."""


class ConfigError(ValueError):
    """A configuration that the shim refuses to start with."""


@dataclass(frozen=True)
class ForwardConfig:
    method: Literal["PUT", "POST"] = "PUT"
    path: str = "/uploads/{id}"
    body: Literal["raw", "multipart"] = "raw"
    field: str = "file"


@dataclass(frozen=True)
class TusConfig:
    enabled: bool = True
    endpoint: str = "/files/"
    max_size: int = DEFAULT_MAX_SIZE
    """Largest upload accepted, in bytes; 0 means no limit (advertised as Tus-Max-Size)."""
    expiration: int = 86400
    """Seconds of inactivity after which an unfinished upload is removed; 0 means never."""
    forward: ForwardConfig = field(default_factory=ForwardConfig)


@dataclass(frozen=True)
class ContentRangeConfig:
    enabled: bool = True
    paths: tuple[str, ...] = ()
    """Path prefixes where PUT/POST with Content-Range is a resumable upload; empty: all."""
    sessions: bool = True
    """Google-style sessions: POST ?uploadType=resumable or x-goog-resumable: start."""
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class IetfConfig:
    enabled: bool = True
    prefix: str = "/.well-known/resumable-uploads/"
    """Where the shim's upload resources live: {prefix}<id>."""
    paths: tuple[str, ...] = ()
    """Path prefixes where a POST/PUT with Upload-Complete is upgraded; empty: all."""
    versions: tuple[int, ...] = (3, 5, 6, 7, 8, 9)
    """Upload-Draft-Interop-Version values spoken (9: draft -12)."""
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class TusTargetConfig:
    """tus core on the target URL itself (seed 003): PUT/HEAD/PATCH <url> with Tus-Resumable."""

    enabled: bool = True
    paths: tuple[str, ...] = ()
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class Seed001Config:
    """Seed 001's variants, each off by default: PUT <url>?range=S-E/T, and PUT with
    Expect: Range + Range: bytes S-E/T."""

    query_range: bool = False
    expect_range: bool = False
    paths: tuple[str, ...] = ()
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class ByterangesConfig:
    """PATCH <url> with message/byteranges or multipart/byteranges (seed 004)."""

    enabled: bool = True
    paths: tuple[str, ...] = ()
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class WebdavConfig:
    """WebDAV resumable upload (seed 002), only under these path prefixes."""

    paths: tuple[str, ...] = ()
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 86400


@dataclass(frozen=True)
class S3Credential:
    """One S3 access key the shim takes, and what its deliveries carry."""

    access_key: str = ""
    secret: str = ""
    forward_headers: dict[str, str] = field(default_factory=dict)
    """Fields sent to the legacy server with the files this key uploads (its own
    `Authorization`, say): the client's S3 signature never is."""


@dataclass(frozen=True)
class S3ForwardConfig(ForwardConfig):
    path: str = "/uploads/{bucket}/{key}"
    """Template over {bucket}, {key} (its `/` kept, each segment checked) and {id}."""
    metadata: bool = True
    """Forward the object's `x-amz-meta-*` fields with the file."""


@dataclass(frozen=True)
class S3Config:
    """The S3 multipart upload API (and PutObject) under these path prefixes, where the path
    below the prefix is <bucket>/<key>; off when empty."""

    paths: tuple[str, ...] = ()
    auth: Literal["sigv4", "none"] = "sigv4"
    """sigv4: AWS Signature Version 4 with `credentials`; none: unsigned requests taken, the
    access key id in them (if any) names the owner (for trusted networks only)."""
    credentials: tuple[S3Credential, ...] = ()
    min_part_size: int = 5 * 1024 * 1024
    """Every part but the last must be at least this big (S3's own rule: 5 MiB)."""
    max_size: int = DEFAULT_MAX_SIZE
    expiration: int = 7 * 86400
    """Seconds of inactivity after which an unfinished multipart upload is removed."""
    forward: S3ForwardConfig = field(default_factory=S3ForwardConfig)


@dataclass(frozen=True)
class StorageConfig:
    dir: str = "./shim-data"
    """Where the bytes are (and, with the local backend, the records). With `redis`, a
    folder every instance mounts at this path."""
    fsync: bool = True
    """fsync each chunk before acknowledging it, so an acknowledged byte survives power loss."""
    min_free_bytes: int = 64 * 1024 * 1024
    """Refuse to store more (507) when the disk has less free space than this."""
    backend: Literal["local", "redis"] = "local"
    """local: one shim process owns `dir` (records in SQLite beside the bytes). redis: several
    instances share uploads, records and leases in Redis at `redis_url`, bytes in `dir`."""
    redis_url: str = ""
    """redis://[:password@]host:port/db, rediss://... (TLS) or unix:///path.sock."""
    lease_ttl: float = 60.0
    """Seconds after which the write and delivery leases of a crashed shim lapse (they are
    renewed every third of it while a body or a delivery runs): how long a SIGKILLed
    instance's uploads wait before another instance may take them."""
    sweep_interval: float = 600.0
    """Seconds between sweeps that remove expired uploads (and once at start-up); with
    several instances each sweeps, and each removal is compare-and-set."""


@dataclass(frozen=True)
class UpstreamConfig:
    timeout: float = 300.0
    """Idle timeout: seconds the legacy server may take to accept a connection, take the
    next piece of the file, or send the next piece of its answer."""


@dataclass(frozen=True)
class DeliveryConfig:
    wait: float = 30.0
    """Seconds a client's final request waits for the delivery's outcome before 503 +
    Retry-After (the delivery goes on; a retry or HEAD gets the outcome)."""
    give_up_after: float = 86400.0
    """Seconds after the first attempt when retries stop and the upload is FAILED."""
    on_unknown: Literal["hold", "retry"] = "hold"
    """The whole file was sent and no answer came: hold (FAILED, no second attempt) or retry
    (at-least-once)."""


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may take of the shim (issue 9: no client exhausts it for the rest)."""

    header_bytes: int = 64 * 1024
    """Largest request head (request line and fields); past it: 431."""
    uploads_per_owner: int = 100
    """Uploads in progress per owner (`owner_header` value; anonymous ones share one); 0: any."""
    uploads_total: int = 10_000
    """Uploads in progress in all; 0: any. Past either cap a creation gets 429 + Retry-After."""
    client_timeout: int = 60
    """Seconds a client connection may send nothing before it is closed (headers and body)."""


@dataclass(frozen=True)
class GuardConfig:
    pass_through: bool = False
    """Forward requests that announce a partial upload no enabled protocol takes (for a
    legacy server that understands Content-Range itself) instead of refusing them (400)."""


@dataclass(frozen=True)
class AuthConfig:
    """Ask the legacy server whether a client may upload before storing a byte."""

    preflight: Literal["none", "expect", "url"] = "none"
    url: str = ""
    """For `url`: the absolute URL a GET with the client's credentials is sent to."""
    timeout: float = 10.0
    expect_wait: float = 1.0
    """For `expect`: seconds to wait for 100 Continue or a final answer; silence after it
    counts as "go ahead" (RFC 9110 section 10.1.1: many servers ignore Expect)."""


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "127.0.0.1:9464"
    """HOST:PORT of /healthz, /readyz and /metrics (Prometheus), off the public port;
    empty: off."""


@dataclass(frozen=True)
class CorsConfig:
    """Cross-origin uploads from browser pages (the Fetch standard's CORS protocol)."""

    origins: tuple[str, ...] = ()
    """Origins whose pages may upload (`https://app.example.com`, or `*`); empty: CORS off."""
    max_age: int = 600
    """Seconds a browser may cache a preflight's answer."""
    credentials: bool = False
    """Let pages send cookies / HTTP auth (then `*` answers with the page's own origin)."""


@dataclass(frozen=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    tus: TusConfig = field(default_factory=TusConfig)
    content_range: ContentRangeConfig = field(default_factory=ContentRangeConfig)
    ietf: IetfConfig = field(default_factory=IetfConfig)
    tus_target: TusTargetConfig = field(default_factory=TusTargetConfig)
    seed001: Seed001Config = field(default_factory=Seed001Config)
    byteranges: ByterangesConfig = field(default_factory=ByterangesConfig)
    webdav: WebdavConfig = field(default_factory=WebdavConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    s3: S3Config = field(default_factory=S3Config)
    admin: AdminConfig = field(default_factory=AdminConfig)
    public_url: str = ""
    """`scheme://host[:port]` of every absolute URL the shim writes (IETF Location, Google
    session URIs); empty: the client's own Host, which must then be a valid host[:port]."""
    owner_header: str = "authorization"
    """Requests on an upload must carry the same value of this header as the one that made it."""


def load(path: str | Path | None) -> Config:
    """Read a YAML file (or nothing: the embedded defaults) into a validated Config."""
    if path is None or str(path) == "":
        return Config()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return from_dict(raw or {})


def from_dict(raw: object) -> Config:
    """The validated config; ConfigError lists every problem at once, one line each."""
    problems: list[str] = []
    config = _build(Config, raw, "", problems)  # a bad value is left at its default...
    _check(config, problems)  # ...so the rules between values can still be checked
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _build[T](cls: type[T], raw: object, prefix: str, problems: list[str]) -> T:
    """`cls` from `raw`; a key that is unknown or has a bad value is reported in `problems`
    and left at its default, so that the rest is still checked."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: must be a mapping")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
            continue
        try:
            values[key] = _convert(hints[key], value, f"{prefix}{key}", problems)
        except ConfigError as exc:
            problems.append(str(exc))
    return cls(**values)


def _convert(hint: Any, value: object, key: str, problems: list[str]) -> object:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", problems)  # type: ignore[arg-type]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key}: must be one of {allowed}, not {value!r}")
        return value
    if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list of mappings")
        item_class = typing.get_args(hint)[0]
        return tuple(_build(item_class, item, f"{key}[{i}].", problems)
                     for i, item in enumerate(value))
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{key}: must be a mapping of strings to strings")
        return dict(value)
    if typing.get_origin(hint) is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(
                isinstance(item, item_type) and not isinstance(item, bool) for item in value):
            raise ConfigError(f"{key}: must be a list of {item_type.__name__}s")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: must be {hint.__name__}, not {type(value).__name__}")
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such key yet
        raise ConfigError(f"{key}: unsupported type")
    return value


def _check_storage(storage: StorageConfig, problems: list[str]) -> None:
    for key, positive in (("lease_ttl", storage.lease_ttl),
                          ("sweep_interval", storage.sweep_interval)):
        if positive <= 0:
            problems.append(f"storage.{key}: must be positive, not {positive}")
    if storage.backend == "redis" and not storage.redis_url.startswith(REDIS_SCHEMES):
        problems.append("storage.redis_url: must be redis://host:port/db, rediss://... or "
                        f"unix:///path with storage.backend: redis, not {storage.redis_url!r}")
    if storage.backend == "local" and storage.redis_url:
        problems.append("storage.redis_url: only used with storage.backend: redis")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check(config: Config, problems: list[str]) -> None:
    """Rules between values that types alone cannot say."""
    endpoint = config.tus.endpoint
    if not endpoint.startswith("/") or not endpoint.endswith("/"):
        problems.append(f"tus.endpoint: must start and end with '/', not {endpoint!r}")
    try:
        _check_template("tus.forward.path", config.tus.forward.path)
    except ConfigError as exc:
        problems.append(str(exc))
    for key, prefixes in (("content_range.paths", config.content_range.paths),
                          ("ietf.paths", config.ietf.paths),
                          ("tus_target.paths", config.tus_target.paths),
                          ("seed001.paths", config.seed001.paths),
                          ("byteranges.paths", config.byteranges.paths),
                          ("webdav.paths", config.webdav.paths),
                          ("s3.paths", config.s3.paths)):
        for prefix in prefixes:
            if not prefix.startswith("/"):
                problems.append(f"{key}: {prefix!r} must start with '/'")
    ietf = config.ietf
    if not ietf.prefix.startswith("/") or not ietf.prefix.endswith("/"):
        problems.append(f"ietf.prefix: must start and end with '/', not {ietf.prefix!r}")
    unknown = set(ietf.versions) - SUPPORTED_INTEROP_VERSIONS
    if unknown:
        problems.append(f"ietf.versions: {sorted(unknown)} not supported "
                        f"(supported: {sorted(SUPPORTED_INTEROP_VERSIONS)})")
    for key, number in (
        ("content_range.max_size", config.content_range.max_size),
        ("content_range.expiration", config.content_range.expiration),
        ("ietf.max_size", config.ietf.max_size),
        ("tus_target.max_size", config.tus_target.max_size),
        ("seed001.max_size", config.seed001.max_size),
        ("byteranges.max_size", config.byteranges.max_size),
        ("webdav.max_size", config.webdav.max_size),
        ("s3.max_size", config.s3.max_size),
        ("s3.min_part_size", config.s3.min_part_size),
        ("s3.expiration", config.s3.expiration),
        ("ietf.expiration", config.ietf.expiration),
        ("tus.max_size", config.tus.max_size),
        ("tus.expiration", config.tus.expiration),
        ("storage.min_free_bytes", config.storage.min_free_bytes),
        ("limits.uploads_per_owner", config.limits.uploads_per_owner),
        ("limits.uploads_total", config.limits.uploads_total),
    ):
        if number < 0:
            problems.append(f"{key}: must not be negative, not {number}")
    for key, positive in (("upstream.timeout", config.upstream.timeout),
                         ("delivery.wait", config.delivery.wait),
                         ("delivery.give_up_after", config.delivery.give_up_after),
                         ("limits.header_bytes", config.limits.header_bytes),
                         ("limits.client_timeout", config.limits.client_timeout),
                         ("auth.timeout", config.auth.timeout),
                         ("auth.expect_wait", config.auth.expect_wait)):
        if positive <= 0:
            problems.append(f"{key}: must be positive, not {positive}")
    _check_s3(config.s3, problems)
    _check_storage(config.storage, problems)
    if not config.tus.forward.field:
        problems.append("tus.forward.field: must not be empty")
    if config.public_url and not _is_origin(config.public_url):
        problems.append(f"public_url: must be scheme://host[:port] with no path, "
                        f"not {config.public_url!r}")
    host, _, port = config.admin.listen.rpartition(":")
    if config.admin.listen and (not host or not port.isdigit() or int(port) > 65535):
        problems.append(f"admin.listen: must be HOST:PORT or empty, not {config.admin.listen!r}")
    if config.auth.preflight == "url" and not _is_origin(config.auth.url, path=True):
        problems.append(f"auth.url: preflight 'url' needs an http(s) URL, not {config.auth.url!r}")


def _check_s3(s3: S3Config, problems: list[str]) -> None:
    for prefix in s3.paths:
        if not prefix.endswith("/"):
            problems.append(f"s3.paths: {prefix!r} must end with '/' (the bucket follows)")
    try:
        _check_template("s3.forward.path", s3.forward.path)
    except ConfigError as exc:
        problems.append(str(exc))
    if s3.paths and s3.auth == "sigv4" and not s3.credentials:
        problems.append("s3.credentials: sigv4 needs at least one access key (or s3.auth: none)")
    for i, credential in enumerate(s3.credentials):
        if not credential.access_key or not credential.secret:
            problems.append(f"s3.credentials[{i}]: needs access_key and secret")
    keys = [credential.access_key for credential in s3.credentials]
    if len(set(keys)) != len(keys):
        problems.append("s3.credentials: an access key is listed twice")


def _is_origin(value: str, path: bool = False) -> bool:
    """An http(s) URL with a host (and, unless `path`, nothing after the authority)."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return path or (parts.path in ("", "/") and not parts.query and not parts.fragment)


def _check_template(key: str, template: str) -> None:
    if not template.startswith("/"):
        raise ConfigError(f"{key}: must start with '/', not {template!r}")
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid template: {exc}") from exc
    for name in names:
        if not name.isidentifier():
            raise ConfigError(f"{key}: {{{name}}} is not a plain placeholder name")
