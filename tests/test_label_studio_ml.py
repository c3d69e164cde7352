"""SegNextBackend under label-studio-ml's own servers: 2.x's `init_app(model_class=SegNextBackend)`, `_wsgi.py -p`
and `label-studio-ml start` in a virtual environment made as a user makes it (2.x from its wheel, label-studio-sdk
2.1.2, requirements-label-studio-ml.txt); 1.0.9's `init_app` (the version requirements.txt installs);
`gunicorn --preload _wsgi:app`; the lazy, once-per-process model load they rely on; /setup's refusal of label
configs that cannot work; the command-line flags and variable names of label-studio-ml."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import (
    LABEL_CONFIG,
    READY_DEADLINE_SECONDS,
    ROOT,
    backend_env,
    captured,
    click_on,
    decode_region,
    encode_png,
    free_port,
    iou,
    keypoint,
    make_scene,
    predict_body,
    wait_until_healthy,
)
from tools.scenes import LABEL_NOT_CARRIED, NO_KEYPOINT_LABELS, pillow_polygon_mask

import _wsgi
import model
from segnext_backend import runtime as process_runtime
from segnext_backend.errors import NotReadyError
from segnext_backend.settings import Settings


@pytest.fixture
def lazy_env(tmp_path, monkeypatch, image_server):
    """No models loaded in this process; the environment a lazy load reads: demo models, the image server."""
    process_runtime.set_runtime(None)
    for name in ("MODEL_URL", "MODEL_SHA256", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEMO", "true")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("LABEL_STUDIO_URL", image_server.url)
    yield
    process_runtime.set_runtime(None)


def test_label_studio_ml_1_init_app_serves_a_click_without_any_other_call(lazy_env, image_server, tmp_path):
    from label_studio_ml.api import init_app  # 1.0.9's (requirements-no-deps.txt)

    app = init_app(model_class=model.SegNextBackend, model_dir=str(tmp_path / "label-studio-ml"))
    client = app.test_client()
    scene = make_scene(800, 600, seed=31)
    path = image_server.add("/data/upload/1/init-app.png", encode_png(scene.pixels))
    setup = copy.deepcopy(captured("setup-request.json"))
    setup["schema"] = LABEL_CONFIG  # label-studio-ml 1.0.9 keeps the instance /setup made, with its config
    assert client.post("/setup", json=setup).status_code == 200
    for index in (2, 0):
        response = client.post("/predict", json=predict_body(path, [click_on(scene, index)]))
        assert response.status_code == 200, response.get_data(as_text=True)
        region = response.json["results"][0]["result"][0]
        assert iou(decode_region(region, 800, 600), scene.objects[index]) >= 0.98
    assert response.json["results"][0]["model_version"] == process_runtime.DEMO_VERSION
    opened = client.post("/predict", json=predict_body(path, None))
    assert opened.status_code == 200 and opened.json["results"] == [[]]


def test_the_models_load_once_for_concurrent_first_requests(lazy_env, monkeypatch):
    loads = []
    real_load = process_runtime.load

    def slow_load(settings):
        loads.append(settings)
        time.sleep(0.5)  # every thread asks while the first load is still running
        real_load(settings)

    monkeypatch.setattr(process_runtime, "load", slow_load)
    runtimes = []
    threads = [threading.Thread(target=lambda: runtimes.append(process_runtime.get_runtime())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READY_DEADLINE_SECONDS)
    assert len(loads) == 1 and loads[0].demo
    assert len(runtimes) == 8 and all(runtime is runtimes[0] for runtime in runtimes)
    assert process_runtime.get_runtime() is runtimes[0]


def test_a_failed_load_is_reported_and_retried_only_after_a_while(lazy_env, monkeypatch):
    monkeypatch.setenv("DEMO", "false")
    monkeypatch.setenv("MODEL_URL", "")  # no model files and no download: the load fails
    attempts = []
    real_load = process_runtime.load
    monkeypatch.setattr(process_runtime, "load", lambda settings: (attempts.append(1), real_load(settings)))
    for _ in range(2):
        with pytest.raises(NotReadyError, match="could not be loaded.*place encoder.onnx and decoder.onnx in"):
            process_runtime.get_runtime()
    with pytest.raises(NotReadyError, match="could not be loaded"):
        process_runtime.runtime_status()  # /health says why
    assert len(attempts) == 1
    monkeypatch.setattr(process_runtime, "LOAD_RETRY_SECONDS", 0.0)
    monkeypatch.setenv("DEMO", "true")
    assert process_runtime.get_runtime().model_version == process_runtime.DEMO_VERSION
    assert len(attempts) == 2


def test_health_starts_the_load_and_answers_503_until_it_is_done(lazy_env, monkeypatch):
    release = threading.Event()
    real_load = process_runtime.load
    monkeypatch.setattr(process_runtime, "load", lambda settings: (release.wait(30), real_load(settings)))
    with pytest.raises(NotReadyError, match="loading"):
        process_runtime.runtime_status()
    release.set()
    process_runtime.start_loading().result(READY_DEADLINE_SECONDS)
    assert process_runtime.runtime_status()["demo"] is True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_the_parents_models(lazy_env):
    assert process_runtime.get_runtime() is not None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once (no interpreter teardown in a forked test process)
        os.write(write_end, b"none" if process_runtime._runtime is None and process_runtime._load is None else b"inherited")
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 100)
    os.waitpid(pid, 0)
    os.close(read_end)
    assert answer == b"none"
    assert process_runtime._runtime is not None  # the parent keeps its own


def test_settings_accept_label_studio_ml_variable_names():
    given = Settings.from_env({"LABEL_STUDIO_HOST": "http://ls.example:8080/", "LABEL_STUDIO_ACCESS_TOKEN": "abc"})
    assert (given.label_studio_url, given.label_studio_api_key) == ("http://ls.example:8080", "abc")
    both = Settings.from_env({
        "LABEL_STUDIO_URL": "http://url:8080", "LABEL_STUDIO_HOST": "http://host:8080",
        "LABEL_STUDIO_API_KEY": "key", "LABEL_STUDIO_ACCESS_TOKEN": "token",
    })
    assert (both.label_studio_url, both.label_studio_api_key) == ("http://url:8080", "key")


def test_command_line_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("MODEL_DIR", "env-models")
    monkeypatch.setenv("MAX_CLICKS", "7")
    monkeypatch.delenv("BASIC_AUTH_USER", raising=False)
    flags = _wsgi.parse_args([
        "-p", "9191", "--host", "127.0.0.1", "--basic-auth-user", "ann", "--basic-auth-pass", "pw",
        "--log-level", "DEBUG", "--model-dir", str(tmp_path),
    ])
    settings = _wsgi.settings_from(flags)
    assert (settings.port, settings.log_level, settings.model_dir) == (9191, "DEBUG", tmp_path)
    assert (settings.basic_auth_user, settings.basic_auth_pass, flags.host) == ("ann", "pw", "127.0.0.1")
    assert settings.max_clicks == 7  # the rest still comes from the environment
    plain = _wsgi.settings_from(_wsgi.parse_args([]))
    assert (plain.port, plain.log_level, plain.model_dir, plain.basic_auth_user) == (9000, "WARNING", Path("env-models"), "")
    for bad in (["-p", "0"], ["--port", "http"], ["--log-level", "LOUD"]):
        with pytest.raises(SystemExit):
            _wsgi.parse_args(bad)


def stop_group(process: subprocess.Popen) -> None:
    """End the process group this test started (label-studio-ml runs the backend through a shell)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_label_studio_ml_start_runs_the_backend_with_its_flags(tmp_path, image_server):
    port = free_port()
    log = tmp_path / "label-studio-ml.log"
    env = backend_env(tmp_path, DEMO="true", LABEL_STUDIO_HOST=image_server.url)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # it runs `python _wsgi.py`
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "label-studio-ml"), "start", ".", "-p", str(port), "--host", "127.0.0.1",
         "--basic-auth-user", "annotator", "--basic-auth-pass", "s3cret", "--log-level", "DEBUG"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log)
        assert requests.get(url + "/health", timeout=30).status_code == 401
        auth = ("annotator", "s3cret")
        assert requests.get(url + "/health", auth=auth, timeout=30).json()["demo"] is True
        scene = make_scene(700, 500, seed=32)
        path = image_server.add("/data/upload/1/start.png", encode_png(scene.pixels))
        response = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, 1)]), auth=auth, timeout=60)
        assert response.status_code == 200, response.text
        region = response.json()["results"][0]["result"][0]
        assert iou(decode_region(region, 700, 500), scene.objects[1]) >= 0.98
    finally:
        stop_group(process)
    assert "DEBUG" in log.read_text()  # --log-level reached the process


