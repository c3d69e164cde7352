"""Hostile requests that cost memory, time, the cache or credentials: each gets its 4xx naming the setting that
raises the limit (or, where the request is honest, a right mask), nothing is cached from it, and the next
request is served. Every server here listens on 127.0.0.1."""

from __future__ import annotations

import base64
import copy
import gc
import http.server
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
from conftest import ROOT, Scene, backend_env, click_on, decode_region, encode_png, iou, keypoint, make_scene, predict_body

import label_config
from api import basic_credentials_match
from model import SegNextBackend
from segnext_backend import images, segmenter as segmenter_module
from segnext_backend.errors import ImageUnavailableError, RequestError
from segnext_backend.runtime import get_runtime
from segnext_backend.images import ImageFetchConfig, ImageRef, ImageSource
from segnext_backend.settings import Settings, SettingsError
from tools.file_server import start_server


def mirrored(scene: Scene) -> Scene:
    """Another image of the same size: a click on one's object lands on another object in the other."""
    return Scene(pixels=np.ascontiguousarray(scene.pixels[:, ::-1]), objects=[o[:, ::-1] for o in scene.objects])


def region_of(response) -> dict:
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["results"][0]["result"][0]


def assert_right_mask(response, scene, index) -> None:
    mask = decode_region(region_of(response), scene.width, scene.height)
    assert iou(mask, scene.objects[index]) >= 0.95  # another image's mask scores far lower (~0.2)


def honest_click_served(client, image_server, name="honest.png"):
    scene = make_scene(320, 240, seed=5)
    path = image_server.add(f"/data/upload/1/{name}", encode_png(scene.pixels))
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(scene, 1)])), scene, 1)


# -- 1 and 12: the answered frame, and numbers beyond a float ---------------------------------------------------


def test_a_frame_over_the_pixel_limit_is_refused_before_any_mask_is_built(make_client, image_server):
    client, spy = make_client(max_image_pixels=1_000_000)
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/frame.png", encode_png(scene.pixels))
    x, y = scene.inside_point(0)
    body = predict_body(path, [keypoint(100 * x / 400, 100 * y / 300, 2000, 1000)])
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert "2000x1000" in response.json["error"] and "MAX_IMAGE_PIXELS" in response.json["error"]
    assert spy.encodes == 0 and spy.decodes == [] and image_server.requests == []
    honest_click_served(client, image_server)


@pytest.mark.parametrize(
    "field, value",
    [("x", 10**400), ("original_width", 10**400), ("image_rotation", 10**400), ("original_width", 1e308), ("original_height", 2**63)],
)
def test_numbers_beyond_a_float_or_a_frame_are_400(make_client, image_server, field, value):
    client, spy = make_client()
    scene = make_scene(320, 240)
    path = image_server.add("/data/upload/1/numbers.png", encode_png(scene.pixels))
    point = click_on(scene, 0)
    if field == "x":
        point["value"]["x"] = value
    else:
        point[field] = value
    response = client.post("/predict", data=json.dumps(predict_body(path, [point])), content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert field.split("_")[-1] in response.json["error"] or "original_width" in response.json["error"]
    assert spy.decodes == []
    honest_click_served(client, image_server)


# -- 3: the task id in the presign URL, and cloud images cached per task --------------------------------------


def presign_path(task_id, uri: str) -> str:
    return f"/tasks/{task_id}/presign/?fileuri={quote(base64.urlsafe_b64encode(uri.encode()).decode())}"


@pytest.mark.parametrize("task_id", ["1/../../data/upload/1/poison.png?", "../1", -3, 0, 2.5, True, "７"])
def test_a_task_id_that_is_not_a_positive_whole_number_never_reaches_the_presign_url(make_client, image_server, task_id):
    client, spy = make_client()
    scene = make_scene(320, 240)
    body = predict_body("s3://bucket/victim.png", [click_on(scene, 0)], task_id=1)
    body["tasks"][0]["id"] = task_id
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and "task id" in response.json["error"]
    assert image_server.requests == [] and spy.encodes == 0


def test_a_cloud_uri_fetched_through_another_task_is_never_served_to_this_task(make_client, image_server):
    client, _ = make_client()
    uri = "s3://bucket/shared-name.png"
    victim = make_scene(320, 240)
    poison = mirrored(victim)
    # Task 7's project resolves the URI with its own storage (other bytes), task 8's with the real one.
    image_server.add(presign_path(7, uri), encode_png(poison.pixels))
    image_server.add(presign_path(8, uri), encode_png(victim.pixels))
    assert client.post("/predict", json=predict_body(uri, [click_on(poison, 1)], task_id=7)).status_code == 200
    assert_right_mask(client.post("/predict", json=predict_body(uri, [click_on(victim, 1)], task_id=8)), victim, 1)


# -- 4: the disk feature cache costs only itself ----------------------------------------------------------------


def test_a_cache_entry_that_cannot_be_removed_costs_the_cache_not_the_click(make_client, image_server, tmp_path):
    cache = tmp_path / "features"
    (cache / "blocking-folder.npz").mkdir(parents=True)  # in the trim's glob, and unlink() cannot remove it
    (cache / "blocking-folder.npz" / "x").write_bytes(b"x")
    client, _ = make_client(feature_disk_cache_dir=str(cache), feature_disk_cache_bytes=1)
    for seed in (1, 2):
        scene = make_scene(320, 240, seed=seed)
        path = image_server.add(f"/data/upload/1/disk{seed}.png", encode_png(scene.pixels))
        assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(scene, 0)])), scene, 0)
    # The entry that cannot be removed is skipped, the others still are: the folder keeps to its budget.
    assert [p.name for p in cache.glob("*.npz")] == ["blocking-folder.npz"]


