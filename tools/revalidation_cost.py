"""What checking an image for new content costs a click (IMAGE_REVALIDATE_SECONDS).

    python -m tools.revalidation_cost [--clicks 40]

Warm clicks (features and the object's previous state cached) through the Flask app, with the test models,
on a 1600x1200 PNG served from 127.0.0.1, for three kinds of place: a host that sends an ETag (the check is a
conditional GET answered 304), a host that sends no validator (the check downloads the image again and
compares its SHA-256), and a local file (the check is a stat). Each click is timed once with revalidation on
every click (IMAGE_REVALIDATE_SECONDS=0) and once within the interval (no check), alternating A B A B, and
the medians are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tools.file_server import start_server  # noqa: E402
from tools.scenes import click_on, encode_png, make_scene, predict_body  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=40, help="clicks per kind and setting")
    args = parser.parse_args(argv)

    from api import init_app
    from model import SegNextBackend
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.runtime import build_runtime, runtime_status, set_runtime
    from segnext_backend.settings import Settings
    from segnext_backend.demo_models import build_demo_models

    scene = make_scene(1600, 1200)
    # Noise of a few levels, as a photo has, so that the file is the size of one (the test models still
    # segment the flat colours under it).
    noise = np.random.default_rng(0).integers(-4, 5, size=scene.pixels.shape)
    png = encode_png(np.clip(scene.pixels.astype(int) + noise, 0, 255).astype(np.uint8))
    folder = Path(tempfile.mkdtemp(prefix="segnext-revalidate-"))
    (folder / "photo.png").write_bytes(png)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            with_etag = self.path.startswith("/etag/")
            if with_etag and self.headers.get("If-None-Match") == '"v1"':
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            if with_etag:
                self.send_header("ETag", '"v1"')
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    url, httpd = start_server(Handler)
    engine = SegNextEngine(*build_demo_models(folder / "models"), intra_op_threads=1)
    base = Settings(label_studio_url=url, local_files_document_root=str(folder))
    runtimes = {
        every: build_runtime(replace(base, image_revalidate_seconds=0.0 if every else 3600.0), engine)
        for every in (True, False)
    }
    kinds = {
        "host with ETag (304)": "/etag/photo.png",
        "host without validators (download + SHA-256)": "/plain/photo.png",
        "local file (stat)": "/data/local-files/?d=photo.png",
    }
    first, second = click_on(scene, 0), click_on(scene, 1)
    print(f"# warm click, 1600x1200 PNG ({len(png) / 1e6:.1f} MB), test models, median of {args.clicks} each")
    print("| place | click, checked every click ms | click, within the interval ms | cost of the check ms |")
    print("| --- | --- | --- | --- |")
    try:
        for kind, path in kinds.items():
            times = {True: [], False: []}
            for every, runtime in runtimes.items():  # warm: features and the first click's state cached
                set_runtime(runtime)
                client = init_app(SegNextBackend, status=runtime_status).test_client()
                assert client.post("/predict", json=predict_body(path, [first])).status_code == 200
            for _ in range(args.clicks):
                for every, runtime in runtimes.items():
                    set_runtime(runtime)
                    client = init_app(SegNextBackend, status=runtime_status).test_client()
                    started = time.perf_counter()
                    response = client.post("/predict", json=predict_body(path, [first, second]))
                    times[every].append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200, response.get_data(as_text=True)
                    runtime.segmenter.object_states.clear()  # the next click must run the decoder again
                    client.post("/predict", json=predict_body(path, [first]))
            checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
            print(f"| {kind} | {checked:.1f} | {unchecked:.1f} | {checked - unchecked:+.1f} |", flush=True)
    finally:
        for runtime in runtimes.values():
            runtime.pre_encoder.stop()
        set_runtime(None)
        httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
