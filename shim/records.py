"""An `Upload` record as JSON text: how every store backend keeps one.

A record written by an older shim still loads: fields it lacks get their defaults, and the
first round's flags become a state.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, fields
from typing import Any

from shim.lifecycle import State
from shim.model import Answer, Target, Upload


def to_json(upload: Upload) -> str:
    record = asdict(upload)
    if upload.answer is not None:
        record["answer"]["body"] = base64.b64encode(upload.answer.body).decode("ascii")
    return json.dumps(record)


def from_json(text: str) -> Upload:
    record: dict[str, Any] = json.loads(text)
    if record.get("target") is not None:
        target = record["target"]
        target["headers"] = _pairs(target["headers"])
        record["target"] = Target(**target)
    answer = record.get("answer")
    if answer is not None:
        answer["headers"] = _pairs(answer["headers"])
        answer["body"] = base64.b64decode(answer["body"])
        record["answer"] = Answer(**answer)
    record["parts"] = tuple(record["parts"])
    record["state"] = State(record.get("state") or _first_round_state(record))
    record.setdefault("keyed", True)  # written before the field: its delivery is hashed
    known = {f.name for f in fields(Upload)}
    return Upload(**{name: value for name, value in record.items() if name in known})


def _first_round_state(record: dict[str, Any]) -> State:
    """The state of a record written before states existed (flags `terminated`, `answer`)."""
    if record.get("terminated"):
        return State.TERMINATED
    return State.DELIVERED if record.get("answer") is not None else State.RECEIVING


def _pairs(items: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in items)
