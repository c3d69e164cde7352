"""The Redis tier (segnext_backend/shared_store.py) against a real redis-server on a loopback port.

Two `InteractiveSegmenter`s with their own memory caches and engines stand for two backend processes: what one
computes, the other must read instead of computing, and give the same mask bit for bit. Faults are real too:
the server is killed, paused (SIGSTOP: connections accepted, never answered) and started again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, EngineSpy, iou, make_scene

from segnext_backend.engine import SegNextEngine
from segnext_backend.geometry import ModelFrame
from segnext_backend.masks import sigmoid
from segnext_backend.segmenter import Click, InteractiveSegmenter
from segnext_backend.shared_store import SharedStore, stable_digest
from tools.fleet import RedisServer, find_binary

pytestmark = pytest.mark.skipif(
    find_binary("redis-server") is None, reason="redis-server is not installed (apt-get install redis-server)"
)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def store_for(url: str, **options) -> SharedStore:
    return SharedStore(url, namespace="test", **{"socket_timeout": 0.5, "retry_seconds": 1.0, **options})


class Process:
    """One backend process's segmenter: its own engine counters and caches, the shared Redis."""

    def __init__(self, model_paths, scenes: dict, store: SharedStore, load_delay: float = 0.0):
        self.spy = EngineSpy(SegNextEngine(*model_paths, intra_op_threads=1))
        self.loads = []

        def load_image(key):
            self.loads.append(key)
            time.sleep(load_delay)
            return scenes[key].pixels

        self.segmenter = InteractiveSegmenter(self.spy, load_image, shared_store=store)
        self.store = store

    def predict(self, key, clicks, scene):
        return self.segmenter.predict(key, clicks, scene.width, scene.height)


def clicks_on(scene, *specs) -> list[Click]:
    return [Click(*scene.inside_point(index), positive=positive) for index, positive in specs]


def test_a_click_served_from_redis_state_gives_the_same_mask_bit_for_bit(test_model_paths, redis_server):
    scene = make_scene(900, 700, seed=11)
    scenes = {"img": scene}
    a = Process(test_model_paths, scenes, store_for(redis_server.url))
    b = Process(test_model_paths, scenes, store_for(redis_server.url))
    clicks = clicks_on(scene, (0, True), (1, True), (0, False), (2, True))

    from_a = [a.predict("img", clicks[:k], scene) for k in range(1, 4)]
    assert a.spy.encodes == 1 and len(a.spy.decodes) == 3
    # Process B has neither the features nor any state in memory: it reads both, runs nothing.
    again = b.predict("img", clicks[:3], scene)
    assert b.spy.encodes == 0 and b.spy.decodes == [] and b.loads == []
    np.testing.assert_array_equal(again.object_mask.mask, from_a[2].object_mask.mask)
    assert again.object_mask.score == from_a[2].object_mask.score
    # The state itself came through Redis unchanged: the logits B holds are A's, bit for bit.
    frame = ModelFrame(scene.width, scene.height)
    key = ("img", (scene.width, scene.height), b.segmenter._click_key(clicks[:3], frame))
    a_logits = a.spy.decodes[2]["logits"]
    b_logits = b.segmenter.object_states.get(key)
    assert b_logits.dtype == np.float32
    np.testing.assert_array_equal(b_logits, a_logits)

    # The next click on B: one decoder run from A's state and the shared features, the mask A gives for it.
    fourth_b = b.predict("img", clicks, scene)
    assert len(b.spy.decodes) == 1 and b.spy.encodes == 0
    np.testing.assert_array_equal(b.spy.decodes[0]["prev_mask"], frame.through_frame(a_logits, sigmoid))
    fourth_a = a.predict("img", clicks, scene)
    assert fourth_a.timings.decoder_runs == 0  # B's state for it came back through Redis
    a.segmenter.object_states.clear()
    a.store._down_until = float("inf")  # now from A's memory and engine alone, Redis out of the way
    fourth_a = a.predict("img", clicks, scene)
    assert fourth_a.timings.decoder_runs == 4
    np.testing.assert_array_equal(fourth_a.object_mask.mask, fourth_b.object_mask.mask)
    assert iou(fourth_b.object_mask.mask, (scene.objects[1] & ~scene.objects[0]) | scene.objects[2]) >= 0.98


