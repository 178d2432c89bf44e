"""The admin listener: /healthz, /readyz and /metrics, scraped after a known sequence of
uploads through a real shim (a Prometheus scrape is a plain GET)."""

from __future__ import annotations

import base64
import json
import re

import requests

from shim.demo_server import WholeFileServer
from tests.harness import ShimLauncher, ShimProcess, wait_until

TUS = {"Tus-Resumable": "1.0.0"}
TIMEOUT = 30


def admin_url(proc: ShimProcess) -> str:
    match = proc.wait_for_output(r"admin \(/healthz, /readyz, /metrics\) at (http://\S+)")
    return match.group(1)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if line.startswith("#") or not sample.startswith(name):
            continue
        found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})?", sample)
        if found is not None and ",".join(sorted((found.group(1) or "").split(","))) == wanted:
            return float(value)
    return 0.0


def tus_upload(url: str, data: bytes, complete: bool = True) -> str:
    name = base64.b64encode(b"m.bin").decode()
    created = requests.post(f"{url}/files/", timeout=TIMEOUT, headers={
        **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": f"filename {name}"})
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    sent = data if complete else data[: len(data) // 2]
    patched = requests.patch(f"{url}{location}", data=sent, timeout=TIMEOUT, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert patched.status_code == 204, patched.text
    return location


def test_health_readiness_and_counters_after_known_uploads(
        shim: ShimLauncher, legacy: WholeFileServer) -> None:
    proc = shim()
    admin = admin_url(proc)
    assert requests.get(f"{admin}/healthz", timeout=TIMEOUT).text == "ok\n"
    answers: list[requests.Response] = []
    # The admin listener is up before start-up recovery ends; until then /readyz says so.
    wait_until(lambda: answers.append(requests.get(f"{admin}/readyz", timeout=TIMEOUT))
               or answers[-1].status_code == 200, TIMEOUT, "/readyz answering 200")
    assert all(a.text.startswith("not ready: starting: ") for a in answers[:-1]), answers

    tus_upload(proc.url, b"a" * 1000)
    tus_upload(proc.url, b"b" * 3000)
    half = tus_upload(proc.url, b"c" * 500, complete=False)
    requests.delete(f"{proc.url}{half}", headers=TUS, timeout=TIMEOUT)
    legacy.wait_for(2, TIMEOUT)

    text = requests.get(f"{admin}/metrics", timeout=TIMEOUT).text
    assert metric(text, "shim_uploads_total", protocol="tus", event="created") == 3
    assert metric(text, "shim_uploads_total", protocol="tus", event="completed") == 2
    assert metric(text, "shim_uploads_total", protocol="tus", event="delivered") == 2
    assert metric(text, "shim_uploads_total", protocol="tus", event="terminated") == 1
    assert metric(text, "shim_bytes_received_total", protocol="tus") == 1000 + 3000 + 250
    assert metric(text, "shim_delivery_attempts_total", result="delivered") == 2
    assert metric(text, "shim_delivery_seconds_count") == 2
    assert "shim_event_loop_lag_seconds" in text and "shim_uploads_in_progress" in text

    legacy.stop()  # the legacy server is down: not ready, still alive
    down = requests.get(f"{admin}/readyz", timeout=TIMEOUT)
    assert down.status_code == 503 and "unreachable" in down.text
    assert requests.get(f"{admin}/healthz", timeout=TIMEOUT).status_code == 200


def test_one_json_line_per_upload_event(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """`--log-format json`: created, resumed, completed, delivered (with the legacy method,
    path and status) and terminated, each one JSON object naming the upload. A chunk that
    simply follows the one before is not a resumption; one after an offset inquiry is."""
    proc = shim(kind="python-m-shim", extra_args=["--log-format", "json"])
    data = b"d" * 2000
    name = base64.b64encode(b"e.bin").decode()
    created = requests.post(f"{proc.url}/files/", timeout=TIMEOUT, headers={
        **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": f"filename {name}"})
    location = created.headers["Location"]
    for start, end in ((0, 1000), (1000, 1500), (1500, 2000)):
        if start == 1500:  # as a client coming back after a lost connection
            assert requests.head(f"{proc.url}{location}", headers=TUS,
                                 timeout=TIMEOUT).headers["Upload-Offset"] == "1500"
        patched = requests.patch(f"{proc.url}{location}", data=data[start:end],
                                 timeout=TIMEOUT, headers={
                                     **TUS, "Upload-Offset": str(start),
                                     "Content-Type": "application/offset+octet-stream"})
        assert patched.status_code == 204, patched.text
    other = tus_upload(proc.url, b"x" * 10, complete=False)
    requests.delete(f"{proc.url}{other}", headers=TUS, timeout=TIMEOUT)
    upload_id = location.rsplit("/", 1)[1]
    proc.wait_for_output(r'"event": "terminated"')
    lines = [json.loads(found) for found in re.findall(r"(\{\"event\".*\})", proc.output())]
    mine = [line for line in lines if line["id"] == upload_id]
    assert [line["event"] for line in mine] == ["created", "resumed", "completed", "delivered"]
    assert mine[1]["bytes"] == 1500
    delivered = mine[-1]
    assert (delivered["method"], delivered["path"], delivered["status"]) == (
        "PUT", f"/uploads/{upload_id}", 201)
    assert (delivered["bytes"], delivered["total"], delivered["protocol"]) == (2000, 2000, "tus")
    assert any(line["event"] == "terminated" for line in lines)


def test_mitmproxys_flow_lines_leave_out_what_the_shim_answered(
        shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """A request the shim answered itself would show as the internal sink and its 204: no
    flow line for it (the event lines say what happened); pass-through ones keep theirs."""
    proc = shim()
    tus_upload(proc.url, b"f" * 100)
    assert requests.get(f"{proc.url}/passed-through", timeout=TIMEOUT).status_code == 404
    proc.wait_for_output(r"GET http://\S+/passed-through")
    output = proc.output()
    assert not re.search(r"(POST|PATCH) http://127\.0\.0\.1:\d+/files/", output), output[-3000:]
    assert "event=delivered" in output


def test_quiet_leaves_only_upload_events_and_problems(shim: ShimLauncher,
                                                      legacy: WholeFileServer) -> None:
    """`python -m shim -q`: no line per request or connection, the upload events still."""
    proc = shim(kind="python-m-shim", extra_args=["-q"])
    assert requests.get(f"{proc.url}/passed-through", timeout=TIMEOUT).status_code == 404
    tus_upload(proc.url, b"q" * 100)
    proc.wait_for_output(r"event=delivered")
    output = proc.output()
    for noise in ("client connect", "server connect", "client disconnect", "/passed-through"):
        assert noise not in output, output[-3000:]
