"""What both store backends share: a record's JSON (shim/records.py), which must load what an
older shim wrote, and the folder of data files (shim/data_folder.py), which must never be
led outside itself by an id."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from shim.data_folder import DataFolder
from shim.lifecycle import State
from shim.model import Answer, Target, Upload
from shim.records import from_json, to_json


def upload(**fields: object) -> Upload:
    base = Upload(id="u1", protocol="tus", owner="me", length=3,
                  target=Target("PUT", "/in/u1", (("X-A", "1"),)))
    return Upload(**{**asdict(base), "target": base.target, **fields})  # type: ignore[arg-type]


def test_a_record_round_trips_with_its_answer_and_target() -> None:
    answer = Answer(201, "Created", (("Location", "/x"),), b"\x00\xffbinary")
    record = upload(state=State.DELIVERED, answer=answer, parts=("a", "b"), keyed=False)
    assert from_json(to_json(record)) == record
    assert json.loads(to_json(record))["answer"]["body"] == "AP9iaW5hcnk="


def older(record: Upload, drop: tuple[str, ...], **extra: object) -> str:
    """`record` as a shim without some fields wrote it."""
    raw = json.loads(to_json(record))
    for name in drop:
        del raw[name]
    raw.update(extra)
    return json.dumps(raw)


def test_a_record_from_before_keyed_uploads_is_keyed() -> None:
    """Written before `keyed` existed: its delivery is hashed, as every delivery then was."""
    assert from_json(older(upload(keyed=False), ("keyed",))).keyed is True


@pytest.mark.parametrize(("flags", "state"), [
    ({"terminated": True}, State.TERMINATED),
    ({"answer": {"status": 201, "reason": "Created", "headers": [], "body": ""}}, State.DELIVERED),
    ({}, State.RECEIVING),
])
def test_a_record_from_before_states_gets_its_state_from_its_flags(
        flags: dict[str, object], state: State) -> None:
    raw = older(upload(), ("state", "answer"), **{"answer": None, **flags})
    assert from_json(raw).state is state


def test_fields_a_newer_shim_wrote_are_ignored() -> None:
    assert from_json(older(upload(), (), future_field=1)) == upload()


@pytest.mark.parametrize("bad_id", ["", "../escape", "a/b", ".hidden"])
def test_an_id_that_would_leave_the_data_folder_is_refused(tmp_path: Path, bad_id: str) -> None:
    folder = DataFolder(tmp_path / "store", fsync=False)
    with pytest.raises(ValueError, match="not an upload id"):
        asyncio.run(folder.open_writer(bad_id, 0))
    assert list((tmp_path / "store" / "data").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_a_writer_on_a_missing_file_is_refused_unless_asked_to_create(tmp_path: Path) -> None:
    async def scenario() -> int:
        folder = DataFolder(tmp_path / "store", fsync=False)
        with pytest.raises(FileNotFoundError):
            await folder.open_writer("u1", 0, create=False)
        writer = await folder.open_writer("u1", 0)
        writer.write(b"abc")
        return await folder.close_writer("u1", writer, None, sync=True)

    assert asyncio.run(scenario()) == 3
    assert (tmp_path / "store" / "data" / "u1").stat().st_mode & 0o777 == 0o600


def test_ranges_refuse_a_file_shorter_than_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        folder = DataFolder(tmp_path / "store", fsync=False)
        writer = await folder.open_writer("u1", 0)
        writer.write(b"abc")
        await folder.close_writer("u1", writer, None, sync=False)
        with pytest.raises(OSError, match="u1 is shorter than recorded"):
            async for _ in folder.ranges(["u1"], [4]):
                pass
        with pytest.raises(ValueError):
            async for _ in folder.ranges(["u1"], [3, 1]):
                pass

    asyncio.run(scenario())
