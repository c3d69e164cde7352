"""How many clicks on your data: the field's clicking-robot evaluation (NoC@85/90/95, NoF, k-mIoU), run on a
team's own labels through the backend's own code path.

    python -m tools.evaluate --models MODEL_DIR --images DIR --masks DIR --out OUT_DIR
    python -m tools.evaluate --models MODEL_DIR --ls-export FILE.json [--images DIR] --out OUT_DIR
    python -m tools.evaluate --models MODEL_DIR --coco FILE.json --images DIR --out OUT_DIR
      [--compare OTHER_MODEL_DIR] [--limit N] [--image-field NAME]

Each object gets 20 clicks from the robot of `tools/clicking_robot.py`; each click's mask comes from the
package's `InteractiveSegmenter` over the backend's `SegNextEngine`, built from the environment's settings
exactly as a serving process builds them (`segnext_backend.runtime.load_runtime`): every image is encoded once, each click is
one decoder run fed the previous prediction, and the mask is the one the backend would answer. Settings that
change the answer (FAST_JPEG_DECODE, MASK_THRESHOLD, FEATURE_DISK_CACHE_DIR, DEVICE) are honoured, so the
tool measures them too; Label Studio images are fetched with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.

Writes OUT_DIR/summary.json, OUT_DIR/objects.csv and OUT_DIR/miou.png (with --compare also
OUT_DIR/compare/summary.json and OUT_DIR/compare/objects.csv). Everything is written to a temporary folder
first and moved into place at the end: a run that fails leaves OUT_DIR as it was.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from segnext_backend.settings import Settings, SettingsError
from tools.clicking_robot import IOU_THRESHOLDS, MAX_CLICKS, number_of_clicks, run_robot, summarize
from tools.eval_datasets import (
    DatasetError,
    DatasetObject,
    read_coco,
    read_label_studio_export,
    read_mask_folder,
)

SUMMARY_FILE, OBJECTS_FILE, PLOT_FILE, COMPARE_DIR = "summary.json", "objects.csv", "miou.png", "compare"
MIOU_COLUMNS = (1, 3, 5, 10, 20)  # the k of the k-mIoU columns printed (summary.json has all 20)
MODEL_STATE_BYTES = 1024 * 1024 * 4  # one object state: 1024x1024 float32 logits


class EvaluationError(Exception):
    """The evaluation cannot go on; the message says what and where."""


@dataclass
class ModelResult:
    models: Path
    ious: np.ndarray  # objects x MAX_CLICKS
    objects: list[DatasetObject]
    summary: dict
    images_encoded: int = 0
    encoder_s: float = 0.0
    decoder_runs: int = 0
    decoder_s: float = 0.0
    wall_s: float = 0.0
    model_version: str = ""
    skipped: list[str] = field(default_factory=list)


# -- the dataset ------------------------------------------------------------------------------------------


def read_dataset(args, max_pixels: int) -> list[DatasetObject]:
    """The objects of the dataset the arguments name; every frame at most `max_pixels` (MAX_IMAGE_PIXELS)."""
    if args.masks is not None:
        if args.images is None:
            raise DatasetError("--masks needs --images (the folder of the images the masks belong to)")
        objects = read_mask_folder(args.images, args.masks, max_pixels)
    elif args.coco is not None:
        if args.images is None:
            raise DatasetError("--coco needs --images (the folder that the file names of the COCO file are in)")
        objects = read_coco(args.coco, args.images, max_pixels)
    else:
        objects = read_label_studio_export(args.ls_export, args.images, args.image_field, max_pixels)
    if not objects:
        raise DatasetError(f"{args.masks or args.coco or args.ls_export} holds no objects to evaluate")
    # Every reader lists an image's objects one after another: its features are computed once for them all.
    return objects[: args.limit] if args.limit is not None else objects


# -- the model --------------------------------------------------------------------------------------------


def evaluation_settings(base: Settings, models: Path) -> Settings:
    """The environment's settings, with the model files of --models and room for one image and one object."""
    from segnext_backend.engine import FEATURE_BYTES

    return replace(
        base,
        model_dir=models,
        model_url="",  # never download: --models names the files to measure
        demo=False,
        redis_url="",  # the model is measured, not a fleet: features and states stay in this process
        max_clicks=max(base.max_clicks, MAX_CLICKS),
        # Without room for one image's features every click would encode again, and without room for the
        # previous click's state every click would replay the clicks before it.
        feature_cache_bytes=max(base.feature_cache_bytes, FEATURE_BYTES),
        object_state_cache_bytes=max(base.object_state_cache_bytes, 2 * MODEL_STATE_BYTES),
    )


def load_runtime(settings: Settings):
    from segnext_backend.model_files import missing_model_files

    missing = missing_model_files(settings.model_dir)
    if missing:
        raise EvaluationError(f"{settings.model_dir} has no {' and no '.join(missing)}: --models must name a folder with both model files")
    from segnext_backend import runtime as process_runtime
    from segnext_backend.engine import ModelInterfaceError

    try:
        return process_runtime.load_runtime(settings)
    except ModelInterfaceError as error:
        raise EvaluationError(str(error)) from None


