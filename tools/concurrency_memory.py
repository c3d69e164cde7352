"""Peak memory and wall time of N clicks arriving at once, with and without the decoder bound.

    python -m tools.concurrency_memory [--models models/bench] [--clicks 1 2 4]

For each N, and for MAX_CONCURRENT_DECODES = 1 (the default) and = N, a FRESH subprocess (so that no peak
carries over from an earlier measurement):

1. loads the engine on the benchmark models (`SegNextEngine`, `max_concurrent_decodes` from the settings, as
   `segnext_backend.runtime.load` wires it) and builds the runtime with `build_runtime`, as the tests' make_client
   fixture does, with `dataclasses.replace(Settings(), max_concurrent_decodes=K)`;
2. pre-encodes N different 1600x1200 PNG scenes (tools.scenes.make_scene), served by a local stand-in for Label
   Studio: one task open (context null) each, then waits for the background encodes;
3. fires N first clicks, one per image, from N threads released together by a barrier, through the Flask
   app (`/predict`, end to end);
4. reports `ru_maxrss` before and after the clicks, the highest RSS sampled every 5 ms during the clicks,
   and the wall time from the release to the last answer.

`ru_maxrss` is the peak of the whole process; the "before clicks" column says how much of it loading and
encoding already reached, and the sampled column is the clicks' own peak. Prints a markdown table and the
machine. Random weights: the timings and memory are SegNext's, the masks are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 1600, 1200
PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(models: Path, clicks: int, bound: int, threads: int) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""
    from api import init_app
    from model import SegNextBackend
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.runtime import build_runtime, runtime_status, set_runtime
    from segnext_backend.settings import Settings
    from tools.file_server import serve_files
    from tools.scenes import click_on, encode_png, make_scene, predict_body

    scenes = [make_scene(WIDTH, HEIGHT, seed=100 + i) for i in range(clicks)]
    files = {f"/data/upload/1/concurrent{i}.png": encode_png(scene.pixels) for i, scene in enumerate(scenes)}
    url, httpd = serve_files(files)
    try:
        settings = replace(
            Settings(), label_studio_url=url, label_studio_api_key="bench-token", max_concurrent_decodes=bound
        )
        started = time.perf_counter()
        engine = SegNextEngine(
            models / "encoder.onnx",
            models / "decoder.onnx",
            intra_op_threads=threads,
            max_concurrent_decodes=settings.max_concurrent_decodes,
            encoder_memory_arena=settings.encoder_memory_arena,
            decoder_memory_arena=settings.decoder_memory_arena,
        )
        load_s = time.perf_counter() - started
        runtime = build_runtime(settings, engine)
        set_runtime(runtime)
        app = init_app(SegNextBackend, basic_auth=None, status=runtime_status)
        loaded_mb = maxrss_mb()

        # Pre-encode: open each task (context null starts the background encode), then wait for the worker.
        client = app.test_client()
        started = time.perf_counter()
        for i, path in enumerate(files):
            response = client.post("/predict", json=predict_body(path, None, task_id=10 + i))
            assert response.status_code == 200, response.get_data(as_text=True)
        runtime.pre_encoder.wait_idle()
        encode_s = time.perf_counter() - started
        assert runtime.segmenter.feature_cache.stats().entries >= clicks, runtime.segmenter.feature_cache.stats()
        before_clicks_mb = maxrss_mb()
        rss_before_clicks_mb = current_rss_bytes() / 2**20

        barrier = threading.Barrier(clicks + 1)
        answers: list = [None] * clicks
        finished: list = [0.0] * clicks

        def click(i: int, path: str) -> None:
            own_client = app.test_client()
            body = predict_body(path, [click_on(scenes[i], i % 3)], task_id=10 + i)
            barrier.wait()
            response = own_client.post("/predict", json=body)
            finished[i] = time.perf_counter()
            answers[i] = (response.status_code, response.get_data(as_text=True)[:300])

        sampled = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                sampled[0] = max(sampled[0], current_rss_bytes())
                stop.wait(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        workers = [threading.Thread(target=click, args=(i, path)) for i, path in enumerate(files)]
        for worker in workers:
            worker.start()
        barrier.wait()
        released = time.perf_counter()
        for worker in workers:
            worker.join()
        stop.set()
        sampler.join()
        bad = [a for a in answers if a is None or a[0] != 200]
        assert not bad, bad
        return {
            "clicks": clicks,
            "bound": bound,
            "load_s": load_s,
            "encode_s": encode_s,
            "loaded_maxrss_mb": loaded_mb,
            "before_clicks_maxrss_mb": before_clicks_mb,
            "rss_before_clicks_mb": rss_before_clicks_mb,
            "clicks_sampled_peak_mb": sampled[0] / 2**20,
            "after_clicks_maxrss_mb": maxrss_mb(),
            "wall_s": max(finished) - released,
            "first_answer_s": min(finished) - released,
        }
    finally:
        set_runtime(None)
        httpd.shutdown()
        httpd.server_close()


def measure(models: Path, clicks: int, bound: int, threads: int) -> dict:
    command = [
        sys.executable, "-m", "tools.concurrency_memory", "--models", str(models), "--threads", str(threads),
        "--child", str(clicks), str(bound),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"N={clicks} bound={bound} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "bench", help="folder with encoder.onnx and decoder.onnx")
    parser.add_argument("--clicks", type=int, nargs="+", default=[1, 2, 4], help="numbers of concurrent clicks")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--child", type=int, nargs=2, metavar=("N", "BOUND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.models, args.child[0], args.child[1], args.threads)))
        return 0

    from tools.benchmark import ensure_models, machine

    ensure_models(args.models)
    rows = []
    for clicks in args.clicks:
        for bound in sorted({1, clicks}):
            figures = measure(args.models, clicks, bound, args.threads)
            rows.append(figures)
            print(f"N={clicks} MAX_CONCURRENT_DECODES={bound}: {figures}", file=sys.stderr, flush=True)

    print("| concurrent clicks | MAX_CONCURRENT_DECODES | peak RSS (ru_maxrss) | of which before the clicks "
          "(load + encodes) | RSS peak sampled during the clicks | wall time, release to last answer | first answer |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clicks']} | {r['bound']} | {r['after_clicks_maxrss_mb']:,.0f} MB | {r['before_clicks_maxrss_mb']:,.0f} MB "
            f"| {r['clicks_sampled_peak_mb']:,.0f} MB | {r['wall_s'] * 1000:,.0f} ms | {r['first_answer_s'] * 1000:,.0f} ms |"
        )
    print()
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
