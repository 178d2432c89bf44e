"""Which protocol a request is for: the rule the README states, in one pure function.

The enabled protocols are asked in a fixed order; the first that recognises a request takes
it. It must handle every upload field the request carries (`guard.announced`), or the
request is refused (400) rather than reach the legacy server with another protocol's
fields; a claimed request whose Host cannot be written into a URL, or whose path has a dot
segment (the shim delivers to the path as written), is refused too.
"""

from __future__ import annotations

from collections.abc import Sequence

from shim import errors
from shim.commands import Command, Forward, NeedBody, Refuse
from shim.model import Request
from shim.protocols import Protocol
from shim.protocols.guard import foreign
from shim.wire import has_dot_segment


def route(protocols: Sequence[Protocol], request: Request, owner: str,
          host_ok: bool = True) -> tuple[Protocol, Command] | None:
    """The protocol that takes `request` and the command it asks for; None: nobody takes it,
    it goes to the legacy server untouched."""
    for protocol in protocols:
        command = protocol.parse(request, owner)
        if command is None:
            continue
        if isinstance(command, Forward | NeedBody | Refuse):
            return protocol, command
        refusal = foreign(request, protocol.understands)
        if refusal is None and has_dot_segment(request.path):
            refusal = errors.bad_request("the path has a dot segment ('.' or '..'); an "
                                         "upload's path is taken as written, so it must not")
        if refusal is None and not host_ok:
            refusal = errors.bad_request("the Host field is not a valid host[:port]; nothing "
                                         "was stored")
        return protocol, (Refuse(refusal) if refusal is not None else command)
    return None
