"""tools/evaluate.py end to end: the three input formats, known NoC with the test models, outputs, bad input.

The scenes are 1024x1024, the model frame's own size: there the test models' masks are exactly the clicked
colour's pixels (no resize blends an edge), so every IoU, and so every NoC, is known in advance:
- "solid": one flat square, found by the first click: IoU 1 from click 1, NoC 1.
- "two_tone": an object of two colours, 60 % and 40 % of it. The first click (its deepest pixel) is in the
  larger part: IoU 0.6; the second, positive in the missed part, completes it: NoC 2.
- "twin": a square whose colour is also a smaller square outside the object (area 1/4 of it). Click 1 takes
  both (IoU 0.8); click 2 is negative in the twin and removes the colour, both squares (IoU 0); and so on:
  IoU 0.8 and 0 in turn, never 85 %: NoC 20 and a failure at every threshold.
- "ignore": a square with a strip of its colour beside it marked ignore (128): click 1 takes both, and the
  strip does not count: IoU 1, NoC 1 (without the ignore region: IoU 2/3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segnext_backend.masks import mask_to_rle
from tools import evaluate
from tools.eval_datasets import DatasetError, decode_brush_rle, read_label_studio_export
from tools.scenes import encode_png
from segnext_backend.demo_models import build_demo_models

ROOT = Path(__file__).resolve().parent.parent
SIZE = 1024
BACKGROUND = (20, 20, 20)
RED, GREEN, BLUE, YELLOW = (220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 210, 40)
# Environment variables of the backend that would change what the tool measures.
SETTING_VARIABLES = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MASK_THRESHOLD", "FAST_JPEG_DECODE", "FEATURE_DISK_CACHE_DIR",
                     "DEVICE", "MODEL_DIR", "DEMO", "LOCAL_FILES_DOCUMENT_ROOT", "ALLOW_PRIVATE_IMAGE_HOSTS")


def box(rows, cols) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def painted(*regions) -> np.ndarray:
    pixels = np.empty((SIZE, SIZE, 3), np.uint8)
    pixels[:] = BACKGROUND
    for mask, colour in regions:
        pixels[mask] = colour
    return pixels


SOLID = box((600, 800), (100, 300))
GREEN_PART, BLUE_PART = box((100, 300), (500, 740)), box((100, 300), (740, 900))
TWIN_OBJECT, TWIN = box((100, 300), (100, 300)), box((600, 700), (600, 700))
IGNORED_OBJECT, IGNORED_STRIP = box((400, 500), (400, 500)), box((400, 500), (500, 550))

# image -> (pixels, [(object mask, ignore mask or None)])
SCENES = {
    "a_shapes": (painted((SOLID, RED), (GREEN_PART, GREEN), (BLUE_PART, BLUE)), [(SOLID, None), (GREEN_PART | BLUE_PART, None)]),
    "b_twin": (painted((TWIN_OBJECT, YELLOW), (TWIN, YELLOW)), [(TWIN_OBJECT, None)]),
    "c_ignore": (painted((IGNORED_OBJECT | IGNORED_STRIP, RED)), [(IGNORED_OBJECT, IGNORED_STRIP)]),
}
# objects in the order above: solid, two_tone, twin, ignore
EXPECTED_IOUS = np.array([[1.0] * 20, [0.6] + [1.0] * 19, [0.8, 0.0] * 10, [1.0] * 20])
EXPECTED_NOC = [1, 2, 20, 1]


def expected_summary(rows=EXPECTED_IOUS, nocs=EXPECTED_NOC) -> dict:
    failures = sum(noc == 20 for noc in nocs)
    return {
        **{f"noc{t}": pytest.approx(np.mean(nocs)) for t in (85, 90, 95)},
        **{f"nof{t}": failures for t in (85, 90, 95)},
        "miou": pytest.approx(list(np.mean(rows, axis=0))),
        "objects": len(nocs),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-models")
    build_demo_models(folder)
    return folder


@pytest.fixture
def clean_env(monkeypatch):
    for name in SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def write_folder_dataset(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for name, (pixels, objects) in SCENES.items():
        Image.fromarray(pixels).save(images / f"{name}.png")
        for number, (mask, ignore) in enumerate(objects, start=1):
            values = np.where(mask, 255, 0).astype(np.uint8)
            if ignore is not None:
                values[ignore] = 128
            Image.fromarray(values).save(masks / f"{name}_{number}.png")
    return images, masks


def run_command(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "tools.evaluate", "--no-progress", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def read_outputs(out: Path) -> tuple[dict, list[list[str]]]:
    summary = json.loads((out / "summary.json").read_text())
    rows = [line.split(",") for line in (out / "objects.csv").read_text().splitlines()]
    return summary, rows


def check_outputs(out: Path, images: list[str]) -> None:
    summary, rows = read_outputs(out)
    assert summary == expected_summary()
    assert rows[0] == ["image", "object", "noc85", "noc90", "noc95"] + [f"iou_{k}" for k in range(1, 21)]
    assert [row[0] for row in rows[1:]] == images
    for row, nocs, ious in zip(rows[1:], EXPECTED_NOC, EXPECTED_IOUS):
        assert [int(v) for v in row[2:5]] == [nocs] * 3
        np.testing.assert_allclose([float(v) for v in row[5:]], ious, atol=1e-6)
    with Image.open(out / "miou.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


# -- the three formats, through the command ------------------------------------------------------------------


def test_a_folder_of_masks_gives_the_known_noc(models, tmp_path):
    images, masks = write_folder_dataset(tmp_path / "data")
    out = tmp_path / "out"
    done = run_command("--models", models, "--images", images, "--masks", masks, "--out", out)
    assert done.returncode == 0, done.stderr
    check_outputs(out, ["a_shapes.png", "a_shapes.png", "b_twin.png", "c_ignore.png"])
    table = done.stdout.splitlines()
    assert "NoC@90" in table[0] and "NoF@90" in table[0]
    assert table[1].split()[1:4] == ["6.00", "6.00", "6.00"]  # (1 + 2 + 20 + 1) / 4
    # Each image encoded once; each click one decoder run.
    assert "3 images encoded" in done.stdout and "80 decoder runs for 80 clicks" in done.stdout


def ls_result(region_id: str, mask: np.ndarray | None = None, polygon=None) -> dict:
    common = {"id": region_id, "to_name": "image", "original_width": SIZE, "original_height": SIZE, "image_rotation": 0}
    if mask is not None:
        return {**common, "from_name": "brush", "type": "brushlabels",
                "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Thing"]}}
    return {**common, "from_name": "poly", "type": "polygonlabels",
            "value": {"points": [[100 * x / SIZE, 100 * y / SIZE] for x, y in polygon], "closed": True, "polygonlabels": ["Thing"]}}


def corners(mask: np.ndarray) -> list[tuple[int, int]]:
    """The polygon around a rectangular mask, in pixel-edge coordinates (x, y)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    return [(left, top), (right, top), (right, bottom), (left, bottom)]


