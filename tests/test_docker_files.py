"""The Docker sidecar: Dockerfile, .dockerignore, docker/shim.yaml and compose.example.yaml.

No Docker engine runs here, so nothing is built. Instead the files are parsed and checked for
what a user of the image relies on (slim Python 3.12, a non-root user, /data a volume holding
the store, port 8000, a health check), and the container's own command line is run: the
Dockerfile's CMD, verbatim, through /bin/sh with the image's environment, differing only in
values the image takes from its environment anyway (where the legacy server, the config, the
listener and mitmproxy's folder are). A tus upload through it must reach the legacy server
once, byte-exact. compose.example.yaml is run the same way: its legacy service's command
serves as the legacy server of the container command.

Two substitutions, and why: the listener is 127.0.0.1:0, not the image's 0.0.0.0:8000,
because tests bind loopback only and never a fixed port (suites run in parallel); and the
storage folder is a temporary one, not /data, which exists only in the container.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from tusclient import client as tus_client

from shim import __main__ as shim_main
from shim import config as shim_config
from shim.demo_server import WholeFileServer
from tests.harness import (
    REPO_ROOT,
    OutputLog,
    PayloadFactory,
    ShimProcess,
    sha256_of,
    subprocess_env,
    wait_until,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE = REPO_ROOT / "compose.example.yaml"
IMAGE_CONFIG = REPO_ROOT / "docker" / "shim.yaml"
BASE_IMAGE = "python:3.12-slim"
VOLUME = "/data"
PUBLIC_PORT = 8000
ADMIN_DEFAULT = "127.0.0.1:9464"
"""Issue 10's default admin.listen, where /healthz is served."""
MIB = 1024 * 1024
TIMEOUT = 30.0
PROTOCOL_PREFIXES = ("upload-", "tus-", "x-upload-")
DEMO_LISTENING = re.compile(r"demo server listening at (http://127\.0\.0\.1:\d+)")


# --- a small Dockerfile parser ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), its arguments, its first line."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of a CMD/ENTRYPOINT/RUN in exec form, else None (shell form)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":  # HEALTHCHECK [--option=value ...] CMD command
            text = self.args.partition("CMD ")[2].strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def options(self) -> dict[str, str]:
        """Its ``--name=value`` flags (FROM --platform, COPY --from, HEALTHCHECK --interval)."""
        return dict(flag[2:].partition("=")[::2] for flag in self.args.split()
                    if flag.startswith("--"))


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, ``\\`` continuations joined
    (comment lines inside a continuation are skipped, as BuildKit does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped.removesuffix("\\").strip())
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, f"Dockerfile ends inside a continuation from line {start}"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, f"{instruction} before the first FROM"
        result[-1].append(instruction)
    return result


def last(stage: list[Instruction], keyword: str) -> Instruction:
    """The stage's last ``keyword`` instruction (the one that counts for CMD, USER, ...)."""
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """The ENV values a stage sets (``KEY=value`` form), as the container sees them."""
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV in the legacy 'KEY value' form: {instruction}"
                env[key] = value
    return env


@pytest.fixture(scope="module")
def final_stage() -> list[Instruction]:
    """The Dockerfile's last stage: what the image is made of at run time."""
    return stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.example.yaml, loaded."""
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def cmd_script(final: list[Instruction]) -> str:
    """The shell script of the image's CMD: it must be ``/bin/sh -c SCRIPT`` in exec form."""
    argv = last(final, "CMD").exec_form()
    assert argv is not None and len(argv) == 3 and argv[:2] == ["/bin/sh", "-c"], argv
    return argv[2]


def container_env(final: list[Instruction], **overrides: str) -> dict[str, str]:
    """This machine's environment plus the image's ENV (PATH: the venv's python first, as the
    image's /opt/venv/bin is), plus ``overrides``; LEGACY_URL is unset unless overridden."""
    env = subprocess_env()
    env.pop("LEGACY_URL", None)
    env.update({k: v for k, v in env_of(final).items() if k != "PATH"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(overrides)
    return env


# --- .dockerignore ------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus ``**``, as moby's)."""
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts))


