"""End-to-end fixtures: a real Label Studio 1.23.2 and the backend as two processes, on loopback.

The suite runs only when LABEL_STUDIO_BIN names a `label-studio` executable (scripts/e2e.sh installs one into
.venv-e2e/ and sets it); otherwise every test is skipped, so `pytest tests` does not need Label Studio.
Every process is started in its own process group and the whole group is stopped in a finally block.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from tools.file_server import free_port  # the repository root is on sys.path (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_BIN = os.environ.get("LABEL_STUDIO_BIN", "")
ADMIN_EMAIL = "admin@example.com"  # an address like a@b.c is created but cannot log in
LS_START_TIMEOUT = float(os.environ.get("E2E_LS_START_TIMEOUT", "240"))  # migrations take 35-47 s


def pytest_collection_modifyitems(config, items):
    if LABEL_STUDIO_BIN:
        return
    skip = pytest.mark.skip(reason="LABEL_STUDIO_BIN is not set: run `bash scripts/e2e.sh` for the Label Studio end-to-end tests")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def log(message: str) -> None:
    print(f"[e2e] {message}", flush=True)


@contextmanager
def step(name: str):
    """Print how long a step took (also when it fails)."""
    start = time.monotonic()
    outcome = "failed"
    try:
        yield
        outcome = "ok"
    finally:
        log(f"{name}: {time.monotonic() - start:.2f} s ({outcome})")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Process:
    """A child in its own process group; stop() ends the group (children included) by its id."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path, cwd: Path = ROOT):
        self.name = name
        self.log_path = log_path
        self.process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        pgid = self.process.pid  # start_new_session: the group id is the child's pid
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure no child of the group is left either
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break


def wait_for_health(process: Process, url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not process.alive():
            raise AssertionError(f"{process.name} exited with {process.process.returncode}:\n{tail(process.log_path)}")
        try:
            if requests.get(url + "/health", timeout=3).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{process.name} did not answer /health within {timeout:.0f} s:\n{tail(process.log_path)}")


class LabelStudio:
    def __init__(self, url: str, legacy_token: str, password: str, log_path: Path):
        self.url = url
        self.legacy_token = legacy_token
        self.password = password
        self.log_path = log_path

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """What Label Studio has logged since the log had `offset` bytes."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    if not LABEL_STUDIO_BIN:
        pytest.skip("LABEL_STUDIO_BIN is not set")
    base = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    token = secrets.token_hex(20)  # 40 characters
    password = secrets.token_urlsafe(12)
    env = dict(
        os.environ,
        LABEL_STUDIO_BASE_DATA_DIR=str(base / "data"),
        LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        LATEST_VERSION_CHECK="false",
        PYTHONUNBUFFERED="1",
    )
    command = [
        LABEL_STUDIO_BIN, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
        "--username", ADMIN_EMAIL, "--password", password, "--user-token", token, "--enable-legacy-api-token",
    ]
    process = None
    try:
        with step(f"start Label Studio on port {port} (fresh data dir, migrations)"):
            process = Process("Label Studio", command, env, base / "label-studio.log", cwd=base)
            url = f"http://127.0.0.1:{port}"
            wait_for_health(process, url, LS_START_TIMEOUT)
        # Label Studio moves to the next port silently when its port is taken: make sure it is ours.
        who = requests.get(url + "/api/current-user/whoami", headers={"Authorization": f"Token {token}"}, timeout=10)
        assert who.status_code == 200 and who.json()["email"] == ADMIN_EMAIL, (who.status_code, who.text)
        yield LabelStudio(url, token, password, process.log_path)
    finally:
        if process is not None:
            with step("stop Label Studio"):
                process.stop()


class Backend:
    """The backend started as `python _wsgi.py` with the test models; restart() keeps its port."""

    def __init__(self, workdir: Path, label_studio_url: str, api_key: str):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "MODEL_URL", "MODEL_SHA256")}
        self.env.update(
            DEMO="true",
            MODEL_DIR=str(workdir / "models"),
            LABEL_STUDIO_URL=label_studio_url,
            LABEL_STUDIO_API_KEY=api_key,
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        self.process: Process | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = Process("backend", command, self.env, self.workdir / f"backend-{self.starts}.log")
        wait_for_health(self.process, self.url, 90)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port must be free again before the new process binds it
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    time.sleep(0.2)
        self.start()

    def metrics(self) -> dict:
        response = requests.get(self.url + "/metrics", timeout=10)
        response.raise_for_status()
        return response.json()

    def log_tail(self) -> str:
        return tail(self.workdir / f"backend-{self.starts}.log")

    def log_text(self) -> str:
        """This backend process's whole log so far."""
        return (self.workdir / f"backend-{self.starts}.log").read_text(errors="replace")

    def predict_requests(self) -> int:
        """How many POST /predict this backend process has answered (from its access log)."""
        return (self.workdir / f"backend-{self.starts}.log").read_text(errors="replace").count('"POST /predict ')


@pytest.fixture(scope="session")
def start_backend(tmp_path_factory):
    """start_backend(label_studio_url, api_key) -> a started Backend; every one is stopped at the end."""
    started: list[Backend] = []

    def start(label_studio_url: str, api_key: str) -> Backend:
        backend = Backend(tmp_path_factory.mktemp("backend"), label_studio_url, api_key)
        started.append(backend)
        backend.start()
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.stop()
