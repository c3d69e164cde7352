"""Where the time of a click goes, measured side by side in one run, on SegNext-sized models.

    python -m tools.benchmark --models models/bench [--threads 0] [--runs 5] [--device cuda|openvino]
    python -m tools.benchmark --models models/bench --redis      # what REDIS_URL adds to a click

Builds the random-weight benchmark models first when they are missing (tools.build_benchmark_models).
Prints one markdown table (medians) and the machine. Each row is measured in this one process:

- encoder / decoder: `session.run` alone, median of several runs after a warm-up; and the decoder as the
  backend runs it (`SegNextEngine.decode`, features bound where they live: on the GPU with `--device cuda`);
- the HTTP rows go through the real Flask app (`_wsgi.create_app`, `segnext_backend.runtime.build_runtime`) with the test
  client, fetching a 12 MP JPEG from a local http.server that plays Label Studio (LABEL_STUDIO_URL):
  a warm click (features and the prefix's object state cached: one decoder run), the first click after the
  task was opened (context null, background encode awaited, then the click), and a click whose prefix state
  was evicted (object_states cleared: the prefix is replayed, two decoder runs);
- image fetch + decode + resize to the encoder input for a 24 MP JPEG (from the local server, uncached);
- mask resize + threshold + brush RLE for a 12 MP frame, from smooth object-like logits, and the next
  click's `prev_mask` round trip (probability at 12 MP and back to 1024, never built at full size);
- the polygons of that 12 MP mask (pixel-edge tracing and simplification at the default tolerance), for a
  PolygonLabels control, each run paired with a bare decoder run;
- peak RSS of the process (resource.getrusage).

Random weights make the timings right and the masks meaningless; nothing here judges mask quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tools.file_server import serve_files
from tools.scenes import jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Thing" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Thing" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
</View>"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}"
    )


def keypoint(x_pct: float, y_pct: float, width: int, height: int, positive: bool = True) -> dict:
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x_pct, "y": y_pct, "width": 0.2, "keypointlabels": ["Thing"]},
        "is_positive": positive,
        "id": f"kp{x_pct:.4f}{y_pct:.4f}",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def predict_body(image_path: str, points: list[dict] | None, task_id: int = 1) -> dict:
    return {
        "tasks": [{"id": task_id, "data": {"image": image_path}}],
        "label_config": LABEL_CONFIG,
        "project": "1.1700000000",
        "params": {"context": None if points is None else {"result": points}},
    }


def timed(function, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def smooth_logits(seed: int = 0) -> np.ndarray:
    """Object-like 1024x1024 logits: a few blobs, positive inside, negative outside, smooth edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32)
    logits = np.full((1024, 1024), -8.0, np.float32)
    for _ in range(3):
        cx, cy, r = rng.uniform(200, 800, 2).tolist() + [float(rng.uniform(60, 200))]
        logits = np.maximum(logits, (r - np.hypot(xx - cx, yy - cy)) / 8.0)
    return logits


class TimingEngine:
    """The engine, with the wall time of each decode of the current request recorded."""

    def __init__(self, engine):
        self.engine = engine
        self.decode_seconds: list[float] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, *args):
        started = time.perf_counter()
        try:
            return self.engine.decode(*args)
        finally:
            self.decode_seconds.append(time.perf_counter() - started)


def ensure_models(models: Path) -> tuple[Path, Path]:
    encoder, decoder = models / "encoder.onnx", models / "decoder.onnx"
    if not (encoder.is_file() and decoder.is_file()):
        from tools import build_benchmark_models

        print(f"building benchmark models in {models} (a minute or two)...", file=sys.stderr)
        code = build_benchmark_models.main([str(models)])
        if code not in (0, None):
            raise SystemExit(f"building the benchmark models failed ({code})")
    return encoder, decoder