def test_a_read_only_cache_folder_costs_the_cache_not_the_click(make_client, image_server, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    client, _ = make_client(feature_disk_cache_dir=str(tmp_path / "features"))
    monkeypatch.setattr(segmenter_module.np, "savez", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    scene = make_scene(320, 240)
    path = image_server.add("/data/upload/1/ro.png", encode_png(scene.pixels))
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(scene, 0)])), scene, 0)


def test_a_cache_folder_that_cannot_be_created_turns_the_cache_off(make_client, image_server, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    client, _ = make_client(feature_disk_cache_dir=str(tmp_path / "a-file" / "features"))
    assert get_runtime().segmenter.feature_disk_cache_dir is None
    honest_click_served(client, image_server)


# -- 6: changed content at the same place -----------------------------------------------------------------------


def test_new_content_at_the_same_path_gets_its_own_mask_once_revalidated(make_client, image_server):
    client, spy = make_client(image_revalidate_seconds=0.5)
    new = make_scene(320, 240)
    old = mirrored(new)
    path = image_server.add("/data/upload/1/changing.png", encode_png(old.pixels))
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(old, 1)])), old, 1)
    image_server.add(path, encode_png(new.pixels))
    time.sleep(0.6)
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(new, 1)])), new, 1)
    assert spy.encodes == 2
    # Unchanged content is checked again but not encoded again.
    time.sleep(0.6)
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(new, 2)])), new, 2)
    assert spy.encodes == 2 and len(image_server.requests_for(path)) == 3


def test_features_on_disk_are_the_content_s_not_the_place_s(make_client, image_server, tmp_path):
    cache = str(tmp_path / "features")
    new = make_scene(320, 240)
    old = mirrored(new)
    path = image_server.add("/data/upload/1/restart.png", encode_png(old.pixels))
    client, _ = make_client(feature_disk_cache_dir=cache)
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(old, 1)])), old, 1)
    image_server.add(path, encode_png(new.pixels))
    client, spy = make_client(feature_disk_cache_dir=cache)  # a restart: the features of the old image are on disk
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(new, 1)])), new, 1)
    assert spy.encodes == 1
    image_server.add(path, encode_png(old.pixels))
    client, spy = make_client(feature_disk_cache_dir=cache)  # the old content back: its features are reused
    assert_right_mask(client.post("/predict", json=predict_body(path, [click_on(old, 2)])), old, 2)
    assert spy.encodes == 0


