"""Hostile requests against a backend under gunicorn while an honest annotator clicks: loopback only.

    python -m tools.hostile_check

Starts a stand-in Label Studio on 127.0.0.1 (uploads, presign, token refresh, a host that trickles bytes, an
image whose content changes) and the backend under gunicorn (1 worker x 8 threads, the test models) behind
basic auth with a non-ASCII password, a LABEL_STUDIO_URL carrying credentials, a personal access token and a
disk feature cache with an entry it cannot remove (and a crash's leftover), LOCAL_FILES_DOCUMENT_ROOT holding a
FIFO, and, where redis-server is installed, a Redis behind a proxy that can make it slow. One honest annotator
clicks the whole time (positive, positive, negative on three images, every mask checked). First the honest
clicks alone (the baseline), then each case of docs/reliability.md's hostile lists: the hostile request(s) are
sent while the annotator clicks. Prints, per case, what came back and the honest clicks' latency meanwhile.
Exit status 1 if any case got another answer than expected, an honest click failed or got a wrong mask.

Shortened for a run of a few minutes: IMAGE_DOWNLOAD_TIMEOUT=10 (default 120), IMAGE_REVALIDATE_SECONDS=5
(default 60), DECODE_PIXEL_BUDGET=30000000 (default 100000000), REQUEST_READ_TIMEOUT=5 and
RESPONSE_SEND_TIMEOUT=5 (default 30 each), MAX_POLYGON_VERTICES=2000 (default 20000).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import io
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.file_server import BytesHandler, free_port, start_server  # noqa: E402
from tools.fleet import RedisServer, find_binary, wait_until_ready  # noqa: E402
from tools.slow_proxy import SlowProxy  # noqa: E402
from tools.scenes import Scene, click_on, decode_region, encode_png, iou, keypoint, make_scene, predict_body  # noqa: E402

USER, PASSWORD = "annotator", "Grüße"  # Latin-1 from python-requests, UTF-8 from curl
URL_SECRET = "url-secret-6f1d"
PAT = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(b'{"token_type":"refresh"}').decode().rstrip("=") + ".sig"


def mirrored(scene: Scene) -> Scene:
    return Scene(pixels=np.ascontiguousarray(scene.pixels[:, ::-1]), objects=[o[:, ::-1] for o in scene.objects])


def enlarged_array(array: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def checkerboard(size: int) -> np.ndarray:
    """Red and blue pixels alternating: the test decoder answers every red one, a mask with a corner or a run
    end at every model pixel."""
    pixels = np.full((size, size, 3), (30, 30, 200), np.uint8)
    pixels[(np.add.outer(np.arange(size), np.arange(size)) % 2) == 0] = (200, 30, 30)
    return pixels


def enlarged(scene: Scene, factor: int) -> bytes:
    return encode_png(enlarged_array(scene.pixels, factor))


@dataclass
class StandIn:
    """Label Studio's stand-in: its routes and a few hostile hosts, all on one loopback server."""

    files: dict = field(default_factory=dict)
    refresh_redirects: bool = False
    posts_elsewhere: int = 0
    url: str = ""

    def handler(self):
        state = self

        class Handler(BytesHandler):

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/elsewhere"):
                    state.posts_elsewhere += 1
                    return self.reply(200, b"{}")
                if state.refresh_redirects:
                    return self.reply(307, headers=[("Location", state.url + "/elsewhere/")])
                access = "eyJhbGciOiJIUzI1NiJ9." + base64.urlsafe_b64encode(
                    json.dumps({"exp": time.time() + 3600}).encode()
                ).decode().rstrip("=") + ".sig"
                self.reply(200, json.dumps({"access": access}).encode(), [("Content-Type", "application/json")])

            def do_GET(self):
                parts = urlsplit(self.path)
                if parts.path == "/data/upload/1/trickle.png":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(600):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:
                        pass
                    return
                if parts.path == "/data/upload/1/needs-refresh.png":
                    return self.reply(401)
                if parts.path.startswith("/tasks/") and parts.path.endswith("/presign/"):
                    task = parts.path.split("/")[2]
                    uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
                    return self.reply(303, headers=[("Location", f"/signed/{task}/{uri.rsplit('/', 1)[-1]}")])
                body = state.files.get(parts.path)
                self.reply(200, body) if body is not None else self.reply(404)

        return Handler


