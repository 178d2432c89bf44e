"""The operator command line (issue 10, item 4) against the store of a real, running shim.

Uploads are made over HTTP (tus creation and PATCH with requests) through a real mitmdump
shim in front of tests/legacy_servers.py's LegacyServer, which records every request it
gets. The command line then runs on the same storage folder while the shim keeps serving:
`shim.operator.main([...])` in-process, and once as `python -m shim.operator` in a child
process. What is checked is what an operator and the clients notice: what is listed, exit
codes and one-line refusals, what the legacy server receives after a retry, and what HEAD
answers after a purge.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from shim.operator import main
from tests.harness import REPO_ROOT, ShimLauncher, ShimProcess, subprocess_env, wait_until
from tests.legacy_servers import LegacyServer

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 15.0
"""Deadline for any one request or wait; they normally take well under it."""
RETRY_WAIT = 20.0
"""A re-queued delivery is found by the shim's worker within its tick (5 s)."""
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
ALICE = "Bearer alice"


def config(**delivery: Any) -> dict[str, Any]:
    """Short delivery waits so that failures settle in a second or two."""
    return {
        "delivery": {"wait": 0.5, **delivery},
        "upstream": {"timeout": 10.0},
        "storage": {"fsync": False},
    }


@pytest.fixture
def faulty(recording_legacy: LegacyServer) -> LegacyServer:
    return recording_legacy


@pytest.fixture
def front(shim: ShimLauncher, faulty: LegacyServer) -> Callable[..., ShimProcess]:
    """``front(**delivery) -> ShimProcess``: a shim in front of ``faulty``."""
    return lambda **delivery: shim(config(**delivery), upstream_url=faulty.url)


# --- talking to the shim and to the command line ------------------------------------------


def show(response: requests.Response) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def create(proc: ShimProcess, length: int, owner: str | None = None) -> str:
    """Create a tus upload of ``length`` bytes; its path (``/files/<id>``)."""
    headers = {**TUS, "Upload-Length": str(length)}
    if owner is not None:
        headers["Authorization"] = owner
    response = requests.post(proc.url + "/files/", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 201, show(response)
    return str(response.headers["Location"])


def patch(proc: ShimProcess, path: str, offset: int, data: bytes,
          owner: str | None = None) -> requests.Response:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE}
    if owner is not None:
        headers["Authorization"] = owner
    return requests.patch(proc.url + path, data=data, headers=headers, timeout=TIMEOUT)


def head(proc: ShimProcess, path: str, owner: str | None = None) -> requests.Response:
    headers = dict(TUS)
    if owner is not None:
        headers["Authorization"] = owner
    return requests.head(proc.url + path, headers=headers, timeout=TIMEOUT)


def upload_id(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(capsys: pytest.CaptureFixture[str], proc: ShimProcess) -> dict[str, dict[str, Any]]:
    """``uploads --json``, by upload id."""
    code, out, err = run(capsys, "uploads", "--json", "--config", str(proc.config_path))
    assert code == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list)
    return {row["id"]: row for row in rows}


def state_of(capsys: pytest.CaptureFixture[str], proc: ShimProcess, uid: str) -> str | None:
    row = listing(capsys, proc).get(uid)
    return None if row is None else str(row["state"])


def refused_in_one_line(code: int, out: str, err: str, *words: str) -> None:
    """Exit 1 with one line on stderr naming what it is about."""
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], err


def delivered_once(faulty: LegacyServer, path_prefix: str, data: bytes) -> None:
    """The legacy server got the file exactly once, byte-exact, and accepted it."""
    got = faulty.requests(path_prefix)
    assert len(got) == 1, got
    assert got[0].complete and got[0].size == len(data), got
    assert got[0].sha256 == hashlib.sha256(data).hexdigest()
    assert got[0].status == 201, got


# --- uploads -------------------------------------------------------------------------------