def in_build_context(path: str, rules: list[str]) -> bool:
    """Whether ``path`` (relative, with /) is sent to the builder: the last rule matching it
    or one of its parent folders decides; ``!`` re-includes."""
    parents = PurePosixPath(path).parts
    candidates = ["/".join(parents[: n + 1]) for n in range(len(parents))]
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        regex = _pattern(rule.removeprefix("!"))
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def dockerignore_rules() -> list[str]:
    """The .dockerignore's rules, comments and blank lines dropped."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# --- static checks ------------------------------------------------------------------------------


def test_every_stage_is_python_312_slim_and_the_image_runs_as_a_numeric_non_root_user(
    final_stage: list[Instruction],
) -> None:
    """The base image the issue asks for, and no root at run time: the last USER of the final
    stage is a non-zero uid (numeric, so Kubernetes' runAsNonRoot can verify it)."""
    every_from = [i for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "FROM"]
    assert every_from and all(i.args.split()[0] == BASE_IMAGE for i in every_from), every_from
    user = last(final_stage, "USER").args.split(":")[0]
    assert user.isdigit() and int(user) != 0, user


def test_the_package_is_pip_installed_from_the_repo_without_test_extras() -> None:
    """``pip install .`` of the repo, never the ``[test]`` extras (pytest, mypy and ruff have no
    place in the image); every COPY source exists and is in the build context."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    installs = [i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert any(re.search(r"pip install\b[^&;|]* \.(\s|$)", run) for run in installs), installs
    assert not any("[test" in run for run in installs), installs
    rules = dockerignore_rules()
    for copy in (i for i in instructions if i.keyword == "COPY" and "from" not in i.options()):
        sources = [a for a in copy.args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{copy}: {source} is not in the repo"
            assert in_build_context(source.rstrip("/"), rules), f"{source} is .dockerignored"
    assert in_build_context("shim/addon.py", rules)
    for kept_out in (".venv/bin/python", ".git/HEAD", "shim-data/index.sqlite", "tests/conftest.py",
                     "shim-demo-received/a.bin", "shim/__pycache__/addon.cpython-312.pyc"):
        assert not in_build_context(kept_out, rules), kept_out


def test_the_store_mitmproxy_folder_and_public_port_are_where_the_image_declares_them(
    final_stage: list[Instruction],
) -> None:
    """/data is a VOLUME and is the config's storage.dir (the shim reads it from the config
    only), the config the image copies is the one the CMD uses and is valid, mitmproxy's
    folder is on the volume too (nothing writable outside it), and the listener's port is the
    one EXPOSEd."""
    volumes = [v for i in final_stage if i.keyword == "VOLUME"
               for v in (i.exec_form() or i.args.split())]
    assert VOLUME in volumes, volumes
    env = env_of(final_stage)
    copies = {i.args.split()[-1]: i.args.split()[-2] for i in final_stage if i.keyword == "COPY"}
    assert copies.get(env["SHIM_CONFIG"]) == "docker/shim.yaml", copies
    config = shim_config.load(IMAGE_CONFIG)
    assert config.storage.dir == VOLUME
    assert PurePosixPath(env["SHIM_CONFDIR"]).is_relative_to(VOLUME), env["SHIM_CONFDIR"]
    host, port = shim_main.split_listen(env["SHIM_LISTEN"])
    assert (host, port) == ("0.0.0.0", PUBLIC_PORT)
    exposed = [p.split("/")[0] for i in final_stage if i.keyword == "EXPOSE" for p in i.args.split()]
    assert exposed == [str(PUBLIC_PORT)], exposed


def test_the_healthcheck_asks_healthz_on_the_default_admin_listener_with_urllib(
    final_stage: list[Instruction],
) -> None:
    """HEALTHCHECK runs python's urllib (nothing to install: no curl in the slim image) against
    /healthz at admin.listen's default, with a timeout below the check's own."""
    check = last(final_stage, "HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None and argv[:2] == ["python", "-c"] and "urllib" in argv[2], check
    assert env_of(final_stage)["SHIM_HEALTH_URL"] == f"http://{ADMIN_DEFAULT}/healthz"
    assert "timeout" in argv[2] and {"interval", "timeout", "retries"} <= check.options().keys()


def test_the_container_command_is_python_m_shim_with_the_flags_the_tests_use(
    final_stage: list[Instruction], tmp_path: Path
) -> None:
    """The argv the container execs, taken from a stand-in ``python`` that records it: python
    -m shim with --upstream, --config, --listen and --confdir (the ShimProcess flags) filled
    from the image's ENV, and which ``python -m shim`` parses."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "argv"
    (fake_bin / "python").write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{record}'\n")
    (fake_bin / "python").chmod(0o755)
    env = container_env(final_stage, LEGACY_URL="http://legacy:8080")
    env["PATH"] = os.pathsep.join([str(fake_bin), env["PATH"]])
    done = subprocess.run(["/bin/sh", "-c", cmd_script(final_stage)], env=env, timeout=TIMEOUT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    argv = record.read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "shim"], argv
    args = shim_main.parse_args(argv[2:])
    image_env = env_of(final_stage)
    assert (args.upstream, args.config, args.listen, args.confdir) == (
        "http://legacy:8080", image_env["SHIM_CONFIG"], image_env["SHIM_LISTEN"],
        image_env["SHIM_CONFDIR"])
    assert not args.quiet
    env["SHIM_ARGS"] = "-q"
    subprocess.run(["/bin/sh", "-c", cmd_script(final_stage)], env=env, timeout=TIMEOUT, check=True)
    assert shim_main.parse_args(record.read_text().split("\0")[:-1][2:]).quiet