def test_features_are_shared_as_float16_and_the_encoding_process_uses_the_same(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=12)
    a = Process(test_model_paths, {"img": scene}, store_for(redis_server.url))
    b = Process(test_model_paths, {"img": scene}, store_for(redis_server.url))
    a_features = a.segmenter.encoded_image("img").features.numpy()
    b_image = b.segmenter.encoded_image("img")
    assert b.spy.encodes == 0 and (b_image.width, b_image.height) == (640, 480)
    # Both processes decode from the float16-rounded features: any process gives the same mask.
    np.testing.assert_array_equal(b_image.features.numpy(), a_features)
    assert np.array_equal(a_features, a_features.astype(np.float16).astype(np.float32))
    assert a.store.stats.feature_writes == 1 and b.store.stats.feature_hits == 1


def test_two_processes_asking_for_a_new_image_at_once_encode_it_once(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=13)
    processes = [Process(test_model_paths, {"img": scene}, store_for(redis_server.url), load_delay=0.5) for _ in range(3)]
    start = threading.Barrier(3)
    masks = [None] * 3

    def click(i):
        start.wait()
        masks[i] = processes[i].predict("img", clicks_on(scene, (1, True)), scene).object_mask.mask

    threads = [threading.Thread(target=click, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(p.spy.encodes for p in processes) == 1
    assert sum(p.store.stats.encode_waits for p in processes) == 2
    for mask in masks:
        assert iou(mask, scene.objects[1]) >= 0.98


def test_the_lock_is_renewed_while_a_slow_encode_runs(test_model_paths, redis_server):
    # The lock expires after 0.3 s unless renewed, the image takes 1.5 s to load: the others must still wait.
    scene = make_scene(640, 480, seed=14)
    slow = Process(test_model_paths, {"img": scene}, store_for(redis_server.url, lock_seconds=0.3), load_delay=1.5)
    other = Process(test_model_paths, {"img": scene}, store_for(redis_server.url, lock_seconds=0.3))
    first = threading.Thread(target=slow.segmenter.encoded_image, args=("img",))
    first.start()
    deadline = time.monotonic() + 30
    while not slow.loads and time.monotonic() < deadline:  # the slow one holds the lock and is loading
        time.sleep(0.01)
    other.segmenter.encoded_image("img")
    first.join()
    assert slow.spy.encodes == 1 and other.spy.encodes == 0 and other.store.stats.encode_waits == 1


def test_a_lock_holder_killed_mid_encode_is_taken_over_after_its_lock_expires(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=15)
    # Another process takes the encode lock for this image (lock expiry 1 s, renewed) and is killed mid-encode.
    process = Process(test_model_paths, {"img": scene}, store_for(redis_server.url))
    key = ("img", process.segmenter.feature_identity)  # the features' key: the image and how they are computed
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import json, sys, time; sys.path.insert(0, sys.argv[1])\n"
            "from segnext_backend.shared_store import SharedStore\n"
            "store = SharedStore(sys.argv[2], namespace='test', lock_seconds=1.0)\n"
            "store.features(json.loads(sys.argv[3]), lambda: time.sleep(1000))\n"
        ), str(ROOT), redis_server.url, json.dumps(key)],
    )
    lock = process.store._key("encoding", key)
    deadline = time.monotonic() + 120
    while not process.store._client.exists(lock):
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    waiter = threading.Thread(target=process.segmenter.encoded_image, args=("img",), daemon=True)
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive(), "still waiting for a dead process's encode"
    assert process.spy.encodes == 1 and process.store.stats.encode_waits == 1
    assert time.monotonic() - started < 30


