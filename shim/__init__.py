"""resumable-shim: terminates resumable-upload protocols in front of a whole-file-only server."""

__all__: list[str] = []