def test_revalidation_asks_with_the_validators_and_a_304_costs_no_download():
    state = {"body": b"first", "etag": '"v1"', "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["requests"].append(self.headers.get("If-None-Match"))
            if self.headers.get("If-None-Match") == state["etag"]:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", state["etag"])
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

    url, httpd = start_server(Handler)
    try:
        source = ImageSource(ImageFetchConfig(allow_private_hosts=True, revalidate_seconds=0))
        ref = ImageRef("url", url + "/img.png")
        first = source.current(ref)
        assert source.current(ref) == first and state["requests"] == [None, '"v1"']
        state.update(body=b"second", etag='"v2"')
        second = source.current(ref)
        assert second != first and source.bytes_of(second) == b"second"
        assert state["requests"] == [None, '"v1"', '"v1"']
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_local_file_is_checked_by_stat_and_reread_when_it_changed(tmp_path):
    (tmp_path / "a.png").write_bytes(b"first")
    source = ImageSource(ImageFetchConfig(local_files_document_root=str(tmp_path), revalidate_seconds=0))
    ref = ImageRef("local", str(tmp_path / "a.png"))
    first = source.current(ref)
    assert source.current(ref) == first
    (tmp_path / "a.png").write_bytes(b"second, longer")
    assert source.bytes_of(source.current(ref)) == b"second, longer"


# -- 7: pre-encoding from requests without clicks ---------------------------------------------------------------


def test_a_request_with_more_tasks_than_allowed_is_refused_and_queues_nothing(make_client, image_server):
    client, spy = make_client(max_tasks_per_request=100)
    body = predict_body("/data/upload/1/t.png", None)
    body["tasks"] = [copy.deepcopy(body["tasks"][0]) | {"id": i + 1} for i in range(10_000)]
    response = client.post("/predict", json=body)
    assert response.status_code == 413 and "MAX_TASKS_PER_REQUEST" in response.json["error"]
    assert get_runtime().pre_encoder.waiting() == 0
    time.sleep(0.3)
    assert image_server.requests == [] and spy.encodes == 0
    honest_click_served(client, image_server)


def test_pre_encoding_waits_in_a_bounded_queue_and_keeps_the_latest_tasks(make_client, image_server):
    client, spy = make_client(preencode_queue_length=2)
    image_server.delay_seconds = 0.3
    body = predict_body("/data/upload/1/t0.png", None)
    tasks = []
    for i in range(10):
        scene = make_scene(64, 48, seed=i)
        path = image_server.add(f"/data/upload/1/t{i}.png", encode_png(scene.pixels))
        tasks.append({**copy.deepcopy(body["tasks"][0]), "id": i + 1, "data": {"image": path}})
    body["tasks"] = tasks
    assert client.post("/predict", json=body).status_code == 200
    assert get_runtime().pre_encoder.wait_idle(60)
    fetched = {r["path"] for r in image_server.requests}
    assert len(fetched) <= 3 and "/data/upload/1/t9.png" in fetched  # at most one running and two waiting
    assert spy.encodes == len(fetched)


def test_stopping_pre_encoding_drops_the_queue_and_cuts_the_download_short(make_client, image_server):
    client, _ = make_client()
    image_server.delay_seconds = 20  # a host that takes its time
    body = predict_body("/data/upload/1/slow0.png", None)
    body["tasks"] = [{**copy.deepcopy(body["tasks"][0]), "id": i + 1, "data": {"image": f"/data/upload/1/slow{i}.png"}} for i in range(5)]
    client.post("/predict", json=body)
    deadline = time.monotonic() + 30
    while not image_server.requests:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pre_encoder = get_runtime().pre_encoder
    started = time.monotonic()
    pre_encoder.stop()
    pre_encoder.join(10)
    assert time.monotonic() - started < 5 and len(image_server.requests) == 1


# -- 8: the label config ------------------------------------------------------------------------------------------


def test_a_label_config_over_its_limit_is_refused_and_a_config_is_parsed_once(make_client, image_server, monkeypatch):
    client, _ = make_client(max_label_config_bytes=10_000)
    scene = make_scene(320, 240)
    path = image_server.add("/data/upload/1/config.png", encode_png(scene.pixels))
    huge = predict_body(path, [click_on(scene, 0)])
    huge["label_config"] = huge["label_config"].replace("</View>", "<!--" + "x" * 20_000 + "--></View>")
    response = client.post("/predict", json=huge)
    assert response.status_code == 413 and "MAX_LABEL_CONFIG_BYTES" in response.json["error"]
    assert image_server.requests == []

    parses = []
    original = label_config.parse_config
    monkeypatch.setattr(label_config, "parse_config", lambda config: parses.append(1) or original(config))
    body = predict_body(path, [click_on(scene, 0)])
    body["label_config"] += "<!-- a config no other test sends -->"
    for _ in range(3):
        assert client.post("/predict", json=body).status_code == 200
    assert len(parses) == 1


# -- 9, 10: basic auth ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [{"BASIC_AUTH_USER": "annotator"}, {"BASIC_AUTH_PASS": "s3cret"}])
def test_half_a_basic_auth_configuration_is_refused(given):
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER.*BASIC_AUTH_PASS|BASIC_AUTH_PASS.*BASIC_AUTH_USER"):
        Settings.from_env(given)


@pytest.mark.parametrize("env, flags", [({"BASIC_AUTH_PASS": "s3cret"}, []), ({}, ["--basic-auth-user", "annotator"])])
def test_half_a_basic_auth_configuration_stops_the_process_with_a_message(tmp_path, env, flags):
    result = subprocess.run(
        [sys.executable, "_wsgi.py", "--port", "1", *flags],
        cwd=ROOT,
        env=backend_env(tmp_path, DEMO="true", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "BASIC_AUTH_USER" in result.stderr


def test_a_non_ascii_password_matches_as_utf8_and_as_latin1():
    user, password = "anna", "Grüße"
    from_requests = requests.auth._basic_auth_str(user, password)  # what python-requests sends: Latin-1
    from_curl = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()  # curl, browsers: UTF-8
    assert from_requests != from_curl
    assert basic_credentials_match(from_requests, user, password)
    assert basic_credentials_match(from_curl, user, password)
    assert not basic_credentials_match(from_curl, user, "Grüsse")
    assert not basic_credentials_match("Basic !!!", user, password)


def test_a_non_ascii_password_works_from_requests_curl_and_the_health_check(started_backend, tmp_path):
    user, password = "anna", "Grüße-ключ"
    url = started_backend(DEMO="true", BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password)
    assert requests.get(url + "/health", timeout=10).status_code == 401
    assert requests.get(url + "/health", auth=(user.encode(), password.encode()), timeout=10).status_code == 200
    assert requests.get(url + "/health", auth=(user, "Grüße"), timeout=10).status_code == 401
    if shutil.which("curl"):
        curl = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"{user}:{password}", url + "/health"],
                              capture_output=True, text=True, timeout=60)
        assert curl.stdout == "200"
    port = url.rsplit(":", 1)[1]
    check = subprocess.run(
        [sys.executable, "_wsgi.py", "--health-check"],
        cwd=ROOT,
        env=backend_env(tmp_path, PORT=port, BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# -- 11: credentials in LABEL_STUDIO_URL ------------------------------------------------------------------------------


def test_credentials_in_the_label_studio_url_never_appear_in_answers_or_logs(make_client, image_server, caplog):
    secret = "pa55-in-the-url"
    url_with_credentials = image_server.url.replace("http://", f"http://someone:{secret}@")
    scene = make_scene(320, 240)
    answers = []
    with caplog.at_level(logging.DEBUG):
        for key in ("legacy-token", "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.sig"):  # a refresh that fails, too
            client, _ = make_client(label_studio_url=url_with_credentials, label_studio_api_key=key)
            image_server.files["/data/upload/1/gone.png"] = 500
            for path in ("/data/upload/1/missing.png", "/data/upload/1/gone.png"):
                answers.append(client.post("/predict", json=predict_body(path, [click_on(scene, 0)])))
            client.post("/predict", json=predict_body("/data/upload/1/opened.png", None))
            get_runtime().pre_encoder.wait_idle(30)
        logging.getLogger("test").info("%s", Settings(label_studio_url=url_with_credentials).redacted())
    assert all(400 <= a.status_code < 500 for a in answers)
    assert all(secret not in a.get_data(as_text=True) for a in answers)
    assert any("127.0.0.1" in a.json["error"] for a in answers)
    assert secret not in caplog.text


# -- 2: the total download deadline --------------------------------------------------------------------------------


def trickling_server(where: str):
    """A host that sends one byte every 0.1 s, in the headers or in the body, for up to 30 s."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            try:
                if where == "headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(300):
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "300")
                self.end_headers()
                for _ in range(300):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

    return start_server(Handler)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_host_is_cut_off_at_the_download_deadline(where):
    url, httpd = trickling_server(where)
    try:
        source = ImageSource(ImageFetchConfig(allow_private_hosts=True, read_timeout=5, download_timeout=1.0))
        started = time.monotonic()
        with pytest.raises(ImageUnavailableError, match="IMAGE_DOWNLOAD_TIMEOUT"):
            source.fetch(ImageRef("url", url + "/trickle.png"))
        assert time.monotonic() - started < 4
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- 5: the personal access token is never re-posted elsewhere ------------------------------------------------------


def test_the_token_refresh_never_follows_a_redirect():
    posted_elsewhere = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            posted_elsewhere.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    other_url, other = start_server(Elsewhere)

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.send_response(307)
            self.send_header("Location", other_url + "/steal/")
            self.send_header("Content-Length", "0")
            self.end_headers()

    ls_url, ls = start_server(Redirecting)
    try:
        token = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.signature"
        source = ImageSource(ImageFetchConfig(label_studio_url=ls_url, label_studio_api_key=token))
        with pytest.raises(ImageUnavailableError, match="redirect"):
            source.fetch(source.locate("/data/upload/1/a.png"))
        assert posted_elsewhere == []
    finally:
        for server in (ls, other):
            server.shutdown()
            server.server_close()


# -- 13: large decodes together ---------------------------------------------------------------------------------------


def test_large_decodes_wait_for_the_pixel_budget_and_give_it_back(monkeypatch):
    scenes = [make_scene(600, 400, seed=i) for i in range(3)]
    files = {f"/{i}.png": encode_png(s.pixels) for i, s in enumerate(scenes)}
    from tools.file_server import serve_files

    url, httpd = serve_files(files)
    inside, peak = [0], [0]
    lock = threading.Lock()
    original = images.to_rgb

    def counting_to_rgb(image):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.2)
        try:
            return original(image)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(images, "to_rgb", counting_to_rgb)
    try:
        for budget, expected_peak in ((600 * 400, 1), (3 * 600 * 400, 3)):
            source = ImageSource(ImageFetchConfig(allow_private_hosts=True, decode_pixel_budget=budget))
            peak[0] = 0
            right = []

            def load(i):
                rgb = source.load(ImageRef("url", f"{url}/{i}.png"))
                right.append(np.array_equal(rgb, scenes[i].pixels))
                del rgb  # the budget comes back when the pixels are freed

            threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            gc.collect()
            assert right == [True] * 3 and peak[0] == expected_peak and source.decode_budget.in_use == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_concurrent_clicks_on_large_images_under_a_small_budget_get_right_masks(make_client, image_server):
    client, _ = make_client(decode_pixel_budget=500 * 400)
    scenes = [make_scene(500, 400, seed=i) for i in range(3)]
    paths = [image_server.add(f"/data/upload/1/big{i}.png", encode_png(s.pixels)) for i, s in enumerate(scenes)]
    answers = {}

    def click(i):
        answers[i] = client.post("/predict", json=predict_body(paths[i], [click_on(scenes[i], 1)], task_id=i + 1))

    threads = [threading.Thread(target=click, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, scene in enumerate(scenes):
        assert_right_mask(answers[i], scene, 1)


# -- 14: one request's work -------------------------------------------------------------------------------------------


def test_a_replay_over_the_decoder_run_limit_is_refused_before_any_run(make_client, image_server):
    client, spy = make_client(max_decoder_runs_per_request=5)
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/replay.png", encode_png(scene.pixels))
    clicks = [click_on(scene, i % 3, positive=i % 3 != 2) for i in range(8)]
    response = client.post("/predict", json=predict_body(path, clicks))
    assert response.status_code == 400 and "MAX_DECODER_RUNS_PER_REQUEST" in response.json["error"]
    assert spy.encodes == 0 and spy.decodes == []  # refused before the encoder and the decoder
    # Click by click, the same object is served: each request costs one run.
    for n in range(1, 9):
        assert client.post("/predict", json=predict_body(path, clicks[:n])).status_code == 200
    assert len(spy.decodes) == 8


def test_a_replay_keeps_only_its_last_states(make_client, image_server):
    client, spy = make_client(max_decoder_runs_per_request=20)
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/long.png", encode_png(scene.pixels))
    clicks = [click_on(scene, 1)] + [click_on(scene, 0, positive=False)] * 11
    assert client.post("/predict", json=predict_body(path, clicks)).status_code == 200
    states = get_runtime().segmenter.object_states.stats()
    assert len(spy.decodes) == 12 and states.entries == segmenter_module.REPLAY_STATES_KEPT
    # The next click and an undo-and-click both find their prefix: one run each.
    assert client.post("/predict", json=predict_body(path, clicks + [click_on(scene, 1)])).status_code == 200
    assert client.post("/predict", json=predict_body(path, clicks[:-1] + [click_on(scene, 1)])).status_code == 200
    assert len(spy.decodes) == 14


def test_sigterm_under_gunicorn_stops_pre_encoding_at_once(tmp_path, image_server):
    """While gunicorn lets a click in progress finish, no more images of opened tasks are fetched."""
    from conftest import wait_until_healthy

    from tools.file_server import free_port

    class SlowImage(http.server.BaseHTTPRequestHandler):  # the in-progress click's image: 5 s to answer
        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(5)
            body = encode_png(make_scene(320, 240).pixels)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    slow_url, slow = start_server(SlowImage)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=backend_env(tmp_path, DEMO="true", PORT=str(port), LABEL_STUDIO_URL=image_server.url, ALLOW_PRIVATE_IMAGE_HOSTS="true"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log)
        image_server.delay_seconds = 1  # each opened task's image takes a second: 10 would take 10 s and more
        body = predict_body("/data/upload/1/q0.png", None)
        body["tasks"] = [{**body["tasks"][0], "id": i + 1, "data": {"image": f"/data/upload/1/q{i}.png"}} for i in range(10)]
        assert requests.post(url + "/predict", json=body, timeout=30).status_code == 200
        deadline = time.monotonic() + 60
        while not image_server.requests:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        click = threading.Thread(
            target=lambda: requests.post(url + "/predict", json=predict_body(slow_url + "/x.png", [click_on(make_scene(320, 240), 0)]), timeout=60)
        )
        click.start()
        time.sleep(0.5)  # the click is in progress (its image takes 5 s), and so is the first opened task's fetch
        fetched_before = len(image_server.requests)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        click.join(60)
        # While the click finishes (~4.5 s more), pre-encoding would go on fetching a task image a second. One
        # fetch may have started between counting and the worker handling the signal; none after that.
        assert len(image_server.requests) <= fetched_before + 1, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        slow.shutdown()
        slow.server_close()


# -- answers of bounded size ----------------------------------------------------------------------------------------


def striped_scene_path(image_server) -> tuple[str, dict]:
    """A 1024 x 1024 image of stripes two pixels wide in two colours, and a click on a red one: the test decoder
    answers every red stripe, a mask of 512 parts and half a million runs."""
    pixels = np.zeros((1024, 1024, 3), np.uint8)
    red = (np.arange(1024) // 2) % 2 == 0
    pixels[:, red] = (200, 30, 30)
    pixels[:, ~red] = (30, 30, 200)
    path = image_server.add("/data/upload/1/stripes.png", encode_png(pixels))
    return path, keypoint(100 * 0.5 / 1024, 50.0, 1024, 1024)


@pytest.mark.parametrize(
    "control, setting, limit", [("BrushLabels", "MAX_BRUSH_RLE_BYTES", 100_000), ("PolygonLabels", "MAX_POLYGON_VERTICES", 5)]
)
def test_an_answer_over_its_size_limit_is_422_and_nothing_is_kept_from_it(make_client, image_server, control, setting, limit):
    client, spy = make_client(**{setting.lower(): limit})
    path, click = striped_scene_path(image_server)
    body = predict_body(path, [click])
    body["label_config"] = body["label_config"].replace("BrushLabels", control)
    response = client.post("/predict", json=body)
    assert response.status_code == 422 and setting in response.json["error"], response.json
    segmenter = get_runtime().segmenter
    assert len(spy.decodes) == 1 and segmenter.object_states.stats().entries == 0  # the click's state dropped
    assert segmenter.mask_budget.in_use == 0  # the mask's pixels given back at once
    # ... not when the refusal is garbage: here its traceback still holds the click's frames (and the mask).
    backend = SegNextBackend(label_config=body["label_config"])
    with pytest.raises(RequestError, match=setting) as refused:
        backend.predict(body["tasks"], context=body["params"]["context"])
    assert segmenter.mask_budget.in_use == 0 and refused.value.__traceback__ is not None
    honest_click_served(client, image_server)
    assert segmenter.mask_budget.in_use == 0