def test_redis_down_at_start_clicks_go_on_from_memory(test_model_paths, tmp_path):
    from tools.file_server import free_port

    scene = make_scene(640, 480, seed=16)
    store = store_for(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert store.check() is False and not store.available
    process = Process(test_model_paths, {"img": scene}, store)
    clicks = clicks_on(scene, (0, True), (2, True))
    for k in (1, 2):
        assert iou(process.predict("img", clicks[:k], scene).object_mask.mask, scene.objects[0] | scene.objects[2] if k == 2 else scene.objects[0]) >= 0.98
    assert process.spy.encodes == 1 and len(process.spy.decodes) == 2
    assert store.status()["available"] is False and "Connection" in store.status()["error"]


def test_a_hung_redis_costs_a_click_one_time_out_then_is_skipped_and_rejoined(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=17)
    store = store_for(redis_server.url, socket_timeout=0.3, retry_seconds=2.0)
    process = Process(test_model_paths, {"img": scene}, store)
    clicks = clicks_on(scene, (0, True), (1, True), (2, True))
    process.predict("img", clicks[:1], scene)
    assert store.stats.state_writes == 1

    redis_server.pause()
    try:
        in_redis = store.stats.seconds
        second = process.predict("img", clicks[:2], scene)
        in_redis = store.stats.seconds - in_redis
        assert iou(second.object_mask.mask, scene.objects[0] | scene.objects[1]) >= 0.98
        assert not store.available and store.stats.errors == 1
        # While Redis is left alone, a click does not touch it at all.
        errors = store.stats.errors
        process.predict("img", clicks, scene)
        assert store.stats.errors == errors
        # One time-out (0.3 s) for the one failed call: not a retry, not one per call, not a stalled click.
        assert 0.3 <= in_redis < 0.3 * 3, in_redis
    finally:
        redis_server.resume()
    deadline = time.monotonic() + 30
    while not store.check() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.available and store.status()["error"] is None
    writes = store.stats.state_writes
    process.predict("img", clicks_on(scene, (1, True)), scene)  # a new object: its state goes to Redis again
    assert store.stats.state_writes == writes + 1


def test_redis_killed_mid_run_then_restarted(test_model_paths, redis_server, tmp_path):
    scene = make_scene(640, 480, seed=18)
    store = store_for(redis_server.url, retry_seconds=0.5)
    process = Process(test_model_paths, {"img": scene}, store)
    process.predict("img", clicks_on(scene, (0, True)), scene)
    redis_server.stop()
    mask = process.predict("img", clicks_on(scene, (0, True), (1, True)), scene).object_mask.mask
    assert iou(mask, scene.objects[0] | scene.objects[1]) >= 0.98 and not store.available
    # A new Redis on the same port (empty): the process reconnects once the retry time is over.
    restarted = RedisServer(tmp_path, port=redis_server.port).start()
    try:
        time.sleep(0.6)
        other = make_scene(640, 480, seed=19)
        process2 = Process(test_model_paths, {"img": scene, "other": other}, store)
        process2.segmenter.encoded_image("other")
        assert store.available and store.stats.feature_writes == 2
    finally:
        restarted.stop()


def test_foreign_or_truncated_values_are_a_miss(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=20)
    store = store_for(redis_server.url)
    process = Process(test_model_paths, {"img": scene}, store)
    store._client.set(store._key("features", ("img", process.segmenter.feature_identity)), b"SNF1" + b"\0" * 20)
    process.segmenter.encoded_image("img")
    assert process.spy.encodes == 1 and store.stats.foreign_values == 1


def test_keys_ignore_fields_outside_the_identity_and_differ_by_model():
    from segnext_backend.images import ImageRef, ImageVersion

    # The features' key is the content: where it was seen (a field outside the identity) does not count.
    seen_at = ImageRef("url", "http://x/a.png"), ImageRef("cloud", "s3://b/a.png", task_id=2)
    assert stable_digest(ImageVersion("ab" * 32, seen_at[0])) == stable_digest(ImageVersion("ab" * 32, seen_at[1]))
    assert stable_digest(ImageRef("cloud", "s3://b/a.png", task_id=1)) != stable_digest(seen_at[1])
    assert stable_digest(ImageRef("url", "http://x/a.png")) != stable_digest(ImageRef("local", "http://x/a.png"))
    assert stable_digest(("img", ((1, 2, 1),))) != stable_digest(("img", ((1, 2, 0),)))
    one, other = SharedStore("redis://127.0.0.1:1/0", namespace="a"), SharedStore("redis://127.0.0.1:1/0", namespace="b")
    assert one._key("features", "img") != other._key("features", "img")