def label_studio_export(image_paths: dict) -> list:
    """Tasks as Label Studio exports them: brush regions for some objects, polygons for others. The
    'ignore' scene has no ignore region in Label Studio, so its strip is left out of the export's image."""
    return [
        {"id": 11, "data": {"image": image_paths["a_shapes"]}, "annotations": [
            {"id": 1, "was_cancelled": True, "result": [ls_result("cancelled", mask=TWIN)]},
            {"id": 2, "result": [ls_result("solid", polygon=corners(SOLID)), ls_result("two", mask=GREEN_PART | BLUE_PART),
                                 {"id": "kp", "type": "keypointlabels", "value": {"x": 1, "y": 1}}]},
        ]},
        {"id": 12, "data": {"image": image_paths["b_twin"]}, "annotations": [{"id": 3, "result": [ls_result("twin", mask=TWIN_OBJECT)]}]},
        {"id": 13, "data": {"image": image_paths["c_ignore"]}, "annotations": [
            {"id": 4, "result": [ls_result("other", mask=IGNORED_STRIP)]},
            {"id": 5, "ground_truth": True, "result": [ls_result("ignore", polygon=corners(IGNORED_OBJECT | IGNORED_STRIP))]},
        ]},
        {"id": 14, "data": {"image": "/data/upload/1/deadbeef-unlabelled.png"}, "annotations": []},
    ]


