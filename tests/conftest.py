"""Shared fixtures: the test models, a local image server, the app, the backend as a process; and, from
tools.scenes, synthetic images with known objects and the request bodies Label Studio sends for them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
from api import init_app  # noqa: E402
from segnext_backend.demo_models import build_demo_models  # noqa: E402
from segnext_backend.engine import SegNextEngine  # noqa: E402
from segnext_backend.runtime import build_runtime, runtime_status, set_runtime  # noqa: E402
from segnext_backend.settings import Settings  # noqa: E402
from tools.file_server import BytesHandler, free_port, start_server  # noqa: E402
from tools.scenes import (  # noqa: E402, F401  (the tests import these from here)
    LABEL_CONFIG,
    Scene,
    captured,
    click_on,
    decode_region,
    encode_png,
    iou,
    keypoint,
    make_scene,
    predict_body,
)


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

    class Handler(BytesHandler):
        def do_GET(self):
            server_state.requests.append({"path": self.path, "headers": dict(self.headers)})
            if server_state.delay_seconds:
                time.sleep(server_state.delay_seconds)
            self.answer(server_state.files.get(self.path))  # the path with its query string

    server_state.url, httpd = start_server(Handler)
    yield server_state
    httpd.shutdown()
    httpd.server_close()


def onnxruntime_build_python(venv: Path, requirements_file: str, package: str, provider: str) -> Path:
    """The python of a virtual environment with another build of ONNX Runtime (`package`, from
    `requirements_file`) in place of requirements.txt's, made as the Dockerfile makes that image, and remade
    only when a requirements file changes. Checks that the pins install together and that `provider` is there."""
    import hashlib
    import shutil

    def run(command: list, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, **kwargs)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    requirements = ("requirements.txt", "requirements-no-deps.txt", requirements_file)
    wanted = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in requirements) + sys.version.encode()).hexdigest()
    stamp = venv / ".installed-build"
    python = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    run(["bash", "scripts/install.sh"], env={**os.environ, "VENV": str(venv), "PYTHON": sys.executable})
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "uninstall", "--yes", "onnxruntime"])  # as the Dockerfile does for such an image
    run([*pip, "install", "--quiet", package])
    conflicts = subprocess.run([*pip, "check"], capture_output=True, text=True).stdout.splitlines()
    assert [line for line in conflicts if not line.startswith("label-studio-ml ")] in ([], ["No broken requirements found."])
    build = run([str(python), "-c", "import onnxruntime as o; print(o.get_available_providers())"]).stdout
    assert provider in build, build
    stamp.write_text(wanted)
    return python


@pytest.fixture(scope="session")
def test_model_paths(tmp_path_factory) -> tuple[Path, Path]:
    return build_demo_models(tmp_path_factory.mktemp("test-models"))


@pytest.fixture(scope="session")
def shallow_models(tmp_path_factory) -> tuple[Path, Path]:
    """The shallow SegNext export as built (random weights, no bias shift): (encoder path, decoder path)."""
    pytest.importorskip("torch")
    from tools.build_benchmark_models import export_models
    from tools.segnext_arch import SegNextConfig, SegNextModel

    return export_models(SegNextModel(SegNextConfig.shallow(), seed=0), tmp_path_factory.mktemp("shallow"))


@pytest.fixture(scope="session")
def shallow_segnext(tmp_path_factory):
    """The shallow SegNext export (tools/build_benchmark_models.py --shallow): SegNext's true widths and ONNX
    interface with 2 encoder blocks and 1 fusion block, random weights. (model, encoder path, decoder path).

    The last bias is shifted so that a click's logits on a synthetic scene are centred on 0: with seed 0 as
    built, 93 % of them are positive and the masks cover almost the whole image, which would leave the mask
    comparisons little boundary to compare."""
    torch = pytest.importorskip("torch")
    from tools.build_benchmark_models import export_models
    from tools.segnext_arch import SegNextConfig, SegNextDecoder, SegNextEncoder, SegNextModel

    model = SegNextModel(SegNextConfig.shallow(), seed=0)
    image = torch.from_numpy(make_scene(640, 480, seed=1).pixels).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(1024, 1024), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = SegNextDecoder(model)(
            SegNextEncoder(model)(image), torch.tensor([[[300.0, 400.0]]]), torch.tensor([[1.0]]), torch.zeros(1, 1, 1024, 1024)
        )
        model.head.seg_conv.bias -= logits.median()
    encoder, decoder = export_models(model, tmp_path_factory.mktemp("shallow-segnext"))
    return model, encoder, decoder


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
    """make_client(models=None, **settings) -> (Flask test client, EngineSpy); the image server is Label
    Studio's host. `models`: (encoder path, decoder path), the test models by default."""
    made = []

    def make(models=None, **overrides):
        settings = replace(
            Settings(), **{"label_studio_url": image_server.url, "label_studio_api_key": "test-token", **overrides}
        )
        spy = EngineSpy(SegNextEngine(*(models or test_model_paths), intra_op_threads=1))
        runtime = build_runtime(settings, spy)
        set_runtime(runtime)
        made.append(runtime)
        basic_auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
        app = init_app(model.SegNextBackend, basic_auth=basic_auth, status=runtime_status, settings=settings)
        return app.test_client(), spy

    yield make
    set_runtime(None)
    for runtime in made:
        runtime.pre_encoder.stop()


def backend_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DEMO", "MODEL_DIR", "MODEL_URL", "MODEL_SHA256")}
    env.update(MODEL_DIR=str(tmp_path / "models"), LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


READY_DEADLINE_SECONDS = 300  # a loaded 2-core machine can take minutes to load the models in every worker


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    """Wait until `url/health` answers (200, or 401 behind basic auth), whatever fails before that (refused,
    reset, read time-out, a 5xx), up to a deadline; a process that exits meanwhile fails at once with its log."""
    deadline = time.monotonic() + READY_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if requests.get(url + "/health", timeout=10).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the backend was not healthy within {READY_DEADLINE_SECONDS} s: " + log.read_text())


def assert_click_finds_object(url: str, image_server, scene, index: int, name: str, timeout: float = 120) -> None:
    """Serve `scene` as /data/upload/1/NAME.png, click once on its object `index` at the backend at `url`, and
    check that the answer is that object (IoU >= 0.98)."""
    height, width = scene.pixels.shape[:2]
    path = image_server.add(f"/data/upload/1/{name}.png", encode_png(scene.pixels))
    response = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, index)]), timeout=timeout)
    assert response.status_code == 200, response.text
    region = response.json()["results"][0]["result"][0]
    assert iou(decode_region(region, width, height), scene.objects[index]) >= 0.98


def backend_log(tmp_path: Path, url: str) -> Path:
    """Where `started_backend` writes the log of the backend at `url`."""
    return tmp_path / f"backend-{url.rsplit(':', 1)[1]}.log"


@pytest.fixture
def started_backend(tmp_path):
    processes = []

    def start(gunicorn=False, python: Path | None = None, **env_extra) -> str:
        """Start the backend (as `python _wsgi.py`, or under gunicorn; `python`: another environment's) and return
        its URL once it listens; its log is `backend_log(url)`."""
        port = free_port()
        log = backend_log(tmp_path, f"http://127.0.0.1:{port}")
        python = python or Path(sys.executable)
        if gunicorn:
            command = [str(python.parent / "gunicorn"), "-c", "gunicorn.conf.py"]
        else:
            command = [str(python), "_wsgi.py", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=backend_env(tmp_path, PORT=str(port), **env_extra),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log)
        return url

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
