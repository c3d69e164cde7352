"""Load test: N simulated annotators clicking at once on a running backend, loopback only.

    python -m tools.load_test --annotators 1 4 16 --tasks 3 --clicks 4
    python -m tools.load_test --models models/bench --annotators 20 --tasks 1 --clicks 3   # SegNext-sized
    python -m tools.load_test --replicas 3 --annotators 1 4 16      # 3 backends + Redis behind nginx

Starts the backend under gunicorn (as the Docker image runs it) with the colour-region test models and a
local image server standing in for Label Studio, then lets each annotator open their own tasks (a /predict
without context, which starts the background encode) and click positive and negative points on them. Every
mask is checked against the object the clicks describe. Prints throughput, click latency percentiles, errors
and the backend's peak RSS for each N, as a markdown table. Requests and time are bounded.

With `--models DIR` the backend serves DIR's encoder.onnx and decoder.onnx instead (the random-weight
benchmark models: SegNext's cost, meaningless masks), so the masks are not checked, only answered.

With `--replicas N` (N > 1) it runs N backend processes sharing a Redis, behind nginx round-robin
(tools/fleet.py: redis-server and nginx from the distribution's packages), and sends every request to nginx.
The encoder and decoder runs are summed over the backends' /metrics: with the state shared they are one
encode per image and one decoder run per click, whichever process each request reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.file_server import serve_files  # noqa: E402
from tools.fleet import Backend, Fleet, children  # noqa: E402
from tools.scenes import click_on, decode_region, encode_png, iou, make_scene, predict_body  # noqa: E402


@dataclass
class RunResult:
    annotators: int
    clicks: int
    errors: int
    wrong_masks: int
    seconds: float
    latencies_ms: list[float]
    peak_rss_mb: float
    replicas: int = 1
    encoder_runs: int = 0
    decoder_runs: int = 0
    images: int = 0
    error_examples: list[str] = field(default_factory=list)

    def row(self) -> str:
        lat = sorted(self.latencies_ms)

        def pct(p):
            return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

        return (
            f"| {self.replicas} | {self.annotators} | {self.clicks} | {self.clicks / self.seconds:.2f} | {pct(50):.0f} | "
            f"{pct(95):.0f} | {pct(99):.0f} | {self.errors} | {self.wrong_masks} | {self.peak_rss_mb:.0f} | "
            f"{self.encoder_runs} / {self.images} | {self.decoder_runs} |"
        )


HEADER = (
    "| processes | annotators | clicks | clicks/s | p50 ms | p95 ms | p99 ms | errors | wrong masks | peak RSS MB "
    "| encodes / images | decoder runs |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _peak_rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def run(
    annotators: int,
    tasks: int,
    clicks: int,
    image_size=(1600, 1200),
    threads: int = 8,
    time_limit: float = 300.0,
    models: Path | None = None,
    replicas: int = 1,
) -> RunResult:
    """One load run against a fresh backend (or `replicas` of them sharing Redis behind nginx); returns what it
    measured (wrong masks only with the test models)."""
    files, scenes = {}, {}
    for a in range(annotators):
        for t in range(tasks):
            scene = make_scene(*image_size, seed=1000 * a + t)
            path = f"/data/upload/1/a{a}-t{t}.png"
            files[path] = encode_png(scene.pixels)
            scenes[path] = scene
    image_url, httpd = serve_files(files)
    workdir = Path(tempfile.mkdtemp(prefix="segnext-load-"))
    env = {
        **os.environ,
        "DEMO": "false" if models else "true",
        "MODEL_DIR": str(Path(models).resolve()) if models else str(workdir / "models"),
        "LABEL_STUDIO_URL": image_url,
        "LABEL_STUDIO_API_KEY": "load-test",
        "WORKERS": "1",
        "THREADS": str(threads),
        "LOG_LEVEL": "WARNING",
    }
    if replicas > 1:
        fleet = Fleet(workdir, env, replicas=replicas)
    else:
        env = {k: v for k, v in env.items() if k != "REDIS_URL"}
        fleet = None
        backend = Backend(workdir, env)
    try:
        if fleet is not None:
            fleet.start()
            url, backends = fleet.url, fleet.backends
        else:
            backend.start().wait_ready()
            url, backends = backend.url, [backend]

        latencies, errors, wrong, examples = [], [0], [0], []
        request_timeout = time_limit if models else 120  # SegNext-sized clicks queue for minutes on a small CPU
        lock = threading.Lock()
        stop_at = time.monotonic() + time_limit

        def annotator(a: int):
            session = requests.Session()
            for t in range(tasks):
                path = f"/data/upload/1/a{a}-t{t}.png"
                scene = scenes[path]
                session.post(url + "/predict", json=predict_body(path, None, task_id=a * 100 + t), timeout=request_timeout)
                # positive on object 0, positive on 1, negative on 0, positive on 2, ... : a known object each time
                points, expected = [], None
                for k in range(clicks):
                    if time.monotonic() > stop_at:
                        return
                    index, positive = [(0, True), (1, True), (0, False), (2, True)][k % 4]
                    points.append(click_on(scene, index, positive))
                    expected = scene.objects[index] if expected is None else (
                        expected | scene.objects[index] if positive else expected & ~scene.objects[index]
                    )
                    started = time.perf_counter()
                    try:
                        response = session.post(url + "/predict", json=predict_body(path, points, task_id=a * 100 + t), timeout=request_timeout)
                        elapsed = (time.perf_counter() - started) * 1000
                        ok = response.status_code == 200
                        regions = response.json()["results"][0]["result"] if ok else []
                        if models:  # random weights: any answer with a mask region is all there is to check
                            right = ok
                        else:
                            right = bool(regions) and iou(decode_region(regions[0], scene.width, scene.height), expected) >= 0.98
                    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
                        ok, right, elapsed = False, False, (time.perf_counter() - started) * 1000
                        response = error
                    with lock:
                        if not ok and len(examples) < 5:
                            what = getattr(response, "text", None) or repr(response)
                            examples.append(f"{getattr(response, 'status_code', '')} {what[:200]} after {elapsed:.0f} ms")
                        latencies.append(elapsed)
                        errors[0] += not ok
                        wrong[0] += ok and not right

        started = time.perf_counter()
        with ThreadPoolExecutor(annotators) as pool:
            list(pool.map(annotator, range(annotators)))
        seconds = time.perf_counter() - started
        rss = _peak_rss_mb([pid for b in backends for pid in [b.process.pid] + children(b.process.pid)])
        metrics = [b.metrics() for b in backends]
        return RunResult(
            annotators, len(latencies), errors[0], wrong[0], seconds, latencies, rss, replicas,
            encoder_runs=sum(m["encoder_runs"] for m in metrics),
            decoder_runs=sum(m["decoder_runs"] for m in metrics),
            images=len(files),
            error_examples=examples,
        )
    finally:
        if fleet is not None:
            fleet.stop()
        else:
            backend.stop()
        httpd.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tasks", type=int, default=3, help="tasks per annotator")
    parser.add_argument("--clicks", type=int, default=4, help="clicks per task")
    parser.add_argument("--threads", type=int, default=8, help="THREADS of the backend")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run at most")
    parser.add_argument("--models", type=Path, help="serve this folder's encoder.onnx/decoder.onnx (masks unchecked)")
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1],
        help="backend processes; more than 1: sharing a Redis, behind nginx (e.g. --replicas 1 3 to compare)",
    )
    args = parser.parse_args(argv)
    served = f"models in {args.models} (masks not checked)" if args.models else "test models"
    print(f"# {os.cpu_count()} CPUs, {served}, 1600x1200 PNGs, gunicorn 1 worker x {args.threads} threads per process")
    print(HEADER)
    failed = False
    for n, replicas in [(n, r) for n in args.annotators for r in args.replicas]:
        result = run(
            n, args.tasks, args.clicks, threads=args.threads, time_limit=args.time_limit, models=args.models,
            replicas=replicas,
        )
        print(result.row(), flush=True)
        for example in result.error_examples:
            print(f"  error: {example}", file=sys.stderr, flush=True)
        failed |= result.errors > 0 or result.wrong_masks > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