def test_a_label_studio_export_with_images_in_a_folder(models, tmp_path):
    images, _ = write_folder_dataset(tmp_path / "data")
    # Label Studio names an upload <8 hex digits>-<name>: the folder has the names as uploaded.
    paths = {name: f"/data/upload/1/{index:08x}-{name}.png" for index, name in enumerate(SCENES)}
    export = tmp_path / "export.json"
    export.write_text(json.dumps(label_studio_export(paths)))
    out = tmp_path / "out"
    done = run_command("--models", models, "--ls-export", export, "--images", images, "--out", out)
    assert done.returncode == 0, done.stderr
    summary, rows = read_outputs(out)
    # The ground-truth annotation of task 13 is its polygon around the square and the strip: one object.
    assert [(row[0], row[1]) for row in rows[1:]] == [
        ("a_shapes.png", "solid"), ("a_shapes.png", "two"), ("b_twin.png", "twin"), ("c_ignore.png", "ignore")
    ]
    assert summary == expected_summary()


def test_a_label_studio_export_with_images_fetched_from_label_studio(models, tmp_path, image_server):
    paths = {}
    for name, (pixels, _) in SCENES.items():
        paths[name] = image_server.add(f"/data/upload/1/{name}.png", encode_png(pixels))
    export = tmp_path / "export.json"
    export.write_text(json.dumps(label_studio_export(paths)[:3]))
    out = tmp_path / "out"
    done = run_command("--models", models, "--ls-export", export, "--out", out,
                       env_extra={"LABEL_STUDIO_URL": image_server.url, "LABEL_STUDIO_API_KEY": "evaluate-token"})
    assert done.returncode == 0, done.stderr
    assert read_outputs(out)[0] == expected_summary()
    fetched = [r for r in image_server.requests if r["path"].startswith("/data/upload/1/")]
    assert sorted(r["path"] for r in fetched) == sorted(paths.values())  # each image fetched once
    assert all(r["headers"].get("Authorization") == "Token evaluate-token" for r in fetched)


