"""Several backend processes behind nginx, sharing a Redis: the scale-out set-up on loopback ports.

Used by the load test (`python -m tools.load_test --replicas 3`), the Redis benchmark rows and the tests. Redis
and nginx are the distribution's own binaries (`apt-get install redis-server nginx`); nginx is run with
`deploy/nginx.conf`, the file the compose set-up mounts, its upstream rewritten to the loopback backends.
Everything listens on 127.0.0.1 and is waited for by deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tools.file_server import free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
READY_DEADLINE_SECONDS = 300  # a loaded 2-core machine can take minutes to load models in several processes


def find_binary(name: str) -> str | None:
    """The executable, also from the sbin folders that a non-root PATH lacks (Debian puts nginx there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def wait_until_ready(ready, what: str, process: subprocess.Popen, log: Path, deadline_seconds: float = READY_DEADLINE_SECONDS):
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready within {deadline_seconds} s: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
    except ProcessLookupError:
        return
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class RedisServer:
    """redis-server on 127.0.0.1:port, in memory only, with an LRU memory budget like the compose file's."""

    workdir: Path
    maxmemory: str = "512mb"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = find_binary("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        log = self.workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        wait_until_ready(self.ping, "redis-server", self.process, log)
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        _stop(self.process)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered, like a hung or swamped Redis."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def render_nginx_conf(upstream_ports: list[int], listen_port: int, workdir: Path) -> str:
    """deploy/nginx.conf with loopback upstreams and listen port, inside a main config for a foreground nginx."""
    site = NGINX_CONF.read_text()
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in upstream_ports)
    site, replaced = re.subn(r"    server segnext-backend:9090;\n", servers, site)
    site, listened = re.subn(r"listen 9090;", f"listen 127.0.0.1:{listen_port};", site)
    if replaced != 1 or listened != 1:
        raise ValueError(f"{NGINX_CONF} no longer has the upstream server and listen lines this renders")
    temp = workdir / "nginx-temp"
    temp.mkdir(exist_ok=True)
    return (
        f"daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/nginx-error.log warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"  access_log {workdir}/nginx-access.log;\n"
        + "".join(f"  {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + site
        + "}\n"
    )


@dataclass
class Nginx:
    workdir: Path
    upstream_ports: list[int]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        binary = find_binary("nginx")
        if binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_nginx_conf(self.upstream_ports, self.port, self.workdir))
        log = self.workdir / "nginx.log"
        self.process = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(conf)], stdout=log.open("w"), stderr=subprocess.STDOUT
        )

        def listening():
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True

        wait_until_ready(listening, "nginx", self.process, log)
        return self

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class Backend:
    """The backend under gunicorn (as the Docker image runs it) on a loopback port."""

    workdir: Path
    env: dict
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"backend-{self.port}.log"

    def start(self) -> "Backend":
        env = {**self.env, "PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self.process = subprocess.Popen(
            [str(gunicorn), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self) -> "Backend":
        wait_until_ready(lambda: requests.get(self.url + "/health", timeout=10).status_code == 200, "backend", self.process, self.log)
        return self

    def metrics(self) -> dict:
        return requests.get(self.url + "/metrics", timeout=30).json()

    def stop(self) -> None:
        _stop(self.process)

    def kill(self) -> None:
        """SIGKILL to gunicorn's master and its workers: the replica dies at once, with no chance to clean up."""
        for pid in [self.process.pid] + children(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Fleet:
    """Redis, `replicas` backends sharing it, nginx round-robin in front. `url` is what Label Studio gets."""

    workdir: Path
    env: dict
    replicas: int = 3
    redis: RedisServer | None = None
    backends: list[Backend] = field(default_factory=list)
    nginx: Nginx | None = None

    @property
    def url(self) -> str:
        return self.nginx.url

    def start(self) -> "Fleet":
        try:
            self.redis = RedisServer(self.workdir).start()
            env = {**self.env, "REDIS_URL": self.redis.url}
            self.backends = [Backend(self.workdir, env).start() for _ in range(self.replicas)]
            for backend in self.backends:  # started together, loading their models side by side
                backend.wait_ready()
            self.nginx = Nginx(self.workdir, [b.port for b in self.backends]).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nginx:
            self.nginx.stop()
        for backend in self.backends:
            backend.stop()
        if self.redis:
            self.redis.stop()
