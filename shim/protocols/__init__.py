"""The resumable-upload protocols. Each module parses requests into commands and renders the
engine's outcome as replies; none of them does I/O. `Protocol` is the contract."""

from __future__ import annotations

from typing import Protocol as _Protocol

from shim.commands import Command, Outcome
from shim.model import Reply, Request


class Protocol(_Protocol):
    name: str
    understands: frozenset[str]
    """The upload fields (`shim.protocols.guard.announced`) a request it takes may carry."""

    def parse(self, request: Request, owner: str) -> Command | None:
        """The command this request asks for, or None when the request is not this protocol's."""

    def render(self, request: Request, command: Command, outcome: Outcome) -> Reply:
        """The reply to the client once the engine has carried the command out."""