def run(models: Path, threads: int, runs: int, device: str = "cpu") -> list[tuple[str, str, str, str]]:
    """Measure everything; return rows (what, median, ratio, target)."""
    import _wsgi
    from segnext_backend import runtime as process_runtime
    from segnext_backend.device import choose_execution_providers
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.geometry import ModelFrame, to_model_input
    from segnext_backend.masks import logits_to_mask, mask_to_rle, sigmoid
    from segnext_backend.polygons import mask_polygons
    from segnext_backend.settings import Settings

    encoder_path, decoder_path = ensure_models(models)
    providers = choose_execution_providers(device, threads=threads)  # cuda, openvino: refuse to run without them
    t0 = time.perf_counter()
    engine = SegNextEngine(encoder_path, decoder_path, intra_op_threads=threads, providers=providers)
    load_s = time.perf_counter() - t0
    print(f"providers: {', '.join(engine.execution_providers)}; features on {engine.feature_device}", file=sys.stderr)

    rng = np.random.default_rng(0)
    image_input = rng.random((1, 3, 1024, 1024), dtype=np.float32)
    encoder_s, _ = timed(lambda: engine.encoder.run(["image_feats"], {"image": image_input}), max(2, runs // 2))
    features = engine.encoder.run(["image_feats"], {"image": image_input})[0]
    feeds = {
        "image_feats": features,
        "point_coords": np.array([[[300.0, 400.0], [500.0, 200.0]]], np.float32),
        "point_labels": np.array([[1.0, 0.0]], np.float32),
        "prev_mask": rng.random((1, 1, 1024, 1024), dtype=np.float32),
    }
    decoder_s, decoder_alone = timed(lambda: engine.decoder.run(["mask"], feeds), runs)
    bound_features = engine.features_from_numpy(features)
    bound_args = (feeds["point_coords"][0], feeds["point_labels"][0], feeds["prev_mask"][0, 0])
    bound_decoder_s, _ = timed(lambda: engine.decode(bound_features, *bound_args), runs)
    spy = TimingEngine(engine)

    # -- through HTTP, on a 12 MP JPEG served as Label Studio would ----------------------------------------
    w12, h12 = 4000, 3000
    w24, h24 = 6000, 4000
    files = {"/data/upload/1/photo12.jpg": jpeg_bytes(w12, h12, 1), "/data/upload/1/photo24.jpg": jpeg_bytes(w24, h24, 2)}
    url, httpd = serve_files(files)
    try:
        settings = Settings(label_studio_url=url, label_studio_api_key="benchmark-token")
        process_runtime.set_runtime(process_runtime.build_runtime(settings, spy))
        runtime = process_runtime.get_runtime()
        segmenter = runtime.segmenter
        client = _wsgi.create_app(settings).test_client()

        def post(body: dict):
            """The answer as the server made it; its JSON is parsed by the caller, outside the timing."""
            response = client.post("/predict", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
            return response

        path12 = "/data/upload/1/photo12.jpg"
        first = keypoint(40.0, 45.0, w12, h12)

        # Task opened: context null answers at once and encodes in the background; wait for it, then click.
        started = time.perf_counter()
        post(predict_body(path12, None))
        open_answer_s = time.perf_counter() - started
        runtime.pre_encoder.wait_idle()  # the background encode is done
        started = time.perf_counter()
        post(predict_body(path12, [first]))
        first_click_s = time.perf_counter() - started

        # Warm clicks: the object's first click is cached, each request adds a different second click.
        # Interleaved with bare decoder runs, so that load from other processes hits both alike.
        warm, bare, in_click_decoder, rle_bytes = [], [], [], []
        for i in range(runs + 1):
            second = keypoint(10.0 + 7.0 * i, 70.0, w12, h12, positive=i % 2 == 0)
            started = time.perf_counter()
            engine.decoder.run(["mask"], feeds)
            bare.append(time.perf_counter() - started)
            spy.decode_seconds.clear()
            started = time.perf_counter()
            response = post(predict_body(path12, [first, second]))
            warm.append(time.perf_counter() - started)
            answer = response.get_json()
            in_click_decoder.append(sum(spy.decode_seconds))
            regions = answer["results"][0]["result"] if answer["results"] else []
            rle_bytes.append(len(regions[0]["value"]["rle"]) if regions else 0)
        warm, bare, in_click_decoder = warm[1:], bare[1:], in_click_decoder[1:]
        warm_click_s = statistics.median(warm)
        pair_ratio = statistics.median(w / b for w, b in zip(warm, bare))
        overhead_s = statistics.median(w - d for w, d in zip(warm, in_click_decoder))
        decoder_s = statistics.median(bare + decoder_alone)

        # Evicted prefix: the object's states are gone, so the prefix is replayed (two decoder runs).
        evicted = []
        for i in range(max(2, runs // 2)):
            segmenter.object_states.clear()
            second = keypoint(15.0 + 9.0 * i, 20.0, w12, h12)
            started = time.perf_counter()
            post(predict_body(path12, [first, second]))
            evicted.append(time.perf_counter() - started)
        evicted_s = statistics.median(evicted)

        # Image fetch (HTTP, uncached) + decode + resize to the encoder input for a 24 MP JPEG.
        source = runtime.image_source
        ref24 = source.locate("/data/upload/1/photo24.jpg", task_id=1)
        image_s, _ = timed(lambda: to_model_input(source.decode(source._fetch_uncached(ref24, {})[0])), max(2, runs // 2))
    finally:
        process_runtime.set_runtime(None)
        httpd.shutdown()
        httpd.server_close()

    # -- the optional on-disk float16 feature cache: read cost vs encoding, and what float16 does to logits --
    import tempfile

    from segnext_backend.segmenter import EncodedImage, InteractiveSegmenter

    with tempfile.TemporaryDirectory() as tmp:
        disk = InteractiveSegmenter(engine, lambda key: None, feature_disk_cache_dir=tmp)
        disk._write_disk_features(
            EncodedImage(key="bench", features=engine.features_from_numpy(features), width=w12, height=h12)
        )
        disk_read_s, _ = timed(lambda: disk._read_disk_features("bench"), runs)
        half_features = disk._read_disk_features("bench").features.numpy()
    logits_fp32 = engine.decoder.run(["mask"], feeds)[0]
    logits_fp16 = engine.decoder.run(["mask"], dict(feeds, image_feats=half_features))[0]
    fp16_logit_diff = float(np.abs(logits_fp32 - logits_fp16).max())
    fp16_mask_agree = float(((logits_fp32 >= 0) == (logits_fp16 >= 0)).mean())

    # -- mask resize + threshold + RLE on a 12 MP frame ---------------------------------------------------
    logits = smooth_logits()
    frame = ModelFrame(w12, h12)
    mask_s, _ = timed(lambda: mask_to_rle(logits_to_mask(logits, frame, 0.49).mask), runs)
    round_trip_s, _ = timed(lambda: frame.through_frame(logits, sigmoid), runs)
    click_path_s, _ = timed(lambda: (mask_to_rle(logits_to_mask(logits, frame, 0.49).mask), frame.through_frame(logits, sigmoid)), runs)
    object_mask = logits_to_mask(logits, frame, 0.49).mask
    defaults = Settings()

    def polygons_of_mask():
        return mask_polygons(object_mask, defaults.polygon_tolerance, defaults.polygon_min_area)

    vertices = sum(len(p) for p in polygons_of_mask())
    polygon_times, polygon_ratios = [], []
    for _ in range(runs):  # each paired with a bare decoder run just before it
        started = time.perf_counter()
        engine.decoder.run(["mask"], feeds)
        decoder_run_s = time.perf_counter() - started
        started = time.perf_counter()
        polygons_of_mask()
        polygon_times.append(time.perf_counter() - started)
        polygon_ratios.append(polygon_times[-1] / decoder_run_s)
    polygons_s = statistics.median(polygon_times)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.0f} ms"

    return [
        ("model load (both sessions)", ms(load_s), "", ""),
        ("encoder, session.run", ms(encoder_s), "", ""),
        ("decoder, session.run (2 clicks)", ms(decoder_s), "1.00 x decoder", ""),
        ("decoder, features bound on their device (engine.decode)", ms(bound_decoder_s), f"{bound_decoder_s / decoder_s:.3f} x decoder", ""),
        ("warm click, HTTP end to end, 12 MP JPEG", ms(warm_click_s), f"{pair_ratio:.3f} x decoder (paired)", "<= 1.05"),
        ("  of which outside the decoder run", ms(overhead_s), f"{overhead_s / decoder_s:.3f} x decoder", ""),
        ("task open (context null) answer", ms(open_answer_s), "", ""),
        ("first click after task open", ms(first_click_s), f"{first_click_s / warm_click_s:.2f} x warm click", "~1"),
        ("click with evicted prefix (replay)", ms(evicted_s), f"{evicted_s / warm_click_s:.2f} x warm click", "~2 (2 decoder runs)"),
        ("fetch + decode + resize, 24 MP JPEG", ms(image_s), f"{image_s / encoder_s:.3f} x encoder", "<< 1"),
        ("mask resize + threshold + RLE, 12 MP", ms(mask_s), f"{mask_s / decoder_s:.3f} x decoder", ""),
        ("prev_mask round trip (to 12 MP and back, sigmoid)", ms(round_trip_s), f"{round_trip_s / decoder_s:.3f} x decoder", ""),
        ("  both: what a click adds to the decoder run", ms(click_path_s), f"{click_path_s / decoder_s:.3f} x decoder", "<= 0.10"),
        (f"polygons of the 12 MP mask (trace + simplify, {vertices} vertices)", ms(polygons_s), f"{statistics.median(polygon_ratios):.3f} x decoder (paired)", "<= 0.05"),
        ("features from the on-disk float16 cache (optional)", ms(disk_read_s), f"{disk_read_s / encoder_s:.4f} x encoder", ""),
        ("  float16 features: max abs logit diff / pixels agreeing", f"{fp16_logit_diff:.2e}", f"{fp16_mask_agree:.5f}", ""),
        ("brush RLE of the warm click's answer", f"{statistics.median(rle_bytes):,.0f} values", "", ""),
        ("peak RSS", f"{peak_rss_mb:,.0f} MB", "", ""),
    ]


def redis_rows(models: Path, threads: int, runs: int) -> list[tuple[str, str, str, str]]:
    """What the Redis tier (REDIS_URL) adds to a click, against that click's own decoder run.

    A real redis-server on a loopback port (tools/fleet.py) and two or more `InteractiveSegmenter`s standing
    for backend processes. Each click is timed whole, its decoder run and mask post-processing are taken out,
    and the time inside Redis calls (`SharedStore.stats.seconds`) is read separately.
    """
    import tempfile

    from segnext_backend.engine import FEATURE_SHAPE, SegNextEngine
    from segnext_backend.segmenter import Click, InteractiveSegmenter
    from segnext_backend.shared_store import SharedStore
    from tools.fleet import RedisServer

    encoder_path, decoder_path = ensure_models(models)
    engine = SegNextEngine(encoder_path, decoder_path, intra_op_threads=threads)
    features = np.random.default_rng(0).standard_normal(FEATURE_SHAPE, dtype=np.float32)
    width, height = 4000, 3000
    first = Click(1000.0, 1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), maxmemory="2gb").start()
        try:

            def process(shared: bool = True):
                store = SharedStore(server.url, namespace="benchmark") if shared else None
                # Features come from Redis (or are put in memory below): nothing is loaded or encoded.
                return InteractiveSegmenter(engine, lambda key: None, shared_store=store)

            elsewhere = process()  # "encoded elsewhere", under the key the segmenters read
            elsewhere.shared_store.features(("photo", elsewhere.feature_identity), lambda: (features, width, height))
            alone, warm, other = process(shared=False), process(), process()
            alone.feature_cache.put("photo", warm.encoded_image("photo"))
            cases = {"alone": [], "warm": [], "other": [], "first": []}  # (redis s, outside s, decoder s)

            def click(segmenter, clicks):
                store = segmenter.shared_store
                before = store.stats.seconds if store else 0.0
                started = time.perf_counter()
                prediction = segmenter.predict("photo", clicks, width, height)
                total = time.perf_counter() - started
                decoder = prediction.timings.decoder_ms / 1000
                return ((store.stats.seconds - before) if store else 0.0, total - decoder, decoder)

            for i in range(runs + 1):
                second = Click(300.0 + 250 * i, 2000.0, positive=i % 2 == 0)
                third = Click(2500.0, 400.0 + 200 * i, positive=False)
                for segmenter in (alone, warm):
                    segmenter.predict("photo", [first], width, height)  # the object's first click, not timed
                results = {
                    "alone": click(alone, [first, second]),  # no Redis: the baseline
                    "warm": click(warm, [first, second]),  # its state written to Redis
                    "other": click(other, [first, second, third]),  # prefix state read from Redis
                    "first": click(process(), [first, second, Click(3000.0, 2500.0)]),  # + the image's features
                }
                if i:  # the first round warms the sessions up
                    for name, result in results.items():
                        cases[name].append(result)
        finally:
            server.stop()

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.1f} ms"

    rows = []
    titles = {
        "alone": "click without Redis (baseline)",
        "warm": "warm click: new state written to Redis (4 MB)",
        "other": "click on another process: prefix state read (4 MB), new one written",
        "first": "first click of the image on another process: + features read (6.3 MB)",
    }
    for name, title in titles.items():
        redis_s = statistics.median(r for r, _, _ in cases[name])
        ratio = statistics.median(r / d for r, _, d in cases[name])
        outside = statistics.median(o for _, o, _ in cases[name])
        decoder = statistics.median(d for _, _, d in cases[name])
        if name != "alone":
            rows.append((f"{title}: Redis round trips", ms(redis_s), f"{ratio:.4f} x decoder run", "<= 0.05"))
        rows.append((f"{title}: outside its decoder run ({ms(decoder)})", ms(outside), f"{outside / decoder:.4f} x decoder run", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "bench", help="folder with encoder.onnx and decoder.onnx")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (medians)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "openvino"], default="cpu",
        help="as DEVICE: cuda needs onnxruntime-gpu, openvino onnxruntime-openvino (bf16 where the CPU has it)",
    )
    parser.add_argument("--ort-tuning", action="store_true", help="compare ONNX Runtime session options instead")
    parser.add_argument(
        "--redis", action="store_true", help="measure what REDIS_URL adds to a click instead (needs redis-server)"
    )
    parser.add_argument("--tuning-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--level", default="ENABLE_ALL", help=argparse.SUPPRESS)
    parser.add_argument("--no-arena", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--saved", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tuning_child:
        tuning_child(args.models, args.threads, args.level, not args.no_arena, args.saved, args.tuning_child, args.runs)
        return 0
    if args.ort_tuning:
        tuning(args.models, args.runs)
        return 0
    started = time.perf_counter()
    rows = redis_rows(args.models, args.threads, args.runs) if args.redis else run(args.models, args.threads, args.runs, args.device)
    print(f"machine: {machine()}")
    print(f"models: {args.models} (random weights, SegNext ViT-B SAx2 size); intra-op threads {args.threads}; device {args.device}\n")
    print("| measurement | median | ratio | target |")
    print("| --- | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")
    return 0



# -- ONNX Runtime tuning: each configuration in its own process, so that peak RSS and load time are its own --

TUNING_CONFIGS = {
    # name: (intra-op threads, graph optimisation level, CPU memory arena, use a saved optimised model)
    "default (ENABLE_ALL, 0 threads, arena)": (0, "ENABLE_ALL", True, False),
    "1 thread": (1, "ENABLE_ALL", True, False),
    "DISABLE_ALL": (0, "DISABLE_ALL", True, False),
    "ENABLE_BASIC": (0, "ENABLE_BASIC", True, False),
    "no CPU memory arena": (0, "ENABLE_ALL", False, False),
    "saved optimised model": (0, "ENABLE_ALL", True, True),
}


def tuning_child(models: Path, threads: int, level: str, arena: bool, saved: bool, out: Path, runs: int) -> None:
    """One configuration: load both sessions, time them, write decoder logits and the figures to `out`."""
    import json

    import onnxruntime as ort

    def options(path: Path) -> tuple[ort.SessionOptions, Path]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_cpu_mem_arena = arena
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{level}")
        if saved:
            optimised = path.with_name(path.stem + ".optimised.ort.onnx")
            if optimised.is_file():
                # Already optimised: load it as it is.
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                return opts, optimised
            opts.optimized_model_filepath = str(optimised)
        return opts, path

    figures = {}
    sessions = {}
    for role in ("encoder", "decoder"):
        opts, path = options(models / f"{role}.onnx")
        started = time.perf_counter()
        sessions[role] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        figures[f"{role}_load_s"] = time.perf_counter() - started
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 1024, 1024), dtype=np.float32)
    figures["encoder_s"], _ = timed(lambda: sessions["encoder"].run(None, {"image": image}), max(1, runs // 2))
    features = sessions["encoder"].run(None, {"image": image})[0]
    feeds = {
        "image_feats": features,
        "point_coords": np.array([[[300.0, 400.0], [500.0, 200.0]]], np.float32),
        "point_labels": np.array([[1.0, 0.0]], np.float32),
        "prev_mask": rng.random((1, 1, 1024, 1024), dtype=np.float32),
    }
    figures["decoder_s"], _ = timed(lambda: sessions["decoder"].run(None, feeds), runs)
    np.save(out.with_suffix(".npy"), sessions["decoder"].run(None, feeds)[0])
    np.save(out.with_suffix(".features.npy"), features)
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps(figures))


def tuning(models: Path, runs: int) -> None:
    import json
    import subprocess
    import tempfile

    ensure_models(models)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (threads, level, arena, saved) in TUNING_CONFIGS.items():
            out = Path(tmp) / f"{len(results)}.json"
            for attempt in range(2 if saved else 1):  # saved: the first run writes the file, the second loads it
                command = [sys.executable, "-m", "tools.benchmark", "--tuning-child", str(out), "--models", str(models),
                           "--threads", str(threads), "--level", level, "--runs", str(runs)]
                command += [] if arena else ["--no-arena"]
                command += ["--saved"] if saved else []
                subprocess.run(command, check=True, cwd=ROOT)
            results[name] = (json.loads(out.read_text()), np.load(out.with_suffix(".npy")), np.load(out.with_suffix(".features.npy")))
        for role in ("encoder", "decoder"):
            saved_file = models / f"{role}.optimised.ort.onnx"
            if saved_file.exists():
                saved_file.unlink()
    base_figures, base_logits, base_features = results[next(iter(TUNING_CONFIGS))]
    print(f"machine: {machine()}\n")
    print("| configuration | encoder load | decoder load | encoder run | decoder run | peak RSS | max abs diff logits vs default | features |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (figures, logits, features) in results.items():
        print(
            f"| {name} | {figures['encoder_load_s'] * 1000:,.0f} ms | {figures['decoder_load_s'] * 1000:,.0f} ms "
            f"| {figures['encoder_s'] * 1000:,.0f} ms | {figures['decoder_s'] * 1000:,.0f} ms "
            f"| {figures['peak_rss_mb']:,.0f} MB | {np.abs(logits - base_logits).max():.2e} "
            f"| {np.abs(features - base_features).max():.2e} |"
        )


if __name__ == "__main__":
    sys.exit(main())