def test_the_container_refuses_to_start_without_legacy_url(
    final_stage: list[Instruction],
) -> None:
    """Without LEGACY_URL the shim would start its embedded demo server inside the container
    and deliver into it: the command stops at once instead, saying what to set."""
    done = subprocess.run(["/bin/sh", "-c", cmd_script(final_stage)], env=container_env(final_stage),
                          timeout=TIMEOUT, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "set LEGACY_URL" in done.stderr, done.stderr


def test_compose_runs_the_image_beside_a_legacy_server_with_a_volume_and_port_8000(
    compose: dict[str, Any], final_stage: list[Instruction]
) -> None:
    """The example's wiring: the shim built from this Dockerfile, port 8000 published (on the
    host's loopback), a named volume on /data, LEGACY_URL naming the legacy service at the
    port its command listens on."""
    services = compose["services"]
    assert {"shim", "legacy"} <= services.keys()
    shim = services["shim"]
    assert shim["build"] in (".", {"context": "."}), shim["build"]
    container_ports = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in shim["ports"]]
    assert container_ports == [str(PUBLIC_PORT)], shim["ports"]
    assert all(str(p).startswith("127.0.0.1:") for p in shim["ports"]), shim["ports"]
    named = set(compose["volumes"])
    mounts = dict(v.split(":")[1::-1] for v in shim["volumes"] if isinstance(v, str))
    assert mounts.get(VOLUME) in named, shim["volumes"]
    legacy_url = urlsplit(shim["environment"]["LEGACY_URL"])
    assert legacy_url.hostname in services and legacy_url.hostname != "shim"
    legacy_cmd = services[legacy_url.hostname]["command"]
    listen = legacy_cmd[legacy_cmd.index("--listen") + 1]
    assert listen == f"0.0.0.0:{legacy_url.port}", (listen, legacy_url)
    assert "command" not in shim, "the shim service must run the image's own CMD"


# --- the container's command, run -----------------------------------------------------------------


class ContainerCommandShim(ShimProcess):
    """The shim started by the image's CMD, verbatim, instead of ShimProcess's own command line
    (readiness, output and stopping are ShimProcess's). Its environment comes from os.environ,
    which the test sets with monkeypatch."""

    script = ""

    def command(self) -> list[str]:
        """``/bin/sh -c <the Dockerfile's CMD script>``."""
        return ["/bin/sh", "-c", self.script]


def start_container_command(final: list[Instruction], upstream: str, workdir: Path,
                            monkeypatch: pytest.MonkeyPatch,
                            extra_config: Mapping[str, Any] | None = None,
                            ) -> ContainerCommandShim:
    """Run the CMD with docker/shim.yaml (storage.dir moved from /data to workdir/data) and
    mitmproxy's folder at workdir/data/mitmproxy, as SHIM_CONFDIR puts it on the volume."""
    config = yaml.safe_load(IMAGE_CONFIG.read_text())
    data = workdir / "data"
    config["storage"]["dir"] = str(data)
    if "admin" in {f.name for f in dataclasses.fields(shim_config.Config)}:
        # Once the admin listener exists, its default 127.0.0.1:9464 is a fixed port that
        # shims running in parallel would fight over.
        config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    config.update(extra_config or {})
    workdir.mkdir(parents=True, exist_ok=True)
    shim = ContainerCommandShim("python-m-shim", upstream, config, workdir)
    shim.script = cmd_script(final)
    confdir = data / PurePosixPath(env_of(final)["SHIM_CONFDIR"]).relative_to(VOLUME)
    env = container_env(final, LEGACY_URL=upstream, SHIM_CONFIG=str(shim.config_path),
                        SHIM_LISTEN="127.0.0.1:0", SHIM_CONFDIR=str(confdir))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    shim.launch()
    return shim


def tus_upload(url: str, path: Path) -> None:
    """Upload ``path`` with tuspy in 1 MiB pieces, sending its name as metadata."""
    client = tus_client.TusClient(url + "/files/")
    uploader = client.uploader(str(path), chunk_size=MIB, metadata={"filename": path.name})
    uploader.upload()


@pytest.fixture
def container_shims() -> Iterator[list[ShimProcess]]:
    """Shims a test starts; killed at teardown, their output printed for failure reports."""
    started: list[ShimProcess] = []
    try:
        yield started
    finally:
        for shim in started:
            shim.kill()
            print(f"==== container command in {shim.workdir} ====\n{shim.output()}")


