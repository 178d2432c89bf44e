"""What the shim counts, for Prometheus (`prometheus-client`), in a registry of its own so
that several shims in one process (tests) never collide. The engine and the outbox record;
the admin listener (`shim.admin`) serves it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
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
