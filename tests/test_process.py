"""The real process: `python _wsgi.py` started as users start it, talked to over a socket."""

from __future__ import annotations

import hashlib
import io
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import requests
from conftest import (
    READY_DEADLINE_SECONDS,
    ROOT,
    assert_click_finds_object,
    backend_env,
    click_on,
    decode_region,
    encode_png,
    free_port,
    iou,
    make_scene,
    predict_body,
    wait_until_healthy,
)

from tools.file_server import BytesHandler, start_server


def run_wsgi(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "_wsgi.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_started_backend_answers_a_click_without_setup(started_backend, image_server):
    url = started_backend(DEMO="true", LABEL_STUDIO_URL=image_server.url, LABEL_STUDIO_API_KEY="k")
    health = requests.get(url + "/health", timeout=5).json()
    assert health["status"] == "UP" and health["demo"] is True
    # After a restart Label Studio's first request is /predict: no /setup before it.
    assert_click_finds_object(url, image_server, make_scene(900, 700, seed=21), 1, "process", timeout=30)
    bad = requests.post(url + "/predict", data=b"[", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]


def test_gunicorn_serves_clicks_from_several_workers(started_backend, image_server):
    url = started_backend(gunicorn=True, DEMO="true", WORKERS="2", THREADS="2", LABEL_STUDIO_URL=image_server.url)
    scene = make_scene(640, 480, seed=22)
    path = image_server.add("/data/upload/1/gunicorn.png", encode_png(scene.pixels))
    for index in (0, 1, 2, 0):
        response = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, index)]), timeout=30)
        assert response.status_code == 200, response.text
        region = response.json()["results"][0]["result"][0]
        assert iou(decode_region(region, 640, 480), scene.objects[index]) >= 0.98


def test_gunicorn_without_model_files_exits_with_the_message(tmp_path):
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    result = subprocess.run(
        [gunicorn, "-c", "gunicorn.conf.py"], cwd=ROOT, env=backend_env(tmp_path, MODEL_URL="", PORT=str(free_port())),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "place encoder.onnx and decoder.onnx in" in result.stderr


def test_gunicorn_waits_and_retries_a_failing_first_download_instead_of_exiting(tmp_path, test_model_paths):
    # Exiting would let Docker's restart policy start the ~440 MB download again at once, in a loop.
    attempts = []
    published = {"body": 503}

    class Release(BytesHandler):
        def do_GET(self):
            attempts.append(time.monotonic())
            self.answer(published["body"])

    server_url, httpd = start_server(Release)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = backend_env(
        tmp_path, MODEL_URL=server_url + "/model.dtmodel", MODEL_SHA256="", PORT=str(port),
        MODEL_DOWNLOAD_RETRY_SECONDS="1", MODEL_DOWNLOAD_RETRY_MAX_SECONDS="2",
    )
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while len(attempts) < 4:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9 and gaps[2] >= 1.9, gaps  # 1 s, then doubled, at most 2 s
        text = log.read_text()
        assert "model download failed (attempt 3)" in text and "503" in text and "Next attempt in 2 s" in text
        # The release appears: the waiting server downloads it and starts, without a restart.
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in test_model_paths:
                archive.writestr(f"mask-object-segnext-b2hq/{path.name}", path.read_bytes())
        published["body"] = buffer.getvalue()
        wait_until_healthy(f"http://127.0.0.1:{port}", process, log)
        assert (tmp_path / "models" / "decoder.onnx").read_bytes() == test_model_paths[1].read_bytes()
    finally:
        process.terminate()
        process.wait(30)
        httpd.shutdown()
        httpd.server_close()


def test_sigterm_stops_gunicorn_while_it_waits_to_retry_a_download(tmp_path):
    # In a container gunicorn is PID 1: without a handler of its own SIGTERM (`docker stop`) would be dropped
    # and Docker would kill it after its timeout. Outside one the default action kills it (exit -15): exit 0
    # shows that the handler ran.
    log = tmp_path / "gunicorn.log"
    env = backend_env(tmp_path, MODEL_URL=f"http://127.0.0.1:{free_port()}/model.dtmodel", PORT=str(free_port()))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while "model download failed (attempt 1)" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_gunicorn_master_never_imports_onnx_runtime():
    # A worker forked from a process that has imported onnxruntime aborts when it exits (std::system_error
    # "No such process", then SIGABRT): the master reads gunicorn.conf.py, so it must stay free of it.
    probe = "import runpy, sys; runpy.run_path('gunicorn.conf.py'); print('onnxruntime' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_gunicorn_workers_exit_cleanly_on_sigterm(tmp_path, image_server):
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=backend_env(tmp_path, DEMO="true", WORKERS="2", PORT=str(port), LABEL_STUDIO_URL=image_server.url),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        scene = make_scene(300, 200, seed=5)
        path = image_server.add("/data/upload/1/stop.png", encode_png(scene.pixels))
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        while True:  # until a worker answers a click (its ONNX Runtime threads have run), whatever fails before
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                body = predict_body(path, [click_on(scene, 0)])
                if requests.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=60).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert process.wait(40) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "Worker exiting" in text
    assert "SIGABRT" not in text and "terminate called" not in text, text


