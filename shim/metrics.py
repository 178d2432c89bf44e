"""What the shim counts, for Prometheus (`prometheus-client`), in a registry of its own so
that several shims in one process (tests) never collide. The engine and the outbox record;
the admin listener (`shim.admin`) serves it."""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shim.model import Upload

events = logging.getLogger("shim.events")


class Metrics:
    def __init__(self, log_format: Literal["text", "json"] = "text") -> None:
        self.log_format = log_format
        """How `record` writes its line: `key=value` pairs, or one JSON object."""
        self.registry = CollectorRegistry()
        registry = self.registry
        self.uploads = Counter("shim_uploads", "Upload events, by protocol and event "
                               "(created, completed, delivered, refused, failed, expired, "
                               "terminated)", ["protocol", "event"], registry=registry)
        self.bytes_received = Counter("shim_bytes_received", "Body bytes stored, by protocol",
                                      ["protocol"], registry=registry)
        self.attempts = Counter("shim_delivery_attempts", "Delivery attempts, by result "
                                "(delivered, refused, transient, unknown, gave_up)",
                                ["result"], registry=registry)
        self.delivery_seconds = Histogram(
            "shim_delivery_seconds", "Time from an upload's completion to the legacy server's "
            "final answer", registry=registry,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400))
        self.in_progress = Gauge("shim_uploads_in_progress", "Uploads still receiving",
                                 registry=registry)
        self.disk_free = Gauge("shim_storage_free_bytes", "Free bytes on the storage disk",
                               registry=registry)
        self.loop_lag = Gauge("shim_event_loop_lag_seconds", "How late the event loop ran a "
                              "timer at the last check", registry=registry)

    def event(self, protocol: str, event: str) -> None:
        self.uploads.labels(protocol=protocol, event=event).inc()

    def record(self, upload: Upload, event: str, **details: object) -> None:
        """One upload event: counted, and one structured log line (id, protocol, owner hash,
        bytes, total, seconds since creation, and what `details` add)."""
        if event in COUNTED:
            self.event(upload.protocol, event)
        fields: dict[str, object] = {
            "event": event, "id": upload.id, "protocol": upload.protocol,
            "owner": upload.owner[:12], "bytes": upload.offset, "total": upload.length,
            "seconds": round(time.time() - upload.created, 3) if upload.created else None,
            **details}
        if self.log_format == "json":
            events.info("%s", json.dumps(fields, default=str))
        else:
            events.info("upload %s", " ".join(f"{k}={v}" for k, v in fields.items()))


COUNTED = frozenset({"created", "completed", "delivered", "refused", "failed", "expired",
                     "terminated"})
"""The events `shim_uploads_total` counts; the others (resumed, taken over, a delivery
attempted) are log lines only."""
