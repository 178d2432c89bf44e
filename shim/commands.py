"""The commands protocol modules hand to the executor, and the outcome they get back.

Commands are the protocol-independent verbs of resumable uploads: open (create), append,
inspect, cancel, concatenate, or answer at once. A protocol module builds them from a request
and renders an `Outcome` into a reply; `shim.exchange` carries them out on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from shim.engine import BodyFilter, Checksum, Delivery, NewUpload
from shim.errors import ShimError
from shim.model import Reply, Upload
from shim.wire import ContentRange


@dataclass(frozen=True)
class Immediate:
    """Answer with `reply` and touch nothing (OPTIONS, or a request refused while parsing)."""

    reply: Reply


@dataclass(frozen=True)
class NeedBody:
    """The protocol decides only once it has seen the (small) body: parse is asked again
    with `Request.body` set, and may still return None (the request passes through)."""

    limit: int


@dataclass(frozen=True)
class Forward:
    """Not the shim's request, but add `token` to the legacy server's `field` on the way
    back (WebDAV: `DAV: 1, 2, resumable-upload`)."""

    field: str
    token: str


@dataclass(frozen=True)
class Report:
    """List the uploads in progress whose keys start with `key_prefix`."""

    owner: str
    key_prefix: str
    exact_key: str = ""
    within: str | None = None
    """Only while the owner's upload with this id is in progress (S3 ListParts)."""


@dataclass(frozen=True)
class Refuse:
    error: ShimError


@dataclass(frozen=True)
class Open:
    """Create an upload; with `with_body`, the request's body is its first bytes."""

    new: NewUpload
    with_body: bool = False
    checksum: Checksum | None = None
    complete_at_end: bool = False
    """The body is the rest of the file: its end fixes the length (IETF `Upload-Complete: ?1`
    with a body of unknown length)."""
    interim: Reply | None = None
    """A 1xx to send before the body is read (IETF 104 Upload Resumption Supported)."""
    body_filter: BodyFilter | None = field(default=None, compare=False)
    """Decodes and judges the body (S3); the body is then whole or absent: refused or cut
    off, it leaves no upload behind."""
    key: str | None = None
    """Name the upload `key` once its body is accepted; an upload the key named before goes
    (S3: a part written again replaces the earlier one)."""
    within: str | None = None
    """The id of the owner's upload in progress this one is a part of (an S3 multipart
    upload): it must be receiving, and counts as active."""


@dataclass(frozen=True)
class Append:
    """Bytes at exactly `offset` (tus, IETF). The upload is named by `upload_id`, or found
    by `key` (a protocol that names uploads by URL)."""

    upload_id: str | None
    owner: str
    offset: int
    checksum: Checksum | None = None
    declared_length: int | None = None
    max_size: int = 0
    complete_at_end: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    key: str | None = None


@dataclass(frozen=True)
class Inspect:
    upload_id: str | None
    owner: str
    take_over: bool = False
    """End a request still writing to the upload first (the IETF draft's HEAD does; tus's
    HEAD only reports progress, so a monitoring HEAD never breaks an upload)."""
    key: str | None = None
    pass_if_missing: bool = False
    """No upload under `key`: the request is not the shim's, it goes to the legacy server."""
    settle: bool = True
    """Queue a complete upload and wait for its delivery's outcome; False: only look (S3
    HeadObject must not wait on the legacy server)."""


@dataclass(frozen=True)
class Cancel:
    upload_id: str | None
    owner: str
    key: str | None = None
    family: str | None = None
    """Key prefix of the uploads that go with it (the parts of an S3 multipart upload)."""


@dataclass(frozen=True)
class Assemble:
    """Complete the upload `upload_id` from the uploads named by `(key, tag)` pairs, in order,
    and deliver it (S3 CompleteMultipartUpload; see Engine.assemble)."""

    upload_id: str
    owner: str
    parts: tuple[tuple[str, str], ...]
    min_part_size: int
    family: str
    key: str | None = None
    """Name the assembled upload `key` (S3: the object's name, for HeadObject)."""
    facts: dict[str, str] = field(default_factory=dict)
    """Metadata the assembled upload keeps (S3: its multipart ETag)."""


@dataclass(frozen=True)
class WriteRange:
    """Bytes `start`.. of an upload named by `upload_id`, or found by `key` and made from
    `new` when a range starts at 0 and there is none (or the last one was delivered).
    `start` None is an inquiry; `total` fixes the length once known."""

    owner: str
    new: NewUpload | None = None
    key: str | None = None
    upload_id: str | None = None
    start: int | None = None
    total: int | None = None
    max_size: int = 0
    size: int | None = None
    """The bytes the body carries by its range (`Content-Range: bytes S-E/..` is E-S+1): a
    body that turns out longer or shorter is refused (400) and nothing of it is kept."""
    restart: bool = False
    """A whole file from 0 (WebDAV, tus on the target URL): a new upload replaces one in
    progress under the same key instead of continuing it."""


@dataclass(frozen=True)
class Concatenate:
    new: NewUpload


@dataclass(frozen=True)
class RangeStart:
    """A body decoder found the head of a range: the bytes that follow belong to it."""

    range: ContentRange


class BodyDecoder(Protocol):
    """Turns a body made of ranges (message/byteranges, multipart/byteranges) into range
    starts and data, chunk by chunk, holding only a part's header block in memory."""

    def feed(self, data: bytes) -> list[RangeStart | bytes]: ...

    def end(self) -> None:
        """The body ended: raise ShimError if it ended inside a part."""


@dataclass(frozen=True)
class WriteSegments:
    """Write the ranges a body carries to the upload found by `key` (made from `new` when a
    first range starts at 0). `if_none_match`: refuse while an upload is in progress."""

    owner: str
    new: NewUpload
    key: str
    decoder: BodyDecoder = field(compare=False)
    if_none_match: bool = False
    max_size: int = 0
    upload_id: str | None = None


Command = (Immediate | Refuse | Open | Append | Inspect | Cancel | Concatenate | WriteRange
           | WriteSegments | NeedBody | Forward | Report | Assemble)


@dataclass(frozen=True)
class Outcome:
    """What happened: the upload's state afterwards, the delivery if one ran, or the error."""

    upload: Upload | None = None
    offset: int = 0
    delivery: Delivery | None = None
    error: ShimError | None = None
    listing: tuple[tuple[str, Upload], ...] = ()
    """For a Report: (key, upload) of each upload in progress."""
