"""Plain values passed between the layers: no I/O, no mitmproxy, no disk.

A protocol module turns a `Request` into a command, the engine turns the command into an
`Upload` state or an `Answer` from the legacy server, and the protocol renders a `Reply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shim.lifecycle import FINAL, GONE, State

HeaderList = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Request:
    """The head of a client request, as the protocol modules see it (the body is streamed)."""

    method: str
    path: str
    query: str = ""
    fields: HeaderList = ()
    body_length: int | None = 0
    """Content-Length; None when the body is chunked and its length is not known yet."""
    body: bytes | None = None
    """The whole body, only for the small bodies a protocol asked to see (`NeedBody`)."""
    origin: str = ""
    """`scheme://host[:port]` for the absolute URLs the shim writes: `public_url`, else as
    the client addressed the shim; "" if the request named no (valid) host."""

    def absolute(self, path: str) -> str:
        """An absolute URL on the shim for `path` (a relative one when the host is unknown)."""
        return self.origin + path
    def header(self, name: str) -> str | None:
        """The value of a header, repeated fields joined with ", " (RFC 9110 section 5.3)."""
        wanted = name.lower()
        values = [value for key, value in self.fields if key.lower() == wanted]
        return ", ".join(values) if values else None

    @property
    def has_body(self) -> bool:
        return self.body_length is None or self.body_length > 0

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(frozen=True)
class Reply:
    """What the shim answers the client itself."""

    status: int
    headers: HeaderList = ()
    body: bytes = b""
    reason: str | None = None


@dataclass(frozen=True)
class Target:
    """The ONE request that carries a finished file to the legacy server."""

    method: str
    path: str
    headers: HeaderList = ()
    body: Literal["raw", "multipart"] = "raw"
    field: str = "file"
    filename: str | None = None
    content_type: str | None = None
    host: str | None = None
    """The creating request's Host, sent instead of the legacy server's authority when the
    operator set mitmproxy's `keep_host_header` (as pass-through sends it)."""


@dataclass(frozen=True)
class Answer:
    """The legacy server's answer to a delivery, recorded so that a retry can replay it."""

    status: int
    reason: str
    headers: HeaderList
    body: bytes

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class Upload:
    """The durable state of one upload. `offset` counts committed bytes only.

    Records are saved with compare-and-set on `version`; `state` changes only through
    `shim.lifecycle.advance`."""

    id: str
    protocol: str
    owner: str
    length: int | None
    offset: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    target: Target | None = None
    parts: tuple[str, ...] = ()
    """For a concatenated upload: the ids of the uploads whose bytes it is made of."""
    exclusive_parts: bool = False
    """Its parts are its alone (S3 multipart): their bytes and records go with its own."""
    created: float = 0.0
    updated: float = 0.0
    """When the upload was last active (WebDAV's last-chunk-saved)."""
    expires_after: int = 0
    """Seconds of inactivity after which the upload is removed; 0: never."""
    state: State = State.RECEIVING
    version: int = 0
    """Bumped by every save; a save that names an older version is refused (a conflict)."""
    answer: Answer | None = None
    """The legacy server's final answer (accepted or refused), replayed to every retry."""
    problem: str = ""
    """Why the last delivery attempt got no answer; for FAILED, why it was given up."""
    attempts: int = 0
    first_attempt: float | None = None
    last_bytes_sent: bool = False
    """The attempt in DELIVERING has begun to send the file's last bytes: from then on a
    crash leaves its outcome unknown."""
    next_attempt: float = 0.0
    """When the outbox should try (again) to deliver a COMPLETE upload."""
    unverified_from: int | None = None
    """Set while a checksummed chunk is being written: bytes past it are not yet committed."""
    digests: dict[str, str] = field(default_factory=dict)
    """Expected digests of the whole file (hashlib name -> base64), checked before delivery."""
    sha256: str | None = None
    """Hex SHA-256 of the file once it was delivered: a repeat with the same bytes gets the
    recorded answer instead of a second delivery."""
    keyed: bool = False
    """A key names it (its protocol finds it by URL): a later upload under that key may
    repeat its bytes, so its delivery records their SHA-256 (`sha256`)."""
    previous: str | None = None
    """The upload delivered earlier under the same key, for that duplicate check."""
    max_size: int = 0
    """The largest the upload may become (0: no limit); a concatenation's length is checked
    against it again whenever its parts' lengths become known."""
    account: str | None = None
    """Whom the upload counts against for the caps on uploads in progress, when not its
    owner (a Google session URI is a capability with no owner, but its creator counts)."""

    @property
    def complete(self) -> bool:
        return self.length is not None and self.offset >= self.length

    @property
    def delivered(self) -> bool:
        """The legacy server gave its final word on this file (accepted or refused)."""
        return self.state in FINAL

    @property
    def gone(self) -> bool:
        return self.state in GONE

    @property
    def expires(self) -> float | None:
        return self.updated + self.expires_after if self.expires_after else None

    @property
    def receiving(self) -> bool:
        return self.state is State.RECEIVING