def test_uploads_lists_progress_owner_state_and_delivery(
        front: Callable[..., ShimProcess], faulty: LegacyServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A partial upload of an owner and a delivered one are listed oldest first, with the
    owner's hash (12 hex chars), bytes of total, state and the legacy server's status; the
    table shows the same with a progress bar."""
    proc = front()
    partial = create(proc, 1000, owner=ALICE)
    assert patch(proc, partial, 0, os.urandom(400), owner=ALICE).status_code == 204
    data = os.urandom(3000)
    done = create(proc, len(data))
    final = patch(proc, done, 0, data)
    assert final.status_code == 204, show(final)
    delivered_once(faulty, f"/uploads/{upload_id(done)}", data)

    rows = listing(capsys, proc)
    first, second = rows[upload_id(partial)], rows[upload_id(done)]
    assert list(rows) == [upload_id(partial), upload_id(done)]  # oldest first
    assert first["protocol"] == "tus"
    assert first["owner"] == hashlib.sha256(ALICE.encode()).hexdigest()[:12]
    assert (first["bytes"], first["total"], first["state"]) == (400, 1000, "receiving")
    assert first["status"] is None and first["problem"] == ""
    assert (second["bytes"], second["total"], second["state"]) == (3000, 3000, "delivered")
    assert second["owner"] == ""  # anonymous
    assert second["status"] == 201 and second["attempts"] == 1
    assert second["destination"] == f"PUT /uploads/{upload_id(done)}"
    assert set(first) == set(second)  # stable keys
    assert 0 <= first["age"] < 120

    code, out, err = run(capsys, "uploads", "--config", str(proc.config_path))
    assert code == 0, err
    lines = {line for line in out.splitlines() if upload_id(partial) in line or
             upload_id(done) in line}
    partial_line = next(line for line in lines if upload_id(partial) in line)
    done_line = next(line for line in lines if upload_id(done) in line)
    assert "receiving" in partial_line and "40%" in partial_line and "━" in partial_line
    assert first["owner"] in partial_line
    assert "delivered" in done_line and "100%" in done_line and "201" in done_line


def test_uploads_json_through_the_module_entry_point(
        front: Callable[..., ShimProcess], capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m shim uploads --json --config FILE` (and `python -m shim.operator ...`), as
    a script runs it while the shim serves: exit 0 and one JSON object per upload."""
    proc = front()
    path = create(proc, 10)
    for module in ("shim", "shim.operator"):
        result = subprocess.run(
            [sys.executable, "-m", module, "uploads", "--json", "--config",
             str(proc.config_path)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
            check=False)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert [row["id"] for row in rows] == [upload_id(path)]
        assert rows[0]["state"] == "receiving" and rows[0]["total"] == 10


def test_uploads_of_an_empty_store_and_of_a_missing_one(
        front: Callable[..., ShimProcess], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """A running shim with no uploads lists none; a config naming a folder with no store is
    refused in one line, and the folder is not created."""
    proc = front()
    assert listing(capsys, proc) == {}
    code, out, err = run(capsys, "uploads", "--config", str(proc.config_path))
    assert code == 0 and "no uploads" in out, (out, err)

    elsewhere = tmp_path / "nothing-here"
    other = tmp_path / "other.yaml"
    other.write_text(f"storage:\n  dir: {elsewhere}\n")
    refused_in_one_line(*run(capsys, "uploads", "--config", str(other)), "no upload store",
                        str(elsewhere))
    assert not elsewhere.exists()


def test_bad_usage_and_bad_config_exit_2(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    assert run(capsys)[0] == 2
    assert run(capsys, "retry")[0] == 2  # no id
    assert run(capsys, "frobnicate")[0] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  fsync: maybe\n")
    code, _, err = run(capsys, "uploads", "--config", str(bad))
    assert code == 2 and "storage.fsync" in err, err


# --- retry ---------------------------------------------------------------------------------


def test_retry_requeues_a_failed_delivery_while_the_shim_runs(
        front: Callable[..., ShimProcess], faulty: LegacyServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The legacy server is down until the shim gives up (FAILED, HEAD 502, listed with its
    problem). Back up, `retry ID` re-queues it and the running shim delivers it: the legacy
    server gets the file once, byte-exact, and the upload is listed as delivered."""
    proc = front(give_up_after=0.5)
    faulty.down()
    data = os.urandom(5000)
    path = create(proc, len(data))
    uid = upload_id(path)
    final = patch(proc, path, 0, data)
    assert final.status_code in (204, 502, 503), show(final)
    wait_until(lambda: state_of(capsys, proc, uid) == "failed", TIMEOUT, "the delivery to fail",
               interval=0.2)
    assert head(proc, path).status_code == 502
    row = listing(capsys, proc)[uid]
    assert row["problem"] and row["status"] is None, row
    code, out, _ = run(capsys, "uploads", "--config", str(proc.config_path))
    assert code == 0 and "failed" in out and row["problem"][:20] in out

    faulty.back()
    code, out, err = run(capsys, "retry", uid, "--config", str(proc.config_path))
    assert code == 0, err
    assert uid in out
    faulty.wait_for(1, RETRY_WAIT)
    wait_until(lambda: state_of(capsys, proc, uid) == "delivered", RETRY_WAIT,
               "the re-queued delivery", interval=0.2)
    delivered_once(faulty, f"/uploads/{uid}", data)
    row = listing(capsys, proc)[uid]
    assert row["status"] == 201 and row["attempts"] == 1 and row["problem"] == "", row
    assert head(proc, path).status_code == 200

    # Delivered now: a second retry is refused, and nothing is sent again.
    refused_in_one_line(*run(capsys, "retry", uid, "--config", str(proc.config_path)),
                        uid, "delivered")
    assert len(faulty.requests("/uploads/")) == 1


def test_retry_of_an_unknown_outcome_warns_and_delivers_again(
        front: Callable[..., ShimProcess], faulty: LegacyServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The legacy server took the whole file and closed without an answer; on_unknown: hold
    made it FAILED with no second attempt. `retry` re-queues it and says that the legacy
    server may have it already; the second attempt is then accepted, once."""
    proc = front(on_unknown="hold")
    faulty.set_mode("close-after-body")
    data = os.urandom(2000)
    path = create(proc, len(data))
    uid = upload_id(path)
    patch(proc, path, 0, data)
    wait_until(lambda: state_of(capsys, proc, uid) == "failed", TIMEOUT, "the delivery to fail",
               interval=0.2)
    assert len(faulty.requests(f"/uploads/{uid}")) == 1

    faulty.set_mode("ok")
    code, out, err = run(capsys, "retry", uid, "--config", str(proc.config_path))
    assert code == 0, err
    assert "may have it already" in out
    wait_until(lambda: state_of(capsys, proc, uid) == "delivered", RETRY_WAIT,
               "the re-queued delivery", interval=0.2)
    got = faulty.requests(f"/uploads/{uid}")
    assert len(got) == 2 and [r.status for r in got] == [0, 201], got
    assert got[1].sha256 == hashlib.sha256(data).hexdigest()


def test_retry_refuses_unknown_and_unfailed_uploads(
        front: Callable[..., ShimProcess], capsys: pytest.CaptureFixture[str]) -> None:
    """Only a FAILED delivery is retried: an unknown id and an upload still receiving are
    refused in one line, and the upload is left as it was."""
    proc = front()
    path = create(proc, 100)
    uid = upload_id(path)
    cfg = str(proc.config_path)
    refused_in_one_line(*run(capsys, "retry", "no-such-upload", "--config", cfg),
                        "no-such-upload")
    refused_in_one_line(*run(capsys, "retry", "../etc", "--config", cfg), "../etc")
    refused_in_one_line(*run(capsys, "retry", uid, "--config", cfg), uid, "receiving")
    assert state_of(capsys, proc, uid) == "receiving"
    assert patch(proc, path, 0, os.urandom(10)).status_code == 204  # still in use


# --- purge ---------------------------------------------------------------------------------


def test_purge_removes_an_upload_while_the_shim_serves(
        front: Callable[..., ShimProcess], faulty: LegacyServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A purged upload is gone for its client (HEAD 404/410, PATCH refused), from the
    listing and from the disk; another upload is untouched and still delivers. Purging it
    again is refused."""
    proc = front()
    path = create(proc, 1000, owner=ALICE)
    assert patch(proc, path, 0, os.urandom(600), owner=ALICE).status_code == 204
    uid = upload_id(path)
    other_data = os.urandom(800)
    other = create(proc, len(other_data))
    assert patch(proc, other, 0, other_data[:300]).status_code == 204
    data_file = proc.storage_dir / "data" / uid
    assert data_file.exists()

    code, out, err = run(capsys, "purge", uid, "--config", str(proc.config_path))
    assert code == 0, err
    assert uid in out
    assert head(proc, path, owner=ALICE).status_code in (404, 410)
    assert patch(proc, path, 600, os.urandom(400), owner=ALICE).status_code in (404, 410)
    assert uid not in listing(capsys, proc)
    assert not data_file.exists()

    assert patch(proc, other, 300, other_data[300:]).status_code == 204
    delivered_once(faulty, f"/uploads/{upload_id(other)}", other_data)
    assert faulty.requests(f"/uploads/{uid}") == []

    refused_in_one_line(*run(capsys, "purge", uid, "--config", str(proc.config_path)), uid)


def test_purge_refuses_while_delivering(
        front: Callable[..., ShimProcess], faulty: LegacyServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """While the legacy server holds the delivery open, purge is refused in one line and the
    upload stays; once the legacy server answers, the file was delivered once."""
    proc = front()
    faulty.set_mode("hang")
    data = os.urandom(4000)
    path = create(proc, len(data))
    uid = upload_id(path)
    final = patch(proc, path, 0, data)
    assert final.status_code in (204, 503), show(final)
    faulty.wait_for(1, TIMEOUT, f"/uploads/{uid}")
    assert state_of(capsys, proc, uid) == "delivering"

    refused_in_one_line(*run(capsys, "purge", uid, "--config", str(proc.config_path)),
                        uid, "delivered")
    assert state_of(capsys, proc, uid) == "delivering"

    faulty.set_mode("ok")
    wait_until(lambda: state_of(capsys, proc, uid) == "delivered", TIMEOUT, "the delivery",
               interval=0.2)
    delivered_once(faulty, f"/uploads/{uid}", data)
    # Delivered: now it may go (its record and its recorded answer).
    code, _, err = run(capsys, "purge", uid, "--config", str(proc.config_path))
    assert code == 0, err
    assert head(proc, path).status_code in (404, 410)
