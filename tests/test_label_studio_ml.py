"""SegNextBackend under label-studio-ml's own servers: `init_app(model_class=SegNextBackend)`, `label-studio-ml
start`, `gunicorn --preload _wsgi:app`; the lazy, once-per-process model load they rely on; the command-line
flags and variable names of label-studio-ml. (label-studio-ml 2.x is not on PyPI: its server is tested through
1.0.9's, the one installed, and its `setup()` / `get` / `set` contract directly.)"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    make_scene,
    predict_body,
    wait_until_healthy,
)

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


def test_label_studio_ml_init_app_serves_a_click_without_any_other_call(lazy_env, image_server, tmp_path):
    from label_studio_ml.api import init_app

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


def test_setup_keeps_the_model_version_where_label_studio_ml_2_reads_it(lazy_env):
    # label-studio-ml 2.x's LabelStudioMLBase calls setup() from its constructor, stores values per project with
    # get()/set(), and answers /setup with self.get("model_version"). 1.0.9's base has neither, so both are
    # given to the instance here as 2.x gives them.
    store = {}
    backend = model.SegNextBackend(label_config=LABEL_CONFIG)
    backend.get, backend.set = store.get, store.__setitem__
    backend.setup()
    assert store["model_version"] in (process_runtime.SEGNEXT_VERSION, process_runtime.DEMO_VERSION)  # never null
    process_runtime.start_loading().result(READY_DEADLINE_SECONDS)  # setup() started the load
    backend.setup()
    assert store["model_version"] == process_runtime.DEMO_VERSION


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