def onnxruntime_mapped(pid: int) -> bool:
    """Whether ONNX Runtime's native library is loaded into the process (it is from its first import on)."""
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_gunicorn_preload_of_wsgi_app_loads_in_each_worker_and_exits_cleanly(tmp_path, image_server):
    # label-studio-ml's Docker template runs `gunicorn --preload ... _wsgi:app`: the master imports the app
    # before it forks, so the models must load in the workers, and the master must never import onnxruntime
    # (a worker forked from a process that has aborts when it exits).
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "--preload", "--bind", f"127.0.0.1:{port}", "--workers", "2",
         "--threads", "2", "_wsgi:app"],
        cwd=ROOT, env=backend_env(tmp_path, DEMO="true", LABEL_STUDIO_URL=image_server.url),
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log)  # 503 while a worker loads, 200 once it has
        scene = make_scene(640, 480, seed=33)
        path = image_server.add("/data/upload/1/preload.png", encode_png(scene.pixels))
        for index in (0, 1, 2, 1):
            # A worker that has not loaded yet loads on this request: give it the time a load may take.
            body = predict_body(path, [click_on(scene, index)])
            response = requests.post(url + "/predict", json=body, timeout=READY_DEADLINE_SECONDS)
            assert response.status_code == 200, response.text
            region = response.json()["results"][0]["result"][0]
            assert iou(decode_region(region, 640, 480), scene.objects[index]) >= 0.98
        # A polygon answer runs OpenCV in the worker; the master must not have it either (it starts threads).
        body = predict_body(path, [click_on(scene, 0)])
        body["label_config"] = LABEL_CONFIG.replace("BrushLabels", "PolygonLabels")
        response = requests.post(url + "/predict", json=body, timeout=READY_DEADLINE_SECONDS)
        assert response.json()["results"][0]["result"][0]["type"] == "polygonlabels", response.text
        assert not onnxruntime_mapped(process.pid), "the gunicorn master has loaded ONNX Runtime"
        assert "cv2" not in Path(f"/proc/{process.pid}/maps").read_text(), "the gunicorn master has loaded OpenCV"
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert process.wait(60) == 0
    finally:
        stop_group(process)
    text = log.read_text()
    assert text.count("models loaded from") >= 1 and "Worker exiting" in text
    assert "SIGABRT" not in text and "terminate called" not in text, text


