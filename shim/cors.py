"""CORS for the shim's own answers (the Fetch standard, "CORS protocol"), so that a page on
another origin can upload with tus-js-client or Uppy. Pure: no I/O, no mitmproxy.

The shim answers a preflight itself when the request it previews is an upload (to one of its
own upload URLs, or carrying a resumable-upload field), and adds `Access-Control-Allow-Origin`
and `-Expose-Headers` to every answer it gives itself. What passes through to the legacy
server is the legacy server's business, CORS included.
"""

from __future__ import annotations

from shim.config import CorsConfig
from shim.model import HeaderList, Reply, Request
from shim.targets import PROTOCOL_FIELDS, PROTOCOL_PREFIXES

EXPOSED = (
    "Location", "Upload-Offset", "Upload-Length", "Upload-Expires", "Upload-Metadata",
    "Upload-Concat", "Upload-Complete", "Upload-Incomplete", "Upload-Limit",
    "Upload-Draft-Interop-Version", "Tus-Resumable", "Tus-Version", "Tus-Extension",
    "Tus-Max-Size", "Tus-Checksum-Algorithm", "Range", "Retry-After",
    "Shim-Upstream-Status", "Shim-Upstream-Location", "ETag",
)
"""The fields a script may read from the shim's answers: everything its protocols say."""
METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class Cors:
    def __init__(self, config: CorsConfig, upload_prefixes: tuple[str, ...]) -> None:
        self.config = config
        self.upload_prefixes = upload_prefixes
        """Paths that are the shim's own upload URLs (the tus endpoint, IETF resources)."""

    def allowed(self, request: Request) -> str | None:
        """The `Access-Control-Allow-Origin` value for this request's Origin, or None."""
        origin = request.header("origin")
        if origin is None or not self.config.origins:
            return None
        if "*" in self.config.origins and not self.config.credentials:
            return "*"
        if origin in self.config.origins or "*" in self.config.origins:
            return origin  # credentials forbid "*": the origin itself, with Vary: Origin
        return None

    def preflight(self, request: Request) -> Reply | None:
        """The answer to a CORS preflight for an upload; None for any other request (a
        preflight of the legacy server's own resources passes through to it)."""
        method = request.header("access-control-request-method")
        if not self.config.origins or request.method != "OPTIONS" or method is None \
                or not self._for_upload(request):
            return None  # CORS off, or not a preflight of an upload
        origin = self.allowed(request)
        if origin is None:
            return Reply(403, (("Vary", "Origin"),), b"this origin may not upload here\n")
        asked = request.header("access-control-request-headers") or ""
        headers = [*self._origin_fields(origin),
                   ("Access-Control-Allow-Methods", METHODS),
                   ("Access-Control-Max-Age", str(self.config.max_age))]
        if asked.strip():
            headers.append(("Access-Control-Allow-Headers", asked))
        return Reply(204, tuple(headers))

    def fields(self, request: Request) -> HeaderList:
        """What to add to an answer the shim gives itself."""
        origin = self.allowed(request)
        if origin is None:
            return ()
        return (*self._origin_fields(origin),
                ("Access-Control-Expose-Headers", ", ".join(EXPOSED)))

    def _origin_fields(self, origin: str) -> list[tuple[str, str]]:
        fields = [("Access-Control-Allow-Origin", origin)]
        if origin != "*":
            fields.append(("Vary", "Origin"))
        if self.config.credentials:
            fields.append(("Access-Control-Allow-Credentials", "true"))
        return fields

    def _for_upload(self, request: Request) -> bool:
        """Whether the previewed request is an upload: to the shim's own upload URLs, or
        carrying a field of a resumable-upload protocol."""
        if any(request.path.startswith(prefix) or request.path == prefix.rstrip("/")
               for prefix in self.upload_prefixes):
            return True
        asked = (request.header("access-control-request-headers") or "").lower()
        names = {name.strip() for name in asked.split(",") if name.strip()}
        return any(name in PROTOCOL_FIELDS or name.startswith(PROTOCOL_PREFIXES)
                   for name in names)
