"""The only place the shim reaches into mitmproxy internals (not API; pinned to 12.2.x in
pyproject.toml). Every lookup is guarded: a client that is already gone is not an error."""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

log = logging.getLogger("shim.mitm")


def close_client(flow: http.HTTPFlow, reason: str) -> bool:
    """Close the client connection of a flow whose body is still arriving, the way mitmproxy's
    own inactivity timeout does (ConnectionHandler.on_timeout); its `error` hook then runs.

    Used to end an earlier request on an upload when a new one arrives (IETF resumable
    uploads draft, "Concurrency"; also how tusd releases stale locks). On HTTP/2 this closes
    the whole connection, not only the stream."""
    try:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections[flow.client_conn.id]
        task = handler.transports[handler.client].handler
    except (AttributeError, KeyError):
        return False
    if task is None:
        return False
    log.info("shim: closing %s: %s", flow.client_conn.peername, reason)
    task.cancel(reason)
    return True
