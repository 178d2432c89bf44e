"""Reply shapes several protocols share. No protocol logic: just how a reply is built."""

from __future__ import annotations

from shim.model import Answer, HeaderList, Reply

_HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")


def legacy(answer: Answer, extra: HeaderList = (), status: int | None = None,
           reason: str | None = None) -> Reply:
    """The legacy server's own answer (status, headers, body) as the client's answer, with
    the protocol's own fields added; framing fields are mitmproxy's to set."""
    headers = tuple((k, v) for k, v in answer.headers if k.lower() not in _HOP_BY_HOP)
    return Reply(status or answer.status, (*headers, *extra), answer.body, reason or answer.reason)


def text(status: int, message: str, extra: HeaderList = (), reason: str | None = None) -> Reply:
    return Reply(status, (("Content-Type", "text/plain; charset=utf-8"), *extra),
                 f"{message}\n".encode(), reason)
