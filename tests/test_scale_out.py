"""Three backend processes sharing a Redis behind nginx round-robin: the scale-out set-up, all parts real.

redis-server and nginx are the distribution's packages (`apt-get install redis-server nginx`; `.ci/run`
installs them), nginx runs the compose set-up's own `deploy/nginx.conf`, and the backends run under gunicorn
with the test models. Each annotator's clicks rotate over the three processes, so every click after the first
is served by a process that did not serve the one before: it must find the object's state in Redis.
"""

from __future__ import annotations

import time

import pytest
import requests
from conftest import backend_env, click_on, decode_region, encode_png, iou, make_scene, predict_body

from tools.file_server import serve_files
from tools.fleet import Fleet, find_binary
from tools.load_test import run

pytestmark = pytest.mark.skipif(
    find_binary("redis-server") is None or find_binary("nginx") is None,
    reason="redis-server or nginx is not installed (apt-get install redis-server nginx)",
)

CLICKS = [(0, True), (1, True), (0, False), (2, True)]  # positive, positive, negative, positive


def expected_mask(scene, clicks):
    mask = None
    for index, positive in clicks:
        obj = scene.objects[index]
        mask = obj if mask is None else (mask | obj if positive else mask & ~obj)
    return mask


class Annotators:
    """`count` annotators, one image each, clicking through nginx; every answer's mask is checked."""

    def __init__(self, count: int, seed: int):
        self.scenes = {f"/data/upload/1/s{seed}-{a}.png": make_scene(800, 600, seed=seed + a) for a in range(count)}
        self.url, self.httpd = serve_files({path: encode_png(s.pixels) for path, s in self.scenes.items()})
        self.points = {path: [] for path in self.scenes}

    def open_tasks(self, backend_url: str) -> None:
        for task_id, path in enumerate(self.scenes):
            response = requests.post(backend_url + "/predict", json=predict_body(path, None, task_id=task_id), timeout=300)
            assert response.status_code == 200, response.text

    def click_all(self, backend_url: str, latencies: list | None = None) -> None:
        """Every annotator's next click; asserts each answer is 200 with the right mask."""
        for task_id, (path, scene) in enumerate(self.scenes.items()):
            points = self.points[path]
            clicks = CLICKS[: len(points) + 1]
            points.append(click_on(scene, *clicks[-1]))
            started = time.monotonic()
            response = requests.post(backend_url + "/predict", json=predict_body(path, points, task_id=task_id), timeout=300)
            if latencies is not None:
                latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            region = response.json()["results"][0]["result"][0]
            assert iou(decode_region(region, scene.width, scene.height), expected_mask(scene, clicks)) >= 0.98

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def fleet(tmp_path):
    fleets = []

    def start(image_url: str) -> Fleet:
        env = backend_env(
            tmp_path,
            DEMO="true", LABEL_STUDIO_URL=image_url, LABEL_STUDIO_API_KEY="test-token", WORKERS="1", THREADS="4",
            REDIS_SOCKET_TIMEOUT="0.5", REDIS_RETRY_SECONDS="2",
        )
        fleets.append(Fleet(tmp_path, env, replicas=3).start())
        return fleets[-1]

    yield start
    for f in fleets:
        f.stop()


def test_load_through_nginx_every_mask_right_each_image_encoded_once():
    result = run(annotators=3, tasks=1, clicks=4, image_size=(800, 600), threads=4, time_limit=240, replicas=3)
    assert result.clicks == 12 and result.errors == 0 and result.wrong_masks == 0
    # Summed over the three processes' /metrics: one encode per image, one decoder run per click, although
    # round-robin sent each annotator's task open and clicks to different processes.
    assert result.encoder_runs == result.images == 3
    assert result.decoder_runs == result.clicks


def test_a_backend_killed_mid_run_loses_nothing_the_others_need(fleet):
    annotators = Annotators(3, seed=300)
    try:
        f = fleet(annotators.url)
        annotators.open_tasks(f.url)
        annotators.click_all(f.url)
        annotators.click_all(f.url)
        victim, survivors = f.backends[0], f.backends[1:]
        before = victim.metrics()
        assert before["encoder_runs"] + before["decoder_runs"] > 0  # it did its share of the work
        victim.kill()
        annotators.click_all(f.url)  # the round-robin turn of the dead process goes to the next one
        annotators.click_all(f.url)
        after = [b.metrics() for b in survivors]
        # Nothing that the dead process computed was computed again: its features and states were in Redis.
        assert before["encoder_runs"] + sum(m["encoder_runs"] for m in after) == 3
        assert before["decoder_runs"] + sum(m["decoder_runs"] for m in after) == 3 * 4
        assert all(m["hits"]["object_states"]["redis"] > 0 for m in after)
    finally:
        annotators.close()


def test_redis_slow_or_stopped_mid_run_clicks_continue(fleet):
    annotators = Annotators(2, seed=400)
    try:
        f = fleet(annotators.url)
        annotators.open_tasks(f.url)
        annotators.click_all(f.url)
        # A hung Redis (SIGSTOP): each click costs at most a socket time-out or two, then Redis is skipped.
        f.redis.pause()
        latencies = []
        try:
            annotators.click_all(f.url, latencies)
        finally:
            f.redis.resume()
        assert max(latencies) < 30, latencies  # not a stalled click (the time-out is 0.5 s)
        # Redis gone for good: the clicks go on from each process's own caches (encoding, replaying).
        f.redis.stop()
        annotators.click_all(f.url)
        annotators.click_all(f.url)
        for backend in f.backends:
            health = requests.get(backend.url + "/health", timeout=30)
            assert health.status_code == 200
            assert health.json()["redis"]["available"] is False and health.json()["warnings"]
    finally:
        annotators.close()