def evaluate_models(models: Path, objects: list[DatasetObject], base_settings: Settings, progress: bool = True) -> ModelResult:
    from tqdm import tqdm

    from segnext_backend.errors import RequestError
    from segnext_backend.images import ImageRef
    from segnext_backend.segmenter import Click

    runtime = load_runtime(evaluation_settings(base_settings, models))
    segmenter = runtime.segmenter
    result = ModelResult(models=models, ious=np.empty((0, MAX_CLICKS)), objects=[], summary={}, model_version=runtime.model_version)
    keys: dict[str, object] = {}
    try:
        for obj in objects:  # every image located before any model runs: a wrong reference fails at once
            if str(obj.location) not in keys:
                location = obj.location
                try:
                    keys[str(location)] = (
                        ImageRef("local", str(location.path.resolve()))
                        if location.path is not None
                        else runtime.image_source.locate(location.reference, location.task_id)
                    )
                except RequestError as error:
                    raise EvaluationError(f"{obj.source}: {error}") from None
        rows, noc90s = [], []
        started = time.perf_counter()
        with tqdm(total=len(objects), desc=str(models), unit="object", file=sys.stderr, disable=not progress) as bar:
            for obj in objects:
                key = keys[str(obj.location)]

                def predict(clicks, obj=obj, key=key):
                    prediction = segmenter.predict(
                        key, [Click(x=c.col, y=c.row, positive=c.positive) for c in clicks], obj.width, obj.height
                    )
                    timings = prediction.timings
                    if not timings.feature_cache_hit:
                        result.images_encoded += 1
                        result.encoder_s += timings.encoder_ms / 1000
                    result.decoder_runs += timings.decoder_runs
                    result.decoder_s += timings.decoder_ms / 1000
                    return prediction.object_mask.mask

                truth = obj.load()
                if truth.object_mask.shape != (obj.height, obj.width):
                    raise EvaluationError(
                        f"{obj.source}: the mask is {truth.object_mask.shape[1]}x{truth.object_mask.shape[0]}, "
                        f"its frame {obj.width}x{obj.height}"
                    )
                counted = truth.object_mask if truth.ignore_mask is None else truth.object_mask & ~truth.ignore_mask
                if not counted.any():
                    result.skipped.append(obj.source)
                    bar.update(1)
                    continue
                try:
                    rows.append(run_robot(predict, truth.object_mask, truth.ignore_mask))
                except RequestError as error:  # the image could not be fetched or decoded
                    raise EvaluationError(f"{obj.source}: image {obj.location}: {error}") from None
                result.objects.append(obj)
                noc90s.append(number_of_clicks(rows[-1], 0.90))
                bar.update(1)
                bar.set_postfix(noc90=f"{np.mean(noc90s):.2f}")
        result.wall_s = time.perf_counter() - started
    finally:
        runtime.pre_encoder.stop()
    if not rows:
        raise EvaluationError(f"no object has any pixel to evaluate ({len(result.skipped)} empty)")
    result.ious = np.array(rows)
    result.summary = summarize(result.ious)
    return result


# -- the outputs ------------------------------------------------------------------------------------------