def test_the_container_command_delivers_a_tus_upload_once_and_stops_cleanly(
    final_stage: list[Instruction], legacy: WholeFileServer, payload: PayloadFactory,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container_shims: list[ShimProcess],
) -> None:
    """What `docker run` would do, minus Docker: the CMD starts the shim, a 3 MiB tus upload
    goes through it, the legacy server gets exactly one whole PUT with the same bytes and no
    protocol header; the store and mitmproxy's CA are on the volume; SIGTERM (`docker stop`)
    ends it with status 0."""
    shim = start_container_command(final_stage, legacy.url, tmp_path / "container", monkeypatch)
    container_shims.append(shim)
    source = payload(3 * MIB + 17)
    tus_upload(shim.url, source)
    received = legacy.wait_for(1, TIMEOUT)
    assert len(received) == 1, received
    put = received[0]
    assert (put.method, put.status, put.size, put.sha256) == (
        "PUT", 201, source.stat().st_size, sha256_of(source))
    assert put.path.startswith("/uploads/"), put.path
    assert not [n for n, _ in put.headers if n.lower().startswith(PROTOCOL_PREFIXES)], put.headers
    volume = tmp_path / "container" / "data"
    assert (volume / "data").is_dir() and (volume / "mitmproxy" / "mitmproxy-ca.pem").is_file()
    assert shim.stop() == 0, shim.output()
    assert len(legacy.received) == 1


def test_compose_legacy_service_command_serves_the_container_command(
    compose: dict[str, Any], final_stage: list[Instruction], payload: PayloadFactory,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container_shims: list[ShimProcess],
) -> None:
    """The example stack without Docker: the legacy service's command (python -m
    shim.demo_server) on loopback and a temporary --dir, the shim's CMD with LEGACY_URL set to
    it; a tus upload ends up as one whole file in the legacy service's folder."""
    argv = list(compose["services"]["legacy"]["command"])
    assert argv[:3] == ["python", "-m", "shim.demo_server"], argv
    files = tmp_path / "legacy-files"
    argv[0] = sys.executable
    argv[argv.index("--dir") + 1] = str(files)
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"
    log = OutputLog()
    legacy = subprocess.Popen(argv, cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert legacy.stdout is not None
    reader = log.drain(legacy.stdout)
    try:
        match = log.wait_for(DEMO_LISTENING, 0, TIMEOUT)
        assert match is not None, log.text()
        shim = start_container_command(final_stage, match.group(1), tmp_path / "container",
                                       monkeypatch)
        container_shims.append(shim)
        source = payload(2 * MIB + 5)
        tus_upload(shim.url, source)

        def arrived() -> list[Path]:
            return [p for p in files.rglob("*") if p.is_file() and not p.name.startswith(".")]

        wait_until(lambda: len(arrived()) == 1, TIMEOUT, "the file in the legacy folder")
        assert [sha256_of(p) for p in arrived()] == [sha256_of(source)]
        assert shim.stop() == 0, shim.output()
    finally:
        legacy.send_signal(signal.SIGTERM)
        try:
            legacy.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            legacy.kill()
            legacy.wait()
        reader.join(TIMEOUT)
    assert legacy.returncode == 0, log.text()


def free_port() -> int:
    """A port the kernel just handed out and that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthcheck(final: list[Instruction], url: str) -> subprocess.CompletedProcess[str]:
    """Run the image's HEALTHCHECK command as Docker would, asking ``url``."""
    argv = last(final, "HEALTHCHECK").exec_form()
    assert argv is not None
    return subprocess.run(argv, env=container_env(final, SHIM_HEALTH_URL=url), timeout=TIMEOUT,
                          capture_output=True, text=True, check=False)


def test_the_healthcheck_reports_unhealthy_when_nothing_answers(
    final_stage: list[Instruction],
) -> None:
    """No admin listener: the check fails (exit 1, Docker's "unhealthy"), within its timeout."""
    done = healthcheck(final_stage, f"http://127.0.0.1:{free_port()}/healthz")
    assert done.returncode == 1, done.stderr


def test_the_healthcheck_reports_healthy_while_the_shim_runs(
    final_stage: list[Instruction], legacy: WholeFileServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, container_shims: list[ShimProcess],
) -> None:
    """With the admin listener on (issue 10, item 3), the image's check passes while the shim
    serves and fails once it is gone. The admin port is one the kernel just handed out (the
    listener's own port is not printed anywhere a test could read yet)."""
    admin = f"127.0.0.1:{free_port()}"
    shim = start_container_command(final_stage, legacy.url, tmp_path / "container", monkeypatch,
                                   extra_config={"admin": {"listen": admin}})
    container_shims.append(shim)
    url = f"http://{admin}/healthz"
    wait_until(lambda: healthcheck(final_stage, url).returncode == 0, TIMEOUT, "a healthy check",
               interval=0.2)
    assert shim.stop() == 0, shim.output()
    assert healthcheck(final_stage, url).returncode == 1