def test_a_coco_file_with_polygons_rle_and_compressed_rle(models, tmp_path):
    from pycocotools import mask as coco_mask

    images, _ = write_folder_dataset(tmp_path / "data")
    compressed = coco_mask.encode(np.asfortranarray(TWIN_OBJECT.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as a JSON file holds it
    flat = (GREEN_PART | BLUE_PART).ravel(order="F")  # COCO's uncompressed RLE runs down the columns
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    coco = {
        "images": [{"id": i, "file_name": f"{name}.png", "width": SIZE, "height": SIZE} for i, name in enumerate(SCENES)],
        "annotations": [
            {"id": 1, "image_id": 0, "iscrowd": 0, "segmentation": [[c for xy in corners(SOLID) for c in xy]]},
            {"id": 2, "image_id": 0, "iscrowd": 0, "segmentation": {"size": [SIZE, SIZE], "counts": counts}},
            {"id": 3, "image_id": 0, "iscrowd": 1, "segmentation": {"size": [SIZE, SIZE], "counts": counts}},
            {"id": 4, "image_id": 1, "iscrowd": 0, "segmentation": compressed},
            {"id": 5, "image_id": 2, "iscrowd": 0, "segmentation": [[c for xy in corners(IGNORED_OBJECT | IGNORED_STRIP) for c in xy]]},
        ],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    out = tmp_path / "out"
    done = run_command("--models", models, "--coco", path, "--images", images, "--out", out)
    assert done.returncode == 0, done.stderr
    summary, rows = read_outputs(out)
    assert [(row[0], row[1]) for row in rows[1:]] == [("a_shapes.png", "1"), ("a_shapes.png", "2"), ("b_twin.png", "4"), ("c_ignore.png", "5")]
    assert summary == expected_summary()


# -- options ----------------------------------------------------------------------------------------------


def test_compare_runs_a_second_pair_on_the_same_objects_and_limit_takes_the_first(models, tmp_path, clean_env, capsys):
    images, masks = write_folder_dataset(tmp_path / "data")
    other = tmp_path / "other-models"
    build_demo_models(other)
    out = tmp_path / "out"
    argv = ["--models", str(models), "--images", str(images), "--masks", str(masks), "--out", str(out), "--no-progress"]
    assert evaluate.main(argv + ["--compare", str(other), "--limit", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    first, second = read_outputs(out)[0], read_outputs(out / "compare")[0]
    assert first == second == expected_summary(EXPECTED_IOUS[:3], EXPECTED_NOC[:3])
    assert printed[1].startswith(str(models)) and printed[2].startswith(str(other))
    assert printed[3].split()[1:7] == ["+0.00"] * 3 + ["+0"] * 3
    # A later run without --compare into the same folder leaves no stale comparison behind.
    assert evaluate.main(argv + ["--limit", "1"]) == 0
    assert read_outputs(out)[0]["objects"] == 1 and not (out / "compare" / "summary.json").exists()


def test_the_mask_threshold_setting_is_measured(models, tmp_path, clean_env, monkeypatch):
    # The test models answer logits of +-8 (probability 0.99966 / 0.00034): a threshold above that finds
    # nothing, and every IoU is 0. Proof that the masks are the backend's, made with its settings.
    images, masks = write_folder_dataset(tmp_path / "data")
    monkeypatch.setenv("MASK_THRESHOLD", "0.9999")
    out = tmp_path / "out"
    assert evaluate.main(["--models", str(models), "--images", str(images), "--masks", str(masks), "--out", str(out), "--no-progress", "--limit", "1"]) == 0
    assert read_outputs(out)[0]["miou"] == [0.0] * 20


def test_each_image_is_encoded_once_and_each_click_is_one_decoder_run_whatever_the_cache_settings(
    models, tmp_path, clean_env, monkeypatch, capsys
):
    # Caches set to nothing would encode the image again for every click and replay every click's prefix.
    images, masks = write_folder_dataset(tmp_path / "data")
    monkeypatch.setenv("FEATURE_CACHE_BYTES", "0")
    monkeypatch.setenv("OBJECT_STATE_CACHE_BYTES", "0")
    out = tmp_path / "out"
    assert evaluate.main(["--models", str(models), "--images", str(images), "--masks", str(masks), "--out", str(out), "--no-progress", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "1 image encoded" in printed and "40 decoder runs for 40 clicks" in printed, printed
    assert read_outputs(out)[0] == expected_summary(EXPECTED_IOUS[:2], EXPECTED_NOC[:2])


def test_a_run_that_fails_while_writing_leaves_nothing_behind(models, tmp_path, clean_env, monkeypatch):
    images, masks = write_folder_dataset(tmp_path / "data")

    def broken_plot(path, results):
        path.write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(evaluate, "write_plot", broken_plot)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        evaluate.main(["--models", str(models), "--images", str(images), "--masks", str(masks), "--out", str(out), "--no-progress", "--limit", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no OUT_DIR, no temporary folder


# -- bad input --------------------------------------------------------------------------------------------


def fails(argv, capsys, *expected_in_message) -> None:
    assert evaluate.main([str(a) for a in argv] + ["--no-progress"]) == 2
    message = capsys.readouterr().err
    for text in expected_in_message:
        assert str(text) in message, message


def test_an_export_whose_image_is_not_in_the_folder(models, tmp_path, clean_env, capsys):
    images, _ = write_folder_dataset(tmp_path / "data")
    export = tmp_path / "export.json"
    tasks = label_studio_export({name: f"/data/upload/1/{name}.png" for name in SCENES})
    tasks[1]["data"]["image"] = "/data/upload/1/0badf00d-missing.png"
    export.write_text(json.dumps(tasks))
    out = tmp_path / "out"
    fails(["--models", models, "--ls-export", export, "--images", images, "--out", out], capsys,
          export, "task 12", "missing.png", images)
    assert not out.exists()


def test_an_export_whose_image_cannot_be_fetched(models, tmp_path, clean_env, capsys, image_server, monkeypatch):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(label_studio_export({name: f"/data/upload/1/{name}.png" for name in SCENES})[:1]))
    monkeypatch.setenv("LABEL_STUDIO_URL", image_server.url)
    out = tmp_path / "out"
    fails(["--models", models, "--ls-export", export, "--out", out], capsys, "task 11", "/data/upload/1/a_shapes.png", "404")
    assert not out.exists()


def test_a_mask_of_the_wrong_size(models, tmp_path, clean_env, capsys):
    images, masks = write_folder_dataset(tmp_path / "data")
    Image.fromarray(np.zeros((SIZE, SIZE - 1), np.uint8)).save(masks / "b_twin_2.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("an earlier run")
    fails(["--models", models, "--images", images, "--masks", masks, "--out", out], capsys,
          masks / "b_twin_2.png", "1023x1024", images / "b_twin.png")
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == "an earlier run"


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("bad-values", ["c_ignore_1.png", "0, 128 and 255", "7"]),
        ("rgb", ["c_ignore_1.png", "single channel"]),
        ("no-image", ["lonely_1.png", "no image lonely.*"]),
        ("bad-name", ["c_ignore.png", "NAME_K.png"]),
    ],
)
def test_bad_masks(models, tmp_path, clean_env, capsys, problem, expected):
    images, masks = write_folder_dataset(tmp_path / "data")
    if problem == "bad-values":
        Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(masks / "c_ignore_1.png")
    elif problem == "rgb":
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(masks / "c_ignore_1.png")
    elif problem == "no-image":
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(masks / "lonely_1.png")
    else:
        (masks / "c_ignore_1.png").rename(masks / "c_ignore.png")
    out = tmp_path / "out"
    fails(["--models", models, "--images", images, "--masks", masks, "--out", out], capsys, *expected)
    assert not out.exists()


def test_empty_datasets(models, tmp_path, clean_env, capsys):
    images, masks = write_folder_dataset(tmp_path / "data")
    empty = tmp_path / "empty-masks"
    empty.mkdir()
    fails(["--models", models, "--images", images, "--masks", empty, "--out", tmp_path / "o1"], capsys, empty, "no objects")
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "/data/upload/1/x.png"}, "annotations": []}]))
    fails(["--models", models, "--ls-export", export, "--images", images, "--out", tmp_path / "o2"], capsys, export, "no objects")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    fails(["--models", models, "--coco", coco, "--images", images, "--out", tmp_path / "o3"], capsys, coco, "no objects")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_bad_export_and_coco_files(models, tmp_path, clean_env, capsys):
    images, _ = write_folder_dataset(tmp_path / "data")
    export = tmp_path / "export.json"
    tasks = label_studio_export({name: f"{name}.png" for name in SCENES})
    tasks[0]["annotations"][1]["result"][1]["original_width"] = SIZE // 2  # the RLE no longer fits its frame
    export.write_text(json.dumps(tasks))
    fails(["--models", models, "--ls-export", export, "--images", images, "--out", tmp_path / "o"], capsys,
          "task 11 region two", "4194304 values", "512x1024")
    export.write_text("{not json")
    fails(["--models", models, "--ls-export", export, "--images", images, "--out", tmp_path / "o"], capsys, export, "JSON")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "b_twin.png", "width": 640, "height": 480}],
                                "annotations": [{"id": 9, "image_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}]}))
    fails(["--models", models, "--coco", coco, "--images", images, "--out", tmp_path / "o"], capsys, "b_twin.png", "640x480", "1024x1024")
    fails(["--models", tmp_path, "--coco", coco, "--images", images, "--out", tmp_path / "o"], capsys, "640x480")
    assert not (tmp_path / "o").exists()


def test_masks_and_coco_need_the_images_folder(tmp_path, clean_env, capsys):
    fails(["--models", tmp_path, "--masks", tmp_path, "--out", tmp_path / "o"], capsys, "--masks needs --images")
    fails(["--models", tmp_path, "--coco", tmp_path / "c.json", "--out", tmp_path / "o"], capsys, "--coco needs --images")


def test_model_folder_without_models(tmp_path, clean_env, capsys):
    images, masks = write_folder_dataset(tmp_path / "data")
    fails(["--models", tmp_path / "nothing", "--images", images, "--masks", masks, "--out", tmp_path / "o"], capsys,
          tmp_path / "nothing", "encoder.onnx")
    assert not (tmp_path / "o").exists()


# -- Label Studio's brush RLE -----------------------------------------------------------------------------


def test_the_brush_rle_decoder_matches_label_studio_converter():
    from label_studio_converter.brush import decode_rle, encode_rle

    rng = np.random.default_rng(5)
    masks = [rng.random((37, 53)) > 0.5, np.zeros((20, 30), bool), np.ones((300, 700), bool), SOLID | TWIN]
    noisy = np.zeros((64, 80), np.uint8)
    noisy[10:30] = rng.integers(0, 256, (20, 80))  # literal runs: every value different
    for mask in masks:
        rle = mask_to_rle(mask)
        np.testing.assert_array_equal(decode_brush_rle(rle), decode_rle(rle))
    # Literal runs (every value different) come from the library's own encoder.
    for values in (noisy.ravel(), np.repeat(noisy.ravel(), 4)):
        rle = encode_rle(values)
        np.testing.assert_array_equal(decode_brush_rle(rle), decode_rle(rle))


def test_the_image_field_of_an_export(tmp_path):
    export = tmp_path / "export.json"
    (tmp_path / "x.png").write_bytes(encode_png(SCENES["b_twin"][0]))
    export.write_text(json.dumps([{"id": 6, "data": {"photo": "/data/upload/1/x.png", "caption": "a twin"},
                                   "annotations": [{"result": [ls_result("r", mask=TWIN_OBJECT)]}]}]))
    with pytest.raises(DatasetError, match="task 6: which data field is the image .caption, photo.. Say it with --image-field"):
        read_label_studio_export(export, tmp_path)
    (obj,) = read_label_studio_export(export, tmp_path, image_field="photo")
    assert obj.location.path == tmp_path / "x.png"
    np.testing.assert_array_equal(obj.load().object_mask, TWIN_OBJECT)


def test_a_truncated_brush_rle_is_a_clear_error(tmp_path):
    rle = mask_to_rle(SOLID)
    export = tmp_path / "export.json"
    tasks = [{"id": 5, "data": {"image": "x.png"}, "annotations": [{"result": [{**ls_result("cut", mask=SOLID), "value": {"format": "rle", "rle": rle[:40]}}]}]}]
    export.write_text(json.dumps(tasks))
    (tmp_path / "x.png").write_bytes(encode_png(SCENES["b_twin"][0]))
    (obj,) = read_label_studio_export(export, tmp_path)
    with pytest.raises(DatasetError, match="task 5 region cut: the brush RLE ends"):
        obj.load()


# -- hostile datasets: bounded before anything is built from them --------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) and holds no pixel data: its header is all a check reads."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12000, 15000])  # over MAX_IMAGE_PIXELS; 15000 is over Pillow's own refusal too
def test_a_mask_over_the_pixel_limit_exits_2_naming_it(models, tmp_path, side):
    images, masks = write_folder_dataset(tmp_path / "data")
    (masks / "b_twin_1.png").write_bytes(png_header_only(side, side))
    done = run_command("--models", models, "--images", images, "--masks", masks, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert str(masks / "b_twin_1.png") in done.stderr and "100000000 (MAX_IMAGE_PIXELS)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def small_image_export(tmp_path: Path, region: dict) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(images / "small.png")
    export = tmp_path / "export.json"
    task = {"id": 3, "data": {"image": "/data/upload/1/small.png"}, "annotations": [{"result": [region]}]}
    export.write_text(json.dumps([task]))
    return export, images


def test_a_region_claiming_a_frame_over_the_pixel_limit_exits_2_before_pycocotools(models, tmp_path):
    # pycocotools crashed (SIGSEGV) rasterising a polygon in a 60000 x 60000 frame.
    region = {**ls_result("huge", polygon=[(0, 0), (SIZE, 0), (SIZE, SIZE)]), "original_width": 60000,
              "original_height": 60000}
    export, images = small_image_export(tmp_path, region)
    done = run_command("--models", models, "--ls-export", export, "--images", images, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "task 3 region huge" in done.stderr and "60000x60000" in done.stderr and "MAX_IMAGE_PIXELS" in done.stderr


@pytest.mark.parametrize("where", ["ls-export", "coco"])
def test_a_polygon_far_outside_its_frame_exits_2_before_pycocotools(models, tmp_path, where):
    # pycocotools allocates per pixel of a polygon's outline: coordinates of 1e12 crash it.
    if where == "ls-export":
        region = {**ls_result("far", polygon=[(0, 0), (1e12, 0), (1e12, 1e12)]), "original_width": 64,
                  "original_height": 48}
        export, images = small_image_export(tmp_path, region)
        args = ["--ls-export", export, "--images", images]
    else:
        images = tmp_path / "images"
        images.mkdir()
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(images / "small.png")
        export = tmp_path / "coco.json"
        far = [[0, 0, 1e12, 0, 1e12, 1e12]]
        export.write_text(json.dumps({"images": [{"id": 1, "file_name": "small.png", "width": 64, "height": 48}],
                                      "annotations": [{"id": 9, "image_id": 1, "segmentation": far}]}))
        args = ["--coco", export, "--images", images]
    done = run_command("--models", models, *args, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert str(export) in done.stderr and "outline" in done.stderr, done.stderr
    assert "over the limit of 11200" in done.stderr  # 100 x (64 + 48)


def test_a_coco_file_name_outside_the_images_folder_is_never_read(models, tmp_path, clean_env, capsys):
    images, _ = write_folder_dataset(tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(SCENES["b_twin"][0]).save(outside / "x.png")  # readable, the declared size: only the path is wrong
    coco = tmp_path / "coco.json"
    for file_name in ("../outside/x.png", str(outside / "x.png")):
        polygon = [c for xy in corners(TWIN_OBJECT) for c in xy]
        coco.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name, "width": SIZE, "height": SIZE}],
                                    "annotations": [{"id": 9, "image_id": 1, "segmentation": [polygon]}]}))
        fails(["--models", models, "--coco", coco, "--images", images, "--out", tmp_path / "o"], capsys,
              coco, repr(file_name), "only files under --images are read")
    assert not (tmp_path / "o").exists()


def test_names_that_a_spreadsheet_would_read_as_formulas_are_written_as_text(models, tmp_path, clean_env):
    images, masks = write_folder_dataset(tmp_path / "data")
    for path in [*images.iterdir(), *masks.iterdir()]:
        if path.name.startswith("b_twin"):
            path.rename(path.with_name(path.name.replace("b_twin", "=HYPERLINK(1)")))
    out = tmp_path / "out"
    argv = ["--models", str(models), "--images", str(images), "--masks", str(masks), "--out", str(out), "--no-progress"]
    assert evaluate.main(argv) == 0
    with open(out / "objects.csv", newline="", encoding="utf-8") as file:
        names = [row[0] for row in __import__("csv").reader(file)][1:]
    assert names == ["'=HYPERLINK(1).png", "a_shapes.png", "a_shapes.png", "c_ignore.png"]
    texts = ("-5", "+1.5", "@x", "-1+cmd", "\tx", "plain")
    assert [evaluate.spreadsheet_text(t) for t in texts] == ["-5", "+1.5", "'@x", "'-1+cmd", "'\tx", "plain"]


@pytest.mark.parametrize(
    "polygon", [[0, 0, 10**400, 0, 5, 5], [0, 0, "a", 0, 5, 5], [0, 0, 1, 0, 5, 5, 7], [0, 0, float("nan"), 0, 5, 5]]
)
def test_a_coco_polygon_that_is_not_finite_pixel_pairs_is_a_clear_error(tmp_path, polygon):
    from tools.eval_datasets import read_coco

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "small.png")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "small.png", "width": 64, "height": 48}],
                                "annotations": [{"id": 9, "image_id": 1, "segmentation": [polygon]}]}))
    with pytest.raises(DatasetError, match="annotation 9: a polygon (is not a list of x, y|has a coordinate that is not)"):
        read_coco(coco, tmp_path)