def test_basic_auth_protects_every_route(started_backend):
    url = started_backend(DEMO="true", BASIC_AUTH_USER="annotator", BASIC_AUTH_PASS="s3cret")
    assert requests.get(url + "/health", timeout=5).status_code == 401
    assert requests.post(url + "/predict", json={}, timeout=5).status_code == 401
    assert requests.get(url + "/health", auth=("annotator", "wrong"), timeout=5).status_code == 401
    assert requests.get(url + "/health", auth=("annotator", "s3cret"), timeout=5).status_code == 200


def test_broken_model_file_stops_the_process_with_a_message(tmp_path, test_model_paths):
    models = tmp_path / "models"
    models.mkdir()
    encoder, decoder = test_model_paths
    (models / "encoder.onnx").write_bytes(encoder.read_bytes())
    (models / "decoder.onnx").write_bytes(decoder.read_bytes()[:100])
    result = run_wsgi(backend_env(tmp_path, MODEL_URL=""), "--check")
    assert result.returncode == 1
    assert "decoder.onnx could not be loaded" in result.stderr


def test_missing_models_are_downloaded_checked_and_unpacked(tmp_path, test_model_paths, image_server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in test_model_paths:
            archive.writestr(f"mask-object-segnext-b2hq/{path.name}", path.read_bytes())
        archive.writestr("mask-object-segnext-b2hq/config.json", "{}")
    image_server.add("/release/mask-object-segnext-b2hq.dtmodel", buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    model_url = image_server.url + "/release/mask-object-segnext-b2hq.dtmodel"

    wrong = run_wsgi(backend_env(tmp_path, MODEL_URL=model_url, MODEL_SHA256="0" * 64), "--check")
    assert wrong.returncode == 1 and digest in wrong.stderr
    assert not (tmp_path / "models" / "encoder.onnx").exists()

    result = run_wsgi(backend_env(tmp_path, MODEL_URL=model_url, MODEL_SHA256=digest), "--check")
    assert result.returncode == 0, result.stderr
    for path in test_model_paths:
        assert (tmp_path / "models" / path.name).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["decoder.onnx", "encoder.onnx"]


def test_offline_start_says_where_to_put_the_files(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/mask-object-segnext-b2hq.dtmodel"
    result = run_wsgi(backend_env(tmp_path, MODEL_URL=url), "--check")
    assert result.returncode == 1
    assert "place encoder.onnx and decoder.onnx in" in result.stderr and str(tmp_path / "models") in result.stderr


def test_a_bad_setting_is_named(tmp_path):
    result = run_wsgi(backend_env(tmp_path, DEMO="true", MASK_THRESHOLD="half"), "--check")
    assert result.returncode == 2 and "MASK_THRESHOLD" in result.stderr
