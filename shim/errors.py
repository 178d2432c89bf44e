"""One error type for everything the shim refuses, carrying the HTTP answer it implies.

Modelled on tusd's `NewError("ERR_UPLOAD_LOCKED", "file currently locked", 423)`: the engine
raises a `ShimError` with a stable `code`; each protocol module may render the code its own
way (tus answers plain text, the IETF draft a problem document), and falls back to `status`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class ShimError(Exception):
    """A refused request: `code` is stable for programs, `message` is for people.

    Not frozen: Python sets `__traceback__` on exceptions as they propagate."""

    code: str
    message: str
    status: int
    details: dict[str, int | str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """The details meant as response fields (capitalised keys, e.g. `Retry-After`)."""
        return tuple((k, str(v)) for k, v in self.details.items() if k[0].isupper())


def bad_request(message: str) -> ShimError:
    return ShimError("bad-request", message, 400)


def not_found(message: str = "no such upload") -> ShimError:
    return ShimError("not-found", message, 404)


def gone(message: str = "the upload was terminated or has expired") -> ShimError:
    return ShimError("gone", message, 410)


def forbidden(message: str) -> ShimError:
    return ShimError("forbidden", message, 403)


def offset_mismatch(expected: int, provided: int) -> ShimError:
    return ShimError(
        "offset-mismatch",
        f"Upload-Offset {provided} does not match the stored offset {expected}",
        409,
        {"expected-offset": expected, "provided-offset": provided},
    )


def too_large(message: str) -> ShimError:
    return ShimError("too-large", message, 413)


def locked() -> ShimError:
    return ShimError("locked", "another request is writing to this upload", 423)


def checksum_mismatch(algorithm: str) -> ShimError:
    # 460 is tus's own status for this (tus 1.0.0, "Checksum" extension).
    return ShimError("checksum-mismatch", f"the {algorithm} checksum of the chunk does not match", 460)


def insufficient_storage(message: str) -> ShimError:
    return ShimError("insufficient-storage", message, 507)


def too_many(message: str, retry_after: int) -> ShimError:
    """A cap on uploads in progress was reached (RFC 6585 section 4)."""
    return ShimError("too-many-uploads", message, 429, {"Retry-After": retry_after})
