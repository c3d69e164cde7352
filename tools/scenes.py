"""Synthetic images with known object masks, and the /predict bodies Label Studio sends for clicks on them.

Used by the tests, the load test and the memory measurement: each scene's objects are flat colours, so the
test models segment them exactly and a returned mask can be checked against the object that was clicked.
`natural_image` is photo-like instead, for the benchmarks and the calibration of the benchmark models.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CAPTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "label-studio"

BACKGROUND = (20, 20, 20)
# Flat colours far apart (the test decoder selects pixels within 0.05 of the clicked colour).
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 210, 40)]

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Thing" background="#FF0000"/>
    <Label value="Other" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Thing" smart="true" background="#000000" showInline="true"/>
    <Label value="Other" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
</View>"""
# Label configs that /setup refuses: a smart keypoint label ("Other") that no region control carries, and no
# keypoint control at all.
LABEL_NOT_CARRIED = LABEL_CONFIG.replace('    <Label value="Other" background="#0d14d3"/>\n', "")
NO_KEYPOINT_LABELS = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Thing"/></BrushLabels>
</View>"""


@dataclass
class Scene:
    """A synthetic image as the browser shows it, with boolean masks of its objects."""

    pixels: np.ndarray  # H x W x 3 uint8
    objects: list[np.ndarray]  # H x W bool each

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def inside_point(self, index: int) -> tuple[float, float]:
        """A point well inside object `index` (a pixel centre away from its edges), in pixels."""
        core = self.objects[index].copy()
        margin = max(2, min(self.width, self.height) // 50)
        for _ in range(margin):  # erode, so that the point is not on an edge the resize blends
            core[1:-1, 1:-1] &= core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
        ys, xs = np.nonzero(core)
        cy, cx = np.median(ys), np.median(xs)
        nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        return float(xs[nearest]) + 0.5, float(ys[nearest]) + 0.5


def make_scene(width: int, height: int, seed: int = 0) -> Scene:
    """An ellipse, a rectangle and a ring-shaped object on a dark background; sizes relative to the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = BACKGROUND
    shift = rng.uniform(-0.03, 0.03, size=2)
    ellipse = ((xx / width - 0.3 - shift[0]) / 0.18) ** 2 + ((yy / height - 0.35 - shift[1]) / 0.22) ** 2 <= 1
    rectangle = (xx >= 0.55 * width) & (xx < 0.9 * width) & (yy >= 0.15 * height) & (yy < 0.5 * height)
    radius = np.hypot(xx / width - 0.6, yy / height - 0.75)
    ring = (radius >= 0.06) & (radius <= 0.2)
    objects = []
    for colour, shape in zip(COLOURS, (ellipse, rectangle, ring)):
        shape = shape & ~np.any(objects, axis=0) if objects else shape
        pixels[shape] = colour
        objects.append(shape)
    return Scene(pixels=pixels, objects=objects)


def natural_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like HxWx3 uint8 image (smooth gradients, a few objects, some noise): JPEGs to realistic sizes."""
    rng = np.random.default_rng(seed)
    small_h, small_w = 300, 400
    yy, xx = np.mgrid[0:small_h, 0:small_w] / np.array([small_h, small_w])[:, None, None]
    base = np.stack([0.4 + 0.3 * xx, 0.5 + 0.2 * yy, 0.6 - 0.3 * xx * yy], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        base[inside] = rng.uniform(0, 1, 3)
    small = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    big = np.asarray(small.resize((width, height), Image.BILINEAR)).astype(np.int16)
    big = big + rng.integers(-6, 7, size=(height, 1, 1), dtype=np.int16)  # row noise: cheap texture
    return np.clip(big, 0, 255).astype(np.uint8)


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(natural_image(width, height, seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def encode_png(pixels: np.ndarray, exif_orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if exif_orientation is None:
        image.save(buffer, "PNG", compress_level=1)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, "PNG", compress_level=1, exif=exif)
    return buffer.getvalue()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def captured(name: str) -> dict:
    """A request body that a real Label Studio 1.23.2 sent (tests/fixtures/label-studio)."""
    return json.loads((CAPTURES / name).read_text())["json"]


def keypoint(x_pct: float, y_pct: float, width: int, height: int, positive: bool = True, label: str = "Thing") -> dict:
    """A smart keypoint as the Label Studio front end sends it (unrounded percentages)."""
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x_pct, "y": y_pct, "width": 0.2, "labels": [label], "keypointlabels": [label]},
        "is_positive": positive,
        "id": f"kp{x_pct:.3f}{y_pct:.3f}",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def predict_body(image_path: str, points: list[dict] | None, task_id: int = 2) -> dict:
    """A /predict body shaped like the captured UI click, with this task image and these keypoints."""
    body = copy.deepcopy(captured("ui-click1-positive-request.json"))
    body["label_config"] = LABEL_CONFIG
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = image_path
    body["params"]["context"] = None if points is None else {"result": points}
    return body


def click_on(scene: Scene, index: int, positive: bool = True) -> dict:
    x, y = scene.inside_point(index)
    return keypoint(100 * x / scene.width, 100 * y / scene.height, scene.width, scene.height, positive)


def decode_region(region: dict, width: int, height: int) -> np.ndarray:
    """The mask of a returned BrushLabels region, decoded by label-studio-converter."""
    from label_studio_converter.brush import decode_rle

    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


# -- polygons as their consumers read them back ---------------------------------------------------------------


def pillow_polygon_mask(regions: list[dict], width: int, height: int) -> np.ndarray:
    """The pixels of PolygonLabels regions as a consumer rasterises them: each region's percent points scaled to
    the original size and filled with Pillow's `ImageDraw.polygon`, regions OR-ed."""
    from PIL import ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for region in regions:
        points = [(x / 100.0 * width, y / 100.0 * height) for x, y in region["value"]["points"]]
        draw.polygon(points, fill=255)
    return np.asarray(canvas) > 0


def pixel_centre_mask(polygons: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """The pixels whose centres lie inside the polygons (pixel coordinates), by the even-odd rule: the exact
    reading of a pixel-edge outline, without Pillow's boundary pixels. For checking, not for speed."""
    out = np.zeros((height, width), bool)
    if not polygons:
        return out
    edges = np.concatenate([np.concatenate([p, np.roll(p, -1, axis=0)], axis=1) for p in polygons]).astype(np.float64)
    low, high = np.minimum(edges[:, 1], edges[:, 3]), np.maximum(edges[:, 1], edges[:, 3])
    centres = np.arange(width) + 0.5
    for y in range(height):
        row = y + 0.5
        crossing = edges[(low <= row) & (row < high)]  # horizontal edges never cross a centre row
        if crossing.size == 0:
            continue
        x0, y0, x1, y1 = crossing.T
        xs = np.sort(x0 + (row - y0) * (x1 - x0) / (y1 - y0))
        out[y] = np.searchsorted(xs, centres) % 2 == 1
    return out