@dataclass
class Honest:
    """One annotator clicking positive, positive, negative on three images, over and over, every mask checked."""

    url: str
    scenes: dict
    clicks: list = field(default_factory=list)  # (finished at, ms, right)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        session = requests.Session()
        session.auth = (USER, PASSWORD)
        task = 0
        while not self.stop.is_set():
            for path, scene in self.scenes.items():
                task += 1
                points, expected = [], None
                for index, positive in ((0, True), (1, True), (0, False)):
                    if self.stop.is_set():
                        return
                    points.append(click_on(scene, index, positive))
                    target = scene.objects[index]
                    expected = target if expected is None else (expected | target if positive else expected & ~target)
                    started = time.perf_counter()
                    try:
                        response = session.post(self.url + "/predict", json=predict_body(path, points, task_id=task), timeout=120)
                        region = response.json()["results"][0]["result"][0]
                        right = iou(decode_region(region, scene.width, scene.height), expected) >= 0.98
                    except (requests.RequestException, ValueError, KeyError, IndexError):
                        right = False
                    self.clicks.append((time.monotonic(), (time.perf_counter() - started) * 1000, right))
                    time.sleep(0.2)  # a person's pause between clicks

    def between(self, start: float, end: float) -> list:
        return [c for c in self.clicks if start <= c[0] <= end]


class HostileStores:
    """Round two's places and stores: a FIFO (and, where this user may create one, a device) under
    LOCAL_FILES_DOCUMENT_ROOT, a crash's leftover in the disk feature cache, and, where redis-server is
    installed, a real Redis behind a proxy that can make it slow (tools/slow_proxy.py)."""

    LEFTOVER_BYTES = 40_000_000  # over FEATURE_DISK_CACHE_BYTES by itself

    def __init__(self, workdir: Path):
        self.local = workdir / "local"
        self.local.mkdir()
        os.mkfifo(self.local / "pipe.png")
        try:  # /dev/zero's kind: reports size 0 and never ends
            os.mknod(self.local / "zero.png", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
            self.device = True
        except OSError:
            self.device = False
        self.features = workdir / "features"
        self.leftover_at_start = self.plant_leftover("start")
        self.redis = self.proxy = None
        if find_binary("redis-server") is not None:
            self.redis = RedisServer(workdir).start()
            self.proxy = SlowProxy(self.redis.port)

    def plant_leftover(self, name: str) -> Path:
        """A `.tmp` file as a worker killed mid-write leaves it, an hour old."""
        path = self.features / f".{name}.npz.1.2.tmp"
        path.write_bytes(b"x" * self.LEFTOVER_BYTES)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        return path

    def folder_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.features.iterdir() if path.is_file())

    def env(self) -> dict:
        return {"LOCAL_FILES_DOCUMENT_ROOT": str(self.local), **({"REDIS_URL": self.proxy.url} if self.proxy else {})}

    def plant_unusable_states(self, health: dict, image: bytes, body: dict, prefixes) -> None:
        """Values under the backend's own state keys with the right header and a consistent length, but not
        the decoder's 1024 x 1024: for the clicks of `body`'s first `k` keypoints, each k in `prefixes`."""
        from model import clicks_from_context
        from segnext_backend.geometry import ModelFrame
        from segnext_backend.images import ImageRef, ImageVersion
        from segnext_backend.segmenter import InteractiveSegmenter
        from segnext_backend.shared_store import HEADER, STATE_MAGIC, SharedStore

        store = SharedStore(self.redis.url, namespace=health["redis"]["namespace"])
        version = ImageVersion(hashlib.sha256(image).hexdigest(), ImageRef("url", ""))
        value = HEADER.pack(STATE_MAGIC, 512, 2048) + bytes(512 * 2048 * 4)
        for k in prefixes:
            obj = clicks_from_context({"result": body["params"]["context"]["result"][:k]})
            frame = ModelFrame(obj.original_width, obj.original_height)
            # The segmenter's own click key (its method needs only the click limit of the object).
            clicks = InteractiveSegmenter._click_key(SimpleNamespace(max_clicks=k), obj.clicks, frame)
            store._client.set(store._key("state", (version, (frame.width, frame.height), clicks)), value)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.redis.stop()


def latency(clicks: list) -> str:
    if not clicks:
        return "no clicks"
    ms = sorted(c[1] for c in clicks)
    wrong = sum(not c[2] for c in clicks)
    return f"{len(ms)} clicks, p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms" + (f", {wrong} WRONG" if wrong else "")


