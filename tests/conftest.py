"""Shared fixtures: the test models, synthetic images with known objects, a local image server, the app."""

from __future__ import annotations

import copy
import http.server
import io
import json
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "label-studio"
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
from api import init_app  # noqa: E402
from segnext_backend.engine import SegNextEngine  # noqa: E402
from segnext_backend.settings import Settings  # noqa: E402
from tools.test_models import build_test_models  # noqa: E402

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


@dataclass
class ImageServer:
    """Serves byte strings at paths on 127.0.0.1; records each request's path and headers."""

    files: dict = field(default_factory=dict)  # path -> bytes, or an int HTTP status to answer with
    requests: list = field(default_factory=list)
    delay_seconds: float = 0.0
    url: str = ""

    def add(self, path: str, content) -> str:
        self.files[path] = content
        return path

    def requests_for(self, path: str) -> list:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture
def image_server():
    server_state = ImageServer()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            server_state.requests.append({"path": self.path, "headers": dict(self.headers)})
            if server_state.delay_seconds:
                time.sleep(server_state.delay_seconds)
            content = server_state.files.get(self.path)
            if content is None or isinstance(content, int):
                self.send_response(content or 404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server_state.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server_state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def test_model_paths(tmp_path_factory) -> tuple[Path, Path]:
    return build_test_models(tmp_path_factory.mktemp("test-models"))


class EngineSpy:
    """Wraps a real engine and records every encoder and decoder run (inputs and outputs)."""

    def __init__(self, engine: SegNextEngine):
        self.engine = engine
        self.encodes = 0
        self.decodes: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode(self, model_input):
        self.encodes += 1
        return self.engine.encode(model_input)

    def decode(self, features, coords, labels, prev_mask):
        logits = self.engine.decode(features, coords, labels, prev_mask)
        self.decodes.append(
            {
                "features": features,
                "coords": np.array(coords),
                "labels": np.array(labels),
                "prev_mask": np.array(prev_mask),
                "logits": logits,
            }
        )
        return logits


@pytest.fixture
def make_client(test_model_paths, image_server):
    """make_client(**settings) -> (Flask test client, EngineSpy); the image server is Label Studio's host."""
    made = []

    def make(**overrides):
        settings = replace(
            Settings(), label_studio_url=image_server.url, label_studio_api_key="test-token", **overrides
        )
        spy = EngineSpy(SegNextEngine(*test_model_paths, intra_op_threads=1))
        runtime = model.build_runtime(settings, spy)
        model.set_runtime(runtime)
        made.append(runtime)
        basic_auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
        app = init_app(model.SegNextBackend, basic_auth=basic_auth, status=model.runtime_status)
        return app.test_client(), spy

    yield make
    model.set_runtime(None)
    for runtime in made:
        runtime.segmenter.shutdown()


def captured(name: str) -> dict:
    """A request body that a real Label Studio 1.23.2 sent (../shared/label-studio)."""
    return json.loads((SHARED / name).read_text())["json"]


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