def test_the_product_never_imports_tools(tmp_path):
    # DEMO serves the package's own demo models; nothing the backend runs may come from tools/ or tests/.
    probe = (
        "import sys, _wsgi\n"
        "from segnext_backend.runtime import load\n"
        "from segnext_backend.settings import Settings\n"
        f"load(Settings(demo=True, model_dir=__import__('pathlib').Path({str(tmp_path)!r})))\n"
        "_wsgi.create_app(Settings())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tools', 'tests', 'conftest')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# -- /setup refuses a label config that cannot work ------------------------------------------------------------

# Each keypoint label must have a brush, polygon or rectangle label of the same name on the same image: the smart
# ones' and those of a plain keypoint control beside them (points to turn into masks in a batch).
PLAIN_KEYPOINTS = '  <KeyPointLabels name="points" toName="image"><Label value="{}"/></KeyPointLabels>\n</View>'
NO_IMAGE = """<View>
  <Text name="text" value="$text"/>
  <Choices name="choice" toName="text"><Choice value="Thing"/></Choices>
</View>"""
KEYPOINT_ON_NO_IMAGE = LABEL_CONFIG.replace('name="tag2" toName="image"', 'name="tag2" toName="elsewhere"')
REFUSED_AT_SETUP = {
    "label not carried": (LABEL_NOT_CARRIED, "label 'Other'"),
    "no KeyPointLabels": (NO_KEYPOINT_LABELS, "KeyPointLabels"),
    "no image": (NO_IMAGE, "an <Image> tag"),
    "keypoints on no image": (KEYPOINT_ON_NO_IMAGE, '<Image name="elsewhere">'),
    "plain keypoint label not carried": (
        LABEL_CONFIG.replace("</View>", PLAIN_KEYPOINTS.format("Nose")), "label 'Nose'"
    ),
    "not XML": ("<View><Image", "could not be parsed"),
}
ACCEPTED_AT_SETUP = {
    "brush": LABEL_CONFIG,
    "polygon": LABEL_CONFIG.replace("BrushLabels", "PolygonLabels"),
    "rectangle": LABEL_CONFIG.replace("BrushLabels", "RectangleLabels"),
    "plain keypoints beside": LABEL_CONFIG.replace("</View>", PLAIN_KEYPOINTS.format("Other")),
}


def setup_body(label_config: str) -> dict:
    body = copy.deepcopy(captured("setup-request.json"))
    body["schema"] = label_config
    return body


def test_setup_refuses_a_config_that_cannot_work_and_answers_a_right_one(make_client, image_server):
    client, _ = make_client()
    for name, (label_config, reason) in REFUSED_AT_SETUP.items():
        response = client.post("/setup", json=setup_body(label_config))
        assert response.status_code == 400 and reason in response.json["error"], (name, response.json)
    for name, label_config in ACCEPTED_AT_SETUP.items():
        response = client.post("/setup", json=setup_body(label_config))
        assert response.status_code == 200 and response.json["model_version"] == process_runtime.DEMO_VERSION, name
    # A click with a label the config answers still gets its mask where another label is not carried: the
    # refusal is /setup's, so that a running project is not stopped by a later edit of its config.
    scene = make_scene(400, 300, seed=34)
    path = image_server.add("/data/upload/1/setup.png", encode_png(scene.pixels))
    body = predict_body(path, [click_on(scene, 0)])
    body["label_config"] = LABEL_NOT_CARRIED
    region = client.post("/predict", json=body).json["results"][0]["result"][0]
    assert iou(decode_region(region, 400, 300), scene.objects[0]) >= 0.98
    other = predict_body(path, [keypoint(50, 50, 400, 300, label="Other")])
    other["label_config"] = LABEL_NOT_CARRIED
    refused = client.post("/predict", json=other)
    assert refused.status_code == 400 and "label 'Other'" in refused.json["error"]  # the reason /setup gave


# -- label-studio-ml 2.x, from its wheel --------------------------------------------------------------------------

LABEL_STUDIO_ML_2_VENV = ROOT / ".cache" / "venv-label-studio-ml-2"
SDK_OF_LABEL_STUDIO = "label-studio-sdk==2.1.2"  # what Label Studio 1.23.2 pins


def label_studio_ml_2_wheel() -> Path | None:
    """label-studio-ml 2.x is not on PyPI: its wheel is LABEL_STUDIO_ML_2_WHEEL, or in ../shared/wheels beside
    the clone (where CI puts it)."""
    if os.environ.get("LABEL_STUDIO_ML_2_WHEEL"):
        return Path(os.environ["LABEL_STUDIO_ML_2_WHEEL"])
    found = sorted((ROOT.parent / "shared" / "wheels").glob("label_studio_ml-2.*.whl"))
    return found[-1] if found else None


def wheel_dependencies(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist, with label-studio-sdk (a git URL there) at the version Label Studio pins."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    wanted = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [SDK_OF_LABEL_STUDIO if name.startswith("label-studio-sdk") else name for name in wanted]


@pytest.fixture(scope="module")
def label_studio_ml_2_python() -> Path:
    """The python of a virtual environment made as a user makes one for label-studio-ml 2.x: the wheel's
    dependencies, the wheel itself with --no-deps, then `pip install -r requirements-label-studio-ml.txt`.
    Made once and kept in .cache/ until the wheel or that file changes."""
    import hashlib
    import shutil

    wheel = label_studio_ml_2_wheel()
    if wheel is None or not wheel.is_file():
        pytest.skip(
            "label-studio-ml 2.x is not on PyPI and its wheel is not here: put it in ../shared/wheels beside this "
            "clone or name it in LABEL_STUDIO_ML_2_WHEEL"
        )
    python = LABEL_STUDIO_ML_2_VENV / "bin" / "python"
    stamp = LABEL_STUDIO_ML_2_VENV / ".installed-label-studio-ml-2"
    wanted = hashlib.sha256(
        wheel.read_bytes() + (ROOT / "requirements-label-studio-ml.txt").read_bytes() + sys.version.encode()
    ).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return python

    def run(command: list) -> str:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    shutil.rmtree(LABEL_STUDIO_ML_2_VENV, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(LABEL_STUDIO_ML_2_VENV)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    run([*pip, *wheel_dependencies(wheel)])
    run([*pip, "--no-deps", str(wheel)])
    run([*pip, "-r", "requirements-label-studio-ml.txt"])
    assert "No broken requirements" in run([str(python), "-m", "pip", "check"])
    versions = run([
        str(python), "-c", "import importlib.metadata as m; print(m.version('label-studio-ml'), m.version('label-studio-sdk'))"
    ])
    assert versions.split()[0].startswith("2.") and versions.split()[1] == "2.1.2", versions
    stamp.write_text(wanted)
    return python


# Run in the 2.x environment: label-studio-ml's own app, every request of REQUESTS through it; what it answered,
# how often our parser ran, and whether label-studio-ml's own parse (LabelInterface, parse_config) or its
# per-project store saw a label config.
INIT_APP_CLIENT = """
import json, sys
import label_studio_ml.model as base
from label_studio_ml.api import init_app

import label_config, model

base_parses = []
for name in ("parse_config", "LabelInterface"):
    real = getattr(base, name)
    def counted(*args, _real=real, _name=name, **kwargs):
        base_parses.append(_name)
        return _real(*args, **kwargs)
    setattr(base, name, counted)
our_parses = []
real_parse = label_config.parse_config
label_config.parse_config = lambda text: (our_parses.append(1), real_parse(text))[1]

client = init_app(model_class=model.SegNextBackend).test_client()
answers = []
for path, body in json.load(open(sys.argv[1])):
    response = client.post(path, json=body)
    answers.append({"status": response.status_code, "json": response.get_json(silent=True)})
stored = ("1", "label_config") in base.CACHE or ("1", "parsed_label_config") in base.CACHE
json.dump({"answers": answers, "our_parses": len(our_parses), "base_parses": base_parses, "stored": stored},
          open(sys.argv[2], "w"))
"""


def region_mask(regions: list[dict], width: int, height: int) -> np.ndarray:
    """The pixels of the answered regions, as their consumers read them (brush RLE, polygons, the box)."""
    kind = regions[0]["type"]
    if kind == "brushlabels":
        return decode_region(regions[0], width, height)
    if kind == "polygonlabels":
        return pillow_polygon_mask(regions, width, height)
    value = regions[0]["value"]
    box = np.zeros((height, width), bool)
    left, right = round(value["x"] * width / 100), round((value["x"] + value["width"]) * width / 100)
    top, bottom = round(value["y"] * height / 100), round((value["y"] + value["height"]) * height / 100)
    box[top:bottom, left:right] = True
    return box


def test_label_studio_ml_2_init_app_answers_clicks_and_setup(label_studio_ml_2_python, image_server, tmp_path):
    scene = make_scene(640, 480, seed=35)  # rectangles: the objects' own boxes are compared
    path = image_server.add("/data/upload/1/two.png", encode_png(scene.pixels))
    kinds = {"brush": ("brushlabels", 0.98), "polygon": ("polygonlabels", 0.97), "rectangle": ("rectanglelabels", 0.98)}
    clicks = []
    for kind, index in zip(kinds, (2, 0, 1)):
        for _ in range(2):  # the same config again: parsed once
            body = predict_body(path, [click_on(scene, index)])
            body["label_config"] = ACCEPTED_AT_SETUP[kind]
            clicks.append(("/predict", body))
    too_large = predict_body(path, [click_on(scene, 0)])
    too_large["label_config"] = LABEL_CONFIG.replace("</View>", "<!--" + "x" * 20_000 + "--></View>")
    unknown_label = predict_body(path, [keypoint(50, 50, 640, 480, label="Nope")])
    sent = [
        ("/setup", setup_body(LABEL_CONFIG)),  # before anything is loaded
        *clicks,
        ("/predict", predict_body(path, None)),  # a task opened
        ("/setup", setup_body(LABEL_CONFIG)),
        *[("/setup", setup_body(label_config)) for label_config, _ in REFUSED_AT_SETUP.values()],
        ("/setup", setup_body(too_large["label_config"])),
        ("/predict", too_large),
        ("/predict", unknown_label),
    ]
    requests_file, answers_file = tmp_path / "requests.json", tmp_path / "answers.json"
    requests_file.write_text(json.dumps(sent))
    result = subprocess.run(
        [str(label_studio_ml_2_python), "-c", INIT_APP_CLIENT, str(requests_file), str(answers_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**backend_env(tmp_path, DEMO="true", LABEL_STUDIO_URL=image_server.url, MAX_LABEL_CONFIG_BYTES="10000"),
             "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(answers_file.read_text())
    answers = iter(report["answers"])

    first_setup = next(answers)
    assert first_setup["status"] == 200 and first_setup["json"]["model_version"], first_setup  # never null
    for (kind, (region_type, least_iou)), index in zip(kinds.items(), (2, 0, 1)):
        for _ in range(2):
            answer = next(answers)
            assert answer["status"] == 200, answer
            regions = answer["json"]["results"][0]["result"]
            assert {region["type"] for region in regions} == {region_type}, kind
            wanted = scene.objects[index]
            if kind == "rectangle":
                rows, columns = np.nonzero(wanted)
                wanted = np.zeros_like(wanted)
                wanted[rows.min():rows.max() + 1, columns.min():columns.max() + 1] = True
            assert iou(region_mask(regions, 640, 480), wanted) >= least_iou, kind
    opened = next(answers)
    assert opened["status"] == 200 and opened["json"]["results"] == [[]], opened
    setup = next(answers)
    assert setup["status"] == 200 and setup["json"]["model_version"] == process_runtime.DEMO_VERSION, setup
    # label-studio-ml 2.x answers an exception with 500 unless it is its AnswerException: the backend's refusals
    # keep their 4xx and reason there too ({"status": ..., "detail": ...} is 2.x's answer).
    for name, (_, reason) in REFUSED_AT_SETUP.items():
        refused = next(answers)
        assert refused["status"] == 400 and reason in refused["json"]["detail"], (name, refused)
    for what in ("setup", "predict"):
        refused = next(answers)
        assert refused["status"] == 413 and "MAX_LABEL_CONFIG_BYTES" in refused["json"]["detail"], (what, refused)
    refused = next(answers)
    assert refused["status"] == 400 and "label 'Nope'" in refused["json"]["detail"], refused
    # The configs are parsed by the backend's bounded cache, once each, although 2.x makes an instance per
    # request; 2.x's own unbounded parse never runs and its per-project store never holds a config.
    distinct = {body.get("label_config", body.get("schema")) for _, body in sent}
    parsable = {text for text in distinct if len(text.encode()) <= 10_000}
    assert report["our_parses"] == len(parsable), report["our_parses"]
    assert report["base_parses"] == [] and report["stored"] is False, report


@pytest.mark.parametrize("command", ["_wsgi.py -p", "label-studio-ml start . -p"])
def test_label_studio_ml_2_environment_serves_with_the_project_server(
    label_studio_ml_2_python, image_server, tmp_path, command
):
    # What requirements-label-studio-ml.txt installs beside 2.x is everything the backend imports: it starts,
    # loads, clicks and answers /setup. `label-studio-ml start DIR -p PORT` runs `python DIR/_wsgi.py -p PORT`.
    port = free_port()
    log = tmp_path / "backend.log"
    bin_dir = label_studio_ml_2_python.parent
    env = backend_env(tmp_path, DEMO="true", LABEL_STUDIO_URL=image_server.url)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    args = ["-p", str(port), "--host", "127.0.0.1"]
    if command.startswith("label-studio-ml"):
        argv = [str(bin_dir / "label-studio-ml"), "start", ".", *args]
    else:
        argv = [str(label_studio_ml_2_python), "_wsgi.py", *args]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log)
        scene = make_scene(600, 400, seed=36)
        path = image_server.add("/data/upload/1/served.png", encode_png(scene.pixels))
        for kind, label_config in ACCEPTED_AT_SETUP.items():
            body = predict_body(path, [click_on(scene, 1)])
            body["label_config"] = label_config
            response = requests.post(url + "/predict", json=body, timeout=READY_DEADLINE_SECONDS)
            assert response.status_code == 200, response.text
            regions = response.json()["results"][0]["result"]
            if kind in ("brush", "polygon"):
                assert iou(region_mask(regions, 600, 400), scene.objects[1]) >= 0.97, kind
        setup = requests.post(url + "/setup", json=setup_body(LABEL_CONFIG), timeout=30)
        assert setup.json() == {"model_version": process_runtime.DEMO_VERSION}
        refused = requests.post(url + "/setup", json=setup_body(LABEL_NOT_CARRIED), timeout=30)
        assert refused.status_code == 400 and "label 'Other'" in refused.json()["error"]
    finally:
        stop_group(process)
    assert "Traceback" not in log.read_text(), log.read_text()
