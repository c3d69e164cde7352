"""Text a request chooses (image references, task ids, names, user names): bounded in memory, and escaped in
the log so that it can never start a line of its own. Every server here listens on 127.0.0.1."""

from __future__ import annotations

import base64
import gc
import logging
import time
import tracemalloc
import urllib.parse

import requests
from conftest import backend_log, click_on, encode_png, make_scene, predict_body

from segnext_backend.images import ImageFetchConfig, ImageRef, ImageSource
from segnext_backend.logs import EscapingFilter, escape_controls
from tools.file_server import BytesHandler, start_server

# -- long image references --------------------------------------------------------------------------------


def test_an_image_reference_over_its_length_limit_is_refused_before_any_fetch(make_client, image_server):
    scene = make_scene(320, 240, seed=3)
    path = image_server.add("/data/upload/1/long.png", encode_png(scene.pixels))
    client, spy = make_client(max_image_url_length=4096)
    long_reference = path + "?" + "x" * 5000  # the image server answers it: only the limit refuses it
    image_server.files[long_reference] = image_server.files[path]
    response = client.post("/predict", json=predict_body(long_reference, [click_on(scene, 0)]))
    assert response.status_code == 413, response.get_data(as_text=True)
    error = response.json["error"]
    assert f"{len(long_reference)} characters" in error and "MAX_IMAGE_URL_LENGTH" in error
    assert image_server.requests == [] and spy.encodes == 0
    served = client.post("/predict", json=predict_body(path, [click_on(scene, 0)]))
    assert served.status_code == 200 and served.json["results"][0]["result"]


def test_the_places_remembered_are_bounded_in_bytes_most_recent_kept():
    # Each place (URL) is remembered with what was found there; 40 places of 50 KB each would hold 2 MB.
    png = encode_png(make_scene(64, 48, seed=1).pixels)
    fetched = []

    class Handler(BytesHandler):
        def do_GET(self):
            fetched.append(len(self.path))  # not the path itself: this process's memory is measured
            self.answer(png)

    base, server = start_server(Handler)
    budget = 300_000
    source = ImageSource(ImageFetchConfig(allow_private_hosts=True, places_memory_bytes=budget))

    def place(i: int) -> ImageRef:  # made when asked for: its reference is held by the source alone
        return ImageRef("url", f"{base}/x.png?{i}{'q' * 50_000}")

    try:
        source.current(place(0))  # the download cache and the connection machinery, before measuring
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1, 40):
                source.current(place(i))
            # Python's urlsplit keeps the last 128 URLs it split, whatever their length: its share is bounded
            # by MAX_IMAGE_URL_LENGTH (see the test above), not by this budget.
            urllib.parse.urlsplit.cache_clear()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert 0.5 * budget < held < 1.5 * budget, held  # without the bound: 2 MB
        fetches = len(fetched)
        source.current(place(39))  # remembered: not fetched again
        assert len(fetched) == fetches
        source.current(place(0))  # forgotten: fetched again
        assert len(fetched) == fetches + 1
    finally:
        server.shutdown()
        server.server_close()


# -- forged log lines -------------------------------------------------------------------------------------

FORGED = "[ERROR] forged"


def test_control_characters_are_escaped_and_other_text_kept():
    assert escape_controls("a\nb\r\tc\x1b[31m\x7f\x85\u2028d") == "a\\nb\\r\\tc\\x1b[31m\\x7f\\x85\\u2028d"
    assert escape_controls("Grüße, 猫 \\n") == "Grüße, 猫 \\n"


def test_a_traceback_keeps_its_frames_and_escapes_each_exception_s_text(caplog):
    caplog.handler.addFilter(EscapingFilter())
    try:
        try:
            raise KeyError("first\n" + FORGED)
        except KeyError as error:
            raise ValueError("second\r\n" + FORGED) from error
    except ValueError:
        logging.getLogger("segnext_backend.test").exception("POST %s failed", "/predict\n" + FORGED)
    text = caplog.text
    assert not [line for line in text.splitlines() if line.startswith(FORGED)], text
    assert "/predict\\n[ERROR] forged failed" in text
    assert "ValueError: second\\r\\n[ERROR] forged" in text and "The above exception was the direct cause" in text
    assert text.count("Traceback (most recent call last):") == 2 and 'raise ValueError("second' in text


def test_request_text_never_starts_a_log_line_under_gunicorn(started_backend, image_server, tmp_path):
    scene = make_scene(320, 240, seed=4)
    path = image_server.add("/data/upload/1/forged.png", encode_png(scene.pixels))
    url = started_backend(gunicorn=True, DEMO="true", LABEL_STUDIO_URL=image_server.url, WORKERS="1", THREADS="2")

    by_task_id = predict_body(path, [click_on(scene, 0)], task_id="7\n" + FORGED + " by a task id")
    assert requests.post(url + "/predict", json=by_task_id, timeout=120).status_code == 200  # logs "task 7..."
    by_name = predict_body(path, [click_on(scene, 0)])
    by_name["params"]["context"]["result"][0]["to_name"] = "image\n" + FORGED + " by a name"
    assert requests.post(url + "/predict", json=by_name, timeout=120).status_code == 400  # logs its message
    user = base64.b64encode(("someone\n" + FORGED + " by a user name:pw").encode()).decode()
    assert requests.get(url + "/health", headers={"Authorization": "Basic " + user}, timeout=60).status_code == 200

    log = backend_log(tmp_path, url)
    escaped = ["\\n" + FORGED + " by a task id", "\\n" + FORGED + " by a name", "\\n" + FORGED + " by a user name"]
    deadline = time.monotonic() + 60  # gunicorn writes the access log line after the answer
    while not all(e in log.read_text() for e in escaped) and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert all(e in text for e in escaped), text
    records = ("[20", "127.0.0.1")  # the backend's lines, and gunicorn's access log
    assert not [line for line in text.splitlines() if FORGED in line and not line.startswith(records)], text
