"""What masks for points cost against the bare model runs (docs/performance.md, "Masks for points").

    python -m tools.preannotate_cost --models models/objlike [--images 3] [--points 4] [--size 4000x3000]
                                     [--latency 0.5]

Two measurements, side by side with bare ONNX Runtime runs on the same process and models:
1. One object: a point's decoder run with the mask, its threshold and its brush region (what each point of a
   task costs once the image is encoded), each paired with a bare decoder run just before it. Objects per
   minute against 1 / decoder time.
2. A batch: `--images` JPEG tasks with `--points` points each, served by a stand-in Label Studio on loopback
   that answers each image after `--latency` seconds, made into predictions by `preannotation.preannotate_tasks`
   (fetch and decode ahead, one encode per image, one decoder run per point). Its wall time against the bare
   encoder and decoder runs the same work needs: how much of the fetching and decoding the prefetch hides.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from label_config import ImageTarget, parsed_label_config
from preannotation import preannotate_tasks
from regions import mask_regions
from segnext_backend.engine import SegNextEngine
from segnext_backend.geometry import MODEL_SIZE, to_model_input
from segnext_backend.runtime import build_runtime
from segnext_backend.segmenter import Click, PredictionTimings
from segnext_backend.settings import Settings
from tools.file_server import BytesHandler, start_server
from tools.scenes import jpeg_bytes, natural_image

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Thing"/></BrushLabels>
  <KeyPointLabels name="points" toName="image"><Label value="Thing"/></KeyPointLabels>
</View>"""


def bare_decode_seconds(engine: SegNextEngine, features, x: float, y: float) -> float:
    started = time.perf_counter()
    no_mask = np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)
    engine.decode(features, np.array([(x, y)], np.float32), np.array([1.0], np.float32), no_mask)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="folder with encoder.onnx and decoder.onnx")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--points", type=int, default=4, help="points (objects) per image")
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the stand-in Label Studio waits before each image")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    points = [[tuple(float(v) for v in rng.uniform(0.1, 0.9, 2)) for _ in range(args.points)] for _ in range(args.images)]

    files = {f"/data/upload/1/{i}.jpg": jpeg_bytes(width, height, seed=i) for i in range(args.images)}

    class SlowLabelStudio(BytesHandler):
        def do_GET(self):
            time.sleep(args.latency)
            self.answer(files.get(self.path.split("?")[0]))

    url, server = start_server(SlowLabelStudio)
    engine = SegNextEngine(args.models / "encoder.onnx", args.models / "decoder.onnx")
    settings = replace(Settings(), label_studio_url=url, label_studio_api_key="x", download_cache_bytes=0)
    print(f"{args.images} images of {width}x{height}, {args.points} points each, {args.latency:g} s per image fetch")

    # 1. One object, paired with a bare decoder run.
    runtime = build_runtime(settings, engine)
    target = ImageTarget(to_name="image", data_field="image", from_name="tag", region_type="brushlabels")
    rgb = natural_image(width, height, seed=0)
    started = time.perf_counter()
    features = engine.encode(to_model_input(rgb))
    encoder_bare = [time.perf_counter() - started]
    encoded = runtime.segmenter.encoded_image("cost-image", pixels=rgb)
    bare, path = [], []
    for fx, fy in points[0] * 2:
        bare.append(bare_decode_seconds(engine, features, fx * MODEL_SIZE, fy * MODEL_SIZE))
        started = time.perf_counter()
        click = Click(fx * width, fy * height)
        mask = runtime.segmenter.single_click_mask(encoded, click, width, height, PredictionTimings())
        mask_regions(settings, target, "Thing", mask, width, height, 0.0)
        path.append(time.perf_counter() - started)
    decoder = statistics.median(bare)
    per_object = statistics.median(path)
    print(f"bare decoder run (1 click): median {decoder * 1000:,.0f} ms -> {60 / decoder:.1f} objects/min")
    print(
        f"one object (decoder run + mask + brush region): median {per_object * 1000:,.0f} ms -> "
        f"{60 / per_object:.1f} objects/min = {decoder / per_object:.3f} x (1 / decoder), paired ratio "
        f"{statistics.median(b / p for b, p in zip(bare, path)):.3f}"
    )
    runtime.pre_encoder.stop()

    # 2. A batch through preannotate_tasks, with fresh caches, against the bare runs it needs.
    for i in range(1, args.images):
        started = time.perf_counter()
        engine.encode(to_model_input(natural_image(width, height, seed=i)))
        encoder_bare.append(time.perf_counter() - started)
    runtime = build_runtime(settings, engine)
    tasks = [
        {
            "id": i + 1,
            "data": {
                "image": f"/data/upload/1/{i}.jpg",
                "points": [{"x": 100 * x, "y": 100 * y, "label": "Thing"} for x, y in points[i]],
            },
        }
        for i in range(args.images)
    ]
    started = time.perf_counter()
    outcomes = list(preannotate_tasks(tasks, parsed_label_config(CONFIG), runtime, api=None, prefetch=2))
    wall = time.perf_counter() - started
    assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
    objects = sum(o.objects for o in outcomes)
    # The same bare runs again right after the batch: the batch is compared with the mean of the two, so that a
    # load that changes during the measurement moves both sides alike.
    decoder_after = []
    for i in range(args.images):
        started = time.perf_counter()
        features = engine.encode(to_model_input(natural_image(width, height, seed=i)))
        encoder_bare.append(time.perf_counter() - started)
        decoder_after += [bare_decode_seconds(engine, features, x * MODEL_SIZE, y * MODEL_SIZE) for x, y in points[i]]
    ideal = sum(encoder_bare) / 2 + (objects * decoder + sum(decoder_after)) / 2
    print(f"bare encoder run: median {statistics.median(encoder_bare) * 1000:,.0f} ms")
    print(
        f"batch: {objects} objects on {args.images} images in {wall:.1f} s -> {objects / wall * 60:.1f} objects/min, "
        f"{args.images / wall * 60:.2f} images/min; bare model runs for the same work (mean of before and after) "
        f"{ideal:.1f} s = {ideal / wall:.3f} x wall (fetch latency alone would add {args.images * args.latency:.1f} s "
        "without prefetch)"
    )
    runtime.pre_encoder.stop()
    server.shutdown()


if __name__ == "__main__":
    main()