class SlowConnection(threading.Thread):
    """A hostile client: sends `first`, then `step` every half second until the backend closes the connection
    (`closed_after`: how long it was let go on); without a `step` it never reads what it is sent, and sends more
    than the socket buffers hold, so that its send ends only when the backend closes the connection."""

    def __init__(self, port: int, first: bytes, step: bytes, receive_buffer: int | None = None):
        import socket

        super().__init__(daemon=True)
        self.sock = socket.socket()
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        self.first, self.step = first, step
        self.started = time.monotonic()
        self.closed_after = None

    def run(self):
        try:
            self.sock.sendall(self.first)
            while self.step and time.monotonic() - self.started < 120:
                time.sleep(0.5)
                self.sock.sendall(self.step)
        except OSError:
            self.closed_after = time.monotonic() - self.started


def worker_rss_mb(master_pid: int) -> float:
    """Resident memory of gunicorn's workers (the master's children), in MB."""
    total = 0
    for task in Path(f"/proc/{master_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            status = Path(f"/proc/{child}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return total / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)

    stand_in = StandIn()
    honest_scenes = {f"/data/upload/1/honest{i}.png": make_scene(800, 600, seed=i) for i in range(3)}
    for path, scene in honest_scenes.items():
        stand_in.files[path] = encode_png(scene.pixels)
    small = make_scene(400, 300, seed=7)
    stand_in.files["/data/upload/1/small.png"] = encode_png(small.pixels)
    changing_old, changing_new = mirrored(small), small
    stand_in.files["/data/upload/1/changing.png"] = encode_png(changing_old.pixels)
    stand_in.files["/signed/7/shared.png"] = encode_png(mirrored(small).pixels)  # task 7's project: other bytes
    stand_in.files["/signed/8/shared.png"] = encode_png(small.pixels)
    big = [make_scene(600, 400, seed=20 + i) for i in range(3)]
    for i, scene in enumerate(big):
        stand_in.files[f"/data/upload/1/big{i}.png"] = enlarged(scene, 10)  # 6000x4000 = 24 MP each
    stand_in.files["/data/upload/1/checkerboard.png"] = encode_png(checkerboard(1024))
    stand_in.url, httpd = start_server(stand_in.handler())

    workdir = Path(tempfile.mkdtemp(prefix="segnext-hostile-"))
    (workdir / "features" / "undeletable.npz").mkdir(parents=True)
    (workdir / "features" / "undeletable.npz" / "x").write_bytes(b"x")
    port = free_port()
    env = {
        **os.environ,
        "DEMO": "true",
        "MODEL_DIR": str(workdir / "models"),
        "LABEL_STUDIO_URL": stand_in.url.replace("http://", f"http://someone:{URL_SECRET}@"),
        "LABEL_STUDIO_API_KEY": PAT,
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASSWORD,
        "FEATURE_DISK_CACHE_DIR": str(workdir / "features"),
        "FEATURE_DISK_CACHE_BYTES": "30000000",
        "IMAGE_DOWNLOAD_TIMEOUT": "10",
        "IMAGE_REVALIDATE_SECONDS": "5",
        "DECODE_PIXEL_BUDGET": "30000000",
        "MAX_POLYGON_VERTICES": "2000",
        "PORT": str(port),
        "WORKERS": "1",
        "THREADS": "8",
        "LOG_LEVEL": "INFO",
        "REQUEST_READ_TIMEOUT": "5",
        "RESPONSE_SEND_TIMEOUT": "5",
    }
    stores = HostileStores(workdir)
    env.update(stores.env())
    # A 2400 x 1800 JPEG: FAST_JPEG_DECODE decodes it at half size, so its features differ.
    large = Scene(enlarged_array(small.pixels, 3), [enlarged_array(o, 3) for o in small.objects])
    large_jpeg = io.BytesIO()
    Image.fromarray(large.pixels).save(large_jpeg, "JPEG", quality=95)
    stand_in.files["/data/upload/1/large.jpg"] = large_jpeg.getvalue()
    log_path = workdir / "backend.log"
    backend = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
        cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    auth = (USER, PASSWORD)
    failures = []
    try:
        wait_until_ready(lambda: requests.get(url + "/health", auth=auth, timeout=5).status_code == 200, "backend", backend, log_path)

        def post(body, **kwargs) -> requests.Response:
            data = json.dumps(body)  # Python's json writes 10**400 as digits, which a JSON parser must take
            return requests.post(url + "/predict", data=data, headers={"Content-Type": "application/json"},
                                 auth=auth, timeout=120, **kwargs)

        def status_and_error(response) -> str:
            try:
                return f"{response.status_code} {response.json().get('error', '')[:110]}"
            except ValueError:
                return f"{response.status_code} (not JSON)"

        def right_mask(response, scene, index, width=None, height=None) -> bool:
            try:
                region = response.json()["results"][0]["result"][0]
            except (ValueError, KeyError, IndexError):
                return False
            mask = decode_region(region, width or scene.width, height or scene.height)
            return iou(mask, scene.objects[index]) >= 0.95

        def refused(response, status: int, *words) -> bool:
            text = response.text
            return response.status_code == status and all(w in text for w in words) and URL_SECRET not in text

        def case_1():
            x, y = small.inside_point(0)
            r = post(predict_body("/data/upload/1/small.png", [keypoint(100 * x / 400, 100 * y / 300, 40000, 40000)]))
            return refused(r, 400, "MAX_IMAGE_PIXELS"), status_and_error(r)

        def case_2():
            answers = [None] * 3

            def one(i):
                answers[i] = post(predict_body("/data/upload/1/trickle.png", [click_on(small, 0)], task_id=100 + i))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return all(refused(a, 422, "IMAGE_DOWNLOAD_TIMEOUT") for a in answers), "3 x " + status_and_error(answers[0])

        def case_3():
            injected = predict_body("s3://bucket/shared.png", [click_on(small, 0)])
            injected["tasks"][0]["id"] = "1/../../data/upload/1/small.png?"
            r = post(injected)
            post(predict_body("s3://bucket/shared.png", [click_on(small, 1)], task_id=7))  # another project's bytes
            victim = post(predict_body("s3://bucket/shared.png", [click_on(small, 1)], task_id=8))
            ok = refused(r, 400, "task id") and right_mask(victim, small, 1)
            return ok, f"{status_and_error(r)}; victim task's mask right: {right_mask(victim, small, 1)}"

        def case_4():
            scene = make_scene(500, 400, seed=30)
            stand_in.files["/data/upload/1/disk.png"] = encode_png(scene.pixels)
            r = post(predict_body("/data/upload/1/disk.png", [click_on(scene, 2)]))
            return right_mask(r, scene, 2), f"{r.status_code}, mask right: {right_mask(r, scene, 2)} (cache folder over budget, an entry it cannot remove)"

        def case_5():
            stand_in.refresh_redirects = True
            try:
                r = post(predict_body("/data/upload/1/needs-refresh.png", [click_on(small, 0)]))
            finally:
                stand_in.refresh_redirects = False
            return refused(r, 422, "redirect") and stand_in.posts_elsewhere == 0, f"{status_and_error(r)}; token posts elsewhere: {stand_in.posts_elsewhere}"

        def case_6():
            first = post(predict_body("/data/upload/1/changing.png", [click_on(changing_old, 1)]))
            stand_in.files["/data/upload/1/changing.png"] = encode_png(changing_new.pixels)
            time.sleep(5.5)  # IMAGE_REVALIDATE_SECONDS
            second = post(predict_body("/data/upload/1/changing.png", [click_on(changing_new, 1)]))
            ok = right_mask(first, changing_old, 1) and right_mask(second, changing_new, 1)
            return ok, f"before the change right: {right_mask(first, changing_old, 1)}, after: {right_mask(second, changing_new, 1)}"

        def case_7():
            body = predict_body("/data/upload/1/small.png", None)
            body["tasks"] = [{**copy.deepcopy(body["tasks"][0]), "id": i + 1} for i in range(10_000)]
            r = post(body)
            return refused(r, 413, "MAX_TASKS_PER_REQUEST"), status_and_error(r)

        def case_8():
            body = predict_body("/data/upload/1/small.png", [click_on(small, 0)])
            body["label_config"] = body["label_config"].replace("</View>", "<!--" + "x" * 5_000_000 + "--></View>")
            r = post(body)
            return refused(r, 413, "MAX_LABEL_CONFIG_BYTES"), status_and_error(r)

        def case_9():
            half = {k: v for k, v in env.items() if k != "BASIC_AUTH_USER"}
            result = subprocess.run([sys.executable, "_wsgi.py", "--port", "1"], cwd=ROOT, env=half,
                                    capture_output=True, text=True, timeout=120)
            return result.returncode == 2 and "BASIC_AUTH_USER" in result.stderr, f"exit {result.returncode}: {result.stderr.strip()[:110]}"

        def case_10():
            from_requests = requests.get(url + "/health", auth=auth, timeout=30).status_code
            curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"{USER}:{PASSWORD}", url + "/health"],
                                  capture_output=True, text=True, timeout=60).stdout if shutil.which("curl") else "no curl"
            check = subprocess.run([sys.executable, "_wsgi.py", "--health-check"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=60).returncode
            ok = from_requests == 200 and curl in ("200", "no curl") and check == 0
            return ok, f"python-requests {from_requests}, curl {curl}, _wsgi.py --health-check exit {check}"

        def case_11():
            r = post(predict_body("/data/upload/1/missing.png", [click_on(small, 0)]))
            in_log = URL_SECRET in log_path.read_text()
            return refused(r, 422, "HTTP 404") and not in_log, f"{status_and_error(r)}; secret in the log: {in_log}"

        def case_12():
            answers = []
            for field_name, value in (("x", 10**400), ("original_width", 1e308), ("original_height", 2**63), ("image_rotation", 10**400)):
                point = click_on(small, 0)
                (point["value"] if field_name == "x" else point)[field_name] = value
                answers.append(post(predict_body("/data/upload/1/small.png", [point])))
            return all(a.status_code == 400 for a in answers), ", ".join(str(a.status_code) for a in answers) + " (x=10**400, width=1e308, height=2**63, rotation=10**400)"

        def case_13():
            answers = [None] * 3

            def one(i):
                # Label Studio may report a smaller frame than the file has: the mask comes back at 600x400.
                answers[i] = post(predict_body(f"/data/upload/1/big{i}.png", [click_on(big[i], 1)], task_id=200 + i))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rights = [right_mask(a, big[i], 1) for i, a in enumerate(answers)]
            return all(rights), f"3 x 24 MP at once under a 30 MP budget: masks right {rights}"

        def case_14():
            clicks = [click_on(small, i % 3, positive=i % 3 != 2) for i in range(100)]
            r = post(predict_body("/data/upload/1/small.png", clicks, task_id=300))
            return refused(r, 400, "MAX_DECODER_RUNS_PER_REQUEST"), status_and_error(r)

        def case_15():
            r = post(predict_body("http://192.0.0.8/x.png", [click_on(small, 0)]))
            return refused(r, 400, "ALLOW_PRIVATE_IMAGE_HOSTS"), status_and_error(r)

        def case_20_1():
            """THREADS + 2 slowloris heads, slow bodies, clients that never read: /health answers meanwhile."""
            one = json.dumps({"action": "x" * 800_000}).encode()
            webhook = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Authorization: " + requests.auth._basic_auth_str(USER, PASSWORD).encode() +
                       b"\r\nContent-Length: %d\r\n\r\n" % len(one) + one)
            kinds = {
                "heads": (b"POST /predict HTTP/1.1\r\nHost: x\r\n", b"X", None),
                "bodies": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{", b" " * 100, None),
                "non-readers": (webhook * 20, b"", 4096),
            }
            said, ok = [], True
            for kind, (first, step, receive_buffer) in kinds.items():
                slow = [SlowConnection(port, first, step, receive_buffer) for _ in range(8 + 2)]
                for connection in slow:
                    connection.start()
                time.sleep(2.0)
                started = time.monotonic()
                try:
                    health = requests.get(url + "/health", auth=auth, timeout=60).status_code
                except requests.RequestException as error:
                    health = type(error).__name__
                waited = time.monotonic() - started
                for connection in slow:
                    connection.join(130)
                    connection.sock.close()
                closed = [c.closed_after for c in slow if c.closed_after is not None]
                ok &= health == 200 and len(closed) == len(slow) and max(closed) < 60
                said.append(f"{kind}: /health {health} in {waited:.1f} s, {len(closed)}/{len(slow)} closed after at most {max(closed or [0]):.0f} s")
            return ok, "; ".join(said) + " (REQUEST_READ_TIMEOUT=RESPONSE_SEND_TIMEOUT=5)"

        def case_20_4():
            """64 MB bodies on /predict, /webhook and /setup at once, and a chunked one: 413 before parsing."""
            before = worker_rss_mb(backend.pid)
            answers = [None] * 4

            def one(i, path):
                body = b'{"tasks": [' + b'{"data": {}},' * (64_000_000 // 13) + b'{}]}'
                answers[i] = requests.post(url + path, data=body, auth=auth, timeout=120,
                                           headers={"Content-Type": "application/json"})

            def chunked():
                piece = b"x" * 65536
                answers[3] = requests.post(url + "/setup", data=(piece for _ in range(64)), auth=auth, timeout=120)

            threads = [threading.Thread(target=one, args=(i, path)) for i, path in enumerate(("/predict", "/webhook", "/setup"))]
            threads.append(threading.Thread(target=chunked))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            grown = worker_rss_mb(backend.pid) - before
            settings = ("MAX_PREDICT_BODY_BYTES", "MAX_WEBHOOK_BODY_BYTES", "MAX_SETUP_BODY_BYTES", "MAX_SETUP_BODY_BYTES")
            ok = all(refused(a, 413, s) for a, s in zip(answers, settings)) and grown < 200
            return ok, "; ".join(status_and_error(a)[:70] for a in answers) + f"; worker RSS +{grown:.0f} MB"

        def case_20_5():
            """An API key, no basic auth, listening beyond loopback: the backend refuses to start."""
            open_env = {k: v for k, v in env.items() if not k.startswith("BASIC_AUTH_")}
            result = subprocess.run([sys.executable, "_wsgi.py", "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT,
                                    env=open_env, capture_output=True, text=True, timeout=120)
            under_gunicorn = subprocess.run([str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"], cwd=ROOT,
                                            env={**open_env, "PORT": str(free_port())}, capture_output=True, text=True, timeout=120)
            ok = (result.returncode == 2 and "Basic Authentication" in result.stderr and under_gunicorn.returncode != 0
                  and "ALLOW_OPEN_ACCESS" in under_gunicorn.stdout + under_gunicorn.stderr)
            return ok, f"_wsgi.py exit {result.returncode}, gunicorn exit {under_gunicorn.returncode}: {result.stderr.strip()[7:120]}..."

        def case_20_8():
            # Round two, 8: 300 clicks on distinct 1 MB image URLs held ~475 MB while their places were remembered.
            before = worker_rss_mb(backend.pid)
            answers = [post(predict_body(f"/data/upload/1/small.png?{i}{'x' * 1_000_000}", [click_on(small, 0)]))
                       for i in range(300)]
            grown = worker_rss_mb(backend.pid) - before
            ok = all(a.status_code == 413 for a in answers) and grown < 50  # the cap, or the body's limit
            return ok, f"300 x {status_and_error(answers[0])}; worker memory {grown:+.0f} MB"

        def case_20_14():
            # Round two, 14: a newline in request text must not start a log line of its own.
            forged = "[ERROR] forged"
            by_task_id = predict_body("/data/upload/1/small.png", [click_on(small, 0)])
            by_task_id["tasks"][0]["id"] = "7\n" + forged + " by a task id"
            by_name = predict_body("/data/upload/1/small.png", [click_on(small, 0)])
            by_name["params"]["context"]["result"][0]["to_name"] = "image\n" + forged + " by a name"
            answers = [post(by_task_id).status_code, post(by_name).status_code]
            user = "someone\n" + forged + " by a user name"
            answers.append(requests.get(url + "/health", auth=(user, "x"), timeout=30).status_code)
            time.sleep(1)  # gunicorn writes the access log line after the answer
            lines = log_path.read_text().splitlines()
            forged_lines = [line for line in lines if line.startswith(forged)]
            escaped = sum(("\\n" + forged) in line for line in lines)
            ok = answers == [200, 400, 401] and not forged_lines and escaped >= 3
            answered = ", ".join(map(str, answers))
            return ok, f"{answered}; lines starting with {forged!r}: {len(forged_lines)}, escaped: {escaped}"

        def case_20_2():
            answers, seconds = [None] * 2, [0.0] * 2
            x, y = small.inside_point(0)

            def one(i, width, height):
                started = time.monotonic()
                answers[i] = post(predict_body("/data/upload/1/small.png", [keypoint(100 * x / 400, 100 * y / 300, width, height)], task_id=400 + i))
                seconds[i] = time.monotonic() - started

            threads = [threading.Thread(target=one, args=(0, 1, 100_000_000)), threading.Thread(target=one, args=(1, 100_000_000, 1))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ok = all(a.status_code == 200 and a.json()["results"][0]["result"] for a in answers)
            return ok, f"1 x 100,000,000 and 100,000,000 x 1 at once: {answers[0].status_code} in {seconds[0]:.1f} s, {answers[1].status_code} in {seconds[1]:.1f} s (masks answered)"

        def case_20_3():
            x_pct, y_pct = 100 * 0.5 / 1024, 100 * 0.5 / 1024  # a red pixel
            brush = post(predict_body("/data/upload/1/checkerboard.png", [keypoint(x_pct, y_pct, 10000, 10000)], task_id=410))
            body = predict_body("/data/upload/1/checkerboard.png", [keypoint(x_pct, y_pct, 10000, 10000)], task_id=411)
            body["label_config"] = body["label_config"].replace("BrushLabels", "PolygonLabels")
            started = time.monotonic()
            polygons = post(body)
            polygon_seconds = time.monotonic() - started
            vertices = sum(len(r["value"]["points"]) for r in polygons.json()["results"][0]["result"]) if polygons.status_code == 200 else None
            ok = refused(brush, 422, "MAX_BRUSH_RLE_BYTES") and (
                (vertices is not None and 0 < vertices <= 2000) or refused(polygons, 422, "MAX_POLYGON_VERTICES")
            )
            return ok, (f"brush: {status_and_error(brush)}; polygons: {polygons.status_code}, {vertices} vertices "
                        f"(MAX_POLYGON_VERTICES=2000) in {polygon_seconds:.1f} s")

        honest = Honest(url, honest_scenes)
        clicker = threading.Thread(target=honest.run)
        clicker.start()
        time.sleep(args.baseline_seconds)
        baseline = honest.between(0, time.monotonic())
        print(f"# honest annotator alone: {latency(baseline[3:])} (first round, which encodes, left out)")
        print("| case | answer | as expected | honest clicks meanwhile |")
        print("| --- | --- | --- | --- |")
        def no_redis():
            return None, "skipped: redis-server is not installed"

        def case_20_6():
            started = time.monotonic()
            try:  # a thread hung on the FIFO: the answer never comes
                answers = [post(predict_body("/data/local-files/?d=pipe.png", [click_on(small, 0)], task_id=401))]
                if stores.device:
                    answers.append(post(predict_body("/data/local-files/?d=zero.png", [click_on(small, 0)], task_id=402)))
            except requests.RequestException as error:
                return False, f"no answer within 120 s: {type(error).__name__}"
            ok = all(refused(a, 422, "not a regular file") for a in answers)
            what = " and ".join(["a FIFO"] + ["a character device"] * stores.device)
            return ok, f"{what}: {status_and_error(answers[0])} (in {time.monotonic() - started:.1f} s)"

        def case_20_7():
            if stores.proxy is None:
                return no_redis()
            clicks = [click_on(small, 0)] * 10
            stores.proxy.delay = 0.8  # alive, every call 0.8 s late
            try:
                started = time.monotonic()
                r = post(predict_body("/data/upload/1/small.png", clicks, task_id=500))
                took = time.monotonic() - started
                redis = requests.get(url + "/health", auth=auth, timeout=60).json()
            finally:
                stores.proxy.delay = 0.0
            warned = any("REDIS_CLICK_BUDGET_SECONDS" in w for w in redis.get("warnings", []))
            # REDIS_CLICK_BUDGET_SECONDS, the call in flight (< REDIS_SOCKET_TIMEOUT, 1 s each), the click's own work.
            ok = right_mask(r, small, 0) and took < 1 + 1 + 3 and redis["redis"]["slow"] and warned
            return ok, (f"10-click replay with Redis 0.8 s late per call: {r.status_code} in {took:.1f} s, "
                        f"mask right: {right_mask(r, small, 0)}; /health redis.slow {redis['redis']['slow']}, warned: {warned}")

        def case_20_9():
            if stores.proxy is None:
                return no_redis()
            health = requests.get(url + "/health", auth=auth, timeout=60).json()
            image = stand_in.files["/data/upload/1/small.png"]
            two = predict_body("/data/upload/1/small.png", [click_on(small, 0), click_on(small, 1)], task_id=600)
            stores.plant_unusable_states(health, image, two, [1])
            wrong_shape = post(two)
            both = small.objects[0] | small.objects[1]
            shape_ok = wrong_shape.status_code == 200 and right_mask(wrong_shape, Scene(small.pixels, [both]), 0)
            many = predict_body("/data/upload/1/small.png", [click_on(small, i % 3, positive=i % 3 != 2) for i in range(30)], task_id=601)
            stores.plant_unusable_states(health, image, many, range(1, 30))
            replay = post(many)
            ok = shape_ok and refused(replay, 400, "MAX_DECODER_RUNS_PER_REQUEST")
            return ok, (f"a state of the wrong shape: {wrong_shape.status_code}, mask right: {shape_ok}; 30 clicks whose 29 "
                        f"prefixes exist unusable: {status_and_error(replay)}")

        def case_20_11():
            removed_at_start = not stores.leftover_at_start.exists()
            later = stores.plant_leftover("later")
            scene = make_scene(500, 400, seed=31)
            stand_in.files["/data/upload/1/leftover.png"] = encode_png(scene.pixels)
            r = post(predict_body("/data/upload/1/leftover.png", [click_on(scene, 1)]))  # a write, then a trim
            folder = stores.folder_bytes()
            ok = removed_at_start and not later.exists() and folder <= 30_000_000 and right_mask(r, scene, 1)
            return ok, (f"40 MB leftovers: the one from before the start removed: {removed_at_start}, the one planted "
                        f"now removed at the next write: {not later.exists()}; folder {folder / 1e6:.1f} MB of 30 MB")

        def case_20_12():
            first = post(predict_body("/data/upload/1/large.jpg", [click_on(large, 1)], task_id=700))
            other_port = free_port()
            other_log = workdir / "backend-fast-jpeg.log"
            other = subprocess.Popen(
                [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"], cwd=ROOT,
                env={**env, "FAST_JPEG_DECODE": "true", "PORT": str(other_port)},
                stdout=other_log.open("w"), stderr=subprocess.STDOUT,
            )
            other_url = f"http://127.0.0.1:{other_port}"
            try:
                try:
                    wait_until_ready(lambda: requests.get(other_url + "/health", auth=auth, timeout=5).status_code == 200,
                                     "the FAST_JPEG_DECODE=true backend", other, other_log)
                except RuntimeError as error:
                    return False, str(error)
                second = requests.post(other_url + "/predict", json=predict_body("/data/upload/1/large.jpg", [click_on(large, 1)], task_id=700),
                                       auth=auth, timeout=120)
                metrics = requests.get(other_url + "/metrics", auth=auth, timeout=60).json()
            finally:
                other.terminate()
                try:
                    other.wait(40)
                except subprocess.TimeoutExpired:
                    other.kill()
            reused = metrics["hits"]["features"]["disk"] + metrics["hits"]["features"]["redis"]
            ok = right_mask(first, large, 1) and right_mask(second, large, 1) and metrics["encoder_runs"] == 1 and reused == 0
            return ok, (f"a second backend with FAST_JPEG_DECODE=true on the same disk cache{' and Redis' * bool(stores.proxy)}: "
                        f"encoded the image itself: {metrics['encoder_runs'] == 1}, features reused: {reused}")

        cases = [case_1, case_2, case_3, case_4, case_5, case_6, case_7, case_8, case_9, case_10, case_11, case_12, case_13, case_14, case_15]
        # Round two's cases are numbered by the items of the report that found them.
        round_two = [
            ("20.1", case_20_1), ("20.2", case_20_2), ("20.3", case_20_3), ("20.4", case_20_4),
            ("20.5", case_20_5), ("20.6", case_20_6), ("20.7", case_20_7), ("20.8", case_20_8), ("20.9", case_20_9),
            ("20.11", case_20_11), ("20.12", case_20_12), ("20.14", case_20_14),
        ]
        for number, case in [*enumerate(cases, start=1), *round_two]:
            started = time.monotonic()
            ok, what = case()
            time.sleep(0.5)
            meanwhile = honest.between(started, time.monotonic())
            shown = "skipped" if ok is None else "yes" if ok else "NO"
            print(f"| {number} | {what} | {shown} | {latency(meanwhile)} |", flush=True)
            if ok is False:
                failures.append(number)
        honest.stop.set()
        clicker.join(130)
        wrong = [c for c in honest.clicks if not c[2]]
        print(f"# honest annotator over the whole run: {latency(honest.clicks)}")
        if wrong:
            failures.append("honest")
    finally:
        backend.terminate()
        try:
            backend.wait(40)
        except subprocess.TimeoutExpired:
            backend.kill()
        httpd.shutdown()
        stores.stop()
    print("all as expected" if not failures else f"NOT as expected: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