def spreadsheet_text(text: str) -> str:
    """A CSV cell that a spreadsheet shows as the text it is: one that starts like a formula (=, +, -, @, a tab
    or a carriage return) gets a leading apostrophe, OWASP's advice against CSV injection; numbers stay."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


def write_objects_csv(path: Path, result: ModelResult) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["image", "object"]
            + [f"noc{round(t * 100)}" for t in IOU_THRESHOLDS]
            + [f"iou_{k}" for k in range(1, MAX_CLICKS + 1)]
        )
        for obj, ious in zip(result.objects, result.ious):
            writer.writerow(
                [spreadsheet_text(obj.image), spreadsheet_text(obj.name)]
                + [number_of_clicks(ious, t) for t in IOU_THRESHOLDS]
                + [f"{value:.6f}" for value in ious]
            )


def write_plot(path: Path, results: list[ModelResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    clicks = np.arange(1, MAX_CLICKS + 1)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in results:
        summary = result.summary
        axes.plot(clicks, summary["miou"], marker="o", markersize=3, label=f"{result.models} (NoC@90 {summary['noc90']:.2f})")
    axes.set_xlabel("clicks")
    axes.set_ylabel("mIoU")
    axes.set_xticks(clicks)
    axes.set_xlim(1, MAX_CLICKS)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"mIoU after k clicks ({results[0].summary['objects']} objects)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(out_dir: Path, results: list[ModelResult]) -> None:
    """All files into a temporary folder beside OUT_DIR, then moved into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        written = []
        for result, folder in zip(results, ["", COMPARE_DIR]):
            (staging / folder).mkdir(exist_ok=True)
            (staging / folder / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")
            write_objects_csv(staging / folder / OBJECTS_FILE, result)
            written += [Path(folder) / SUMMARY_FILE, Path(folder) / OBJECTS_FILE]
        write_plot(staging / PLOT_FILE, results)
        written.append(Path(PLOT_FILE))
        if not out_dir.exists():
            os.rename(staging, out_dir)
            return
        # OUT_DIR exists (an earlier run, or a folder the user made): replace our files only.
        for stale in (Path(COMPARE_DIR) / SUMMARY_FILE, Path(COMPARE_DIR) / OBJECTS_FILE):
            if stale not in written:
                (out_dir / stale).unlink(missing_ok=True)
        for relative in written:
            (out_dir / relative).parent.mkdir(exist_ok=True)
            os.replace(staging / relative, out_dir / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_table(results: list[ModelResult]) -> str:
    columns = [f"NoC@{round(t * 100)}" for t in IOU_THRESHOLDS] + [f"NoF@{round(t * 100)}" for t in IOU_THRESHOLDS]
    columns += [f"{k}-mIoU" for k in MIOU_COLUMNS]

    def values(summary: dict) -> list[float]:
        return (
            [summary[f"noc{round(t * 100)}"] for t in IOU_THRESHOLDS]
            + [summary[f"nof{round(t * 100)}"] for t in IOU_THRESHOLDS]
            + [summary["miou"][k - 1] for k in MIOU_COLUMNS]
        )

    def cells(row: list[float], signed: bool = False) -> str:
        formats = ["{:+.2f}" if signed else "{:.2f}"] * 3 + ["{:+d}" if signed else "{:d}"] * 3
        formats += ["{:+.4f}" if signed else "{:.4f}"] * len(MIOU_COLUMNS)
        return "".join(f"{fmt.format(value):>10}" for fmt, value in zip(formats, row))

    names = [str(result.models) for result in results] + (["difference"] if len(results) == 2 else [])
    width = max(len(name) for name in names) + 2
    lines = [" " * width + "".join(f"{c:>10}" for c in columns)]
    rows = [values(result.summary) for result in results]
    for name, row in zip(names, rows):
        lines.append(f"{name:<{width}}" + cells(row))
    if len(results) == 2:
        difference = [b - a for a, b in zip(rows[0], rows[1])]
        lines.append(f"{'difference':<{width}}" + cells(difference, signed=True))
    return "\n".join(lines)


def format_costs(result: ModelResult) -> str:
    clicks = result.ious.size
    encoded = result.images_encoded
    parts = [f"{result.models} ({result.model_version}): {encoded} image{'' if encoded == 1 else 's'} encoded"]
    if result.images_encoded:
        parts.append(f"{result.encoder_s / result.images_encoded:.2f} s each")
    parts.append(f"{result.decoder_runs} decoder runs for {clicks} clicks")
    if result.decoder_runs:
        parts.append(f"{result.decoder_s / result.decoder_runs:.3f} s each")
    parts.append(f"{result.wall_s / clicks:.3f} s per click in all ({result.wall_s:.1f} s)")
    return ", ".join(parts)


# -- the command ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m tools.evaluate",
        description="NoC@85/90/95, NoF and k-mIoU of the backend's models on your own labels (the field's clicking robot, 20 clicks per object).",
    )
    parser.add_argument("--models", type=Path, required=True, help="folder with encoder.onnx and decoder.onnx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks", type=Path, help="folder of masks NAME_K.png (0 background, 255 object, 128 ignore), with --images")
    source.add_argument("--ls-export", type=Path, help="Label Studio JSON export (brush and polygon regions are the objects)")
    source.add_argument("--coco", type=Path, help="COCO annotation file (polygons, RLE), with --images")
    parser.add_argument("--images", type=Path, help="folder of the images (for --ls-export: else they are fetched from LABEL_STUDIO_URL)")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json, objects.csv and miou.png")
    parser.add_argument("--compare", type=Path, metavar="OTHER_MODEL_DIR", help="a second encoder/decoder pair, run on the same objects")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N objects (a quick look)")
    parser.add_argument("--image-field", help="the task data field holding the image (--ls-export; default: 'image', or the only one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    try:
        if args.out.exists() and not args.out.is_dir():
            raise EvaluationError(f"--out {args.out} is a file, not a folder")
        settings = Settings.from_env()
        objects = read_dataset(args, settings.max_image_pixels)
        images = len({str(obj.location) for obj in objects})
        print(f"{len(objects)} objects on {images} images, {MAX_CLICKS} clicks each", file=sys.stderr)
        if settings.mask_threshold != 0.49:
            print(f"note: MASK_THRESHOLD={settings.mask_threshold}, not the protocol's 0.49", file=sys.stderr)
        results = [evaluate_models(args.models, objects, settings, progress=not args.no_progress)]
        if args.compare is not None:
            # The same objects: those the first model was evaluated on (objects without pixels are left out).
            results.append(evaluate_models(args.compare, results[0].objects, settings, progress=not args.no_progress))
        write_outputs(args.out, results)
    except (DatasetError, EvaluationError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in results[0].skipped:
        print(f"warning: {path} has no object pixels: left out", file=sys.stderr)
    print(format_table(results))
    for result in results:
        print(format_costs(result))
    print(f"written: {args.out / SUMMARY_FILE}, {args.out / OBJECTS_FILE}, {args.out / PLOT_FILE}"
          + (f", {args.out / COMPARE_DIR}/" if args.compare is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
