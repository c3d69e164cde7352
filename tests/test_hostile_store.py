"""Hostile places and stores: special files under the local-files root, a slow or lying Redis, a crash's
leftovers in the feature disk cache, features computed under other settings (docs/reliability.md, the hostile
list, round two: cases 6, 7, 9, 11 and 12). Redis is a real redis-server on loopback, made slow by a real
delaying TCP proxy (tools/slow_proxy.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from conftest import EngineSpy, click_on, decode_region, encode_png, iou, make_scene, predict_body

from segnext_backend import images
from segnext_backend.engine import SegNextEngine
from segnext_backend.errors import ImageUnavailableError, RequestError
from segnext_backend.images import ImageFetchConfig, ImageSource
from segnext_backend.segmenter import Click, InteractiveSegmenter
from segnext_backend.shared_store import HEADER, STATE_MAGIC, SharedStore
from tools.fleet import RedisServer, find_binary
from tools.slow_proxy import SlowProxy

needs_redis = pytest.mark.skipif(
    find_binary("redis-server") is None, reason="redis-server is not installed (apt-get install redis-server)"
)
WAIT_SECONDS = 60  # a deadline for what must end by itself; never reached when the protection holds


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def segmenter_for(test_model_paths, scenes: dict, **options):
    spy = EngineSpy(SegNextEngine(*test_model_paths, intra_op_threads=1))
    return spy, InteractiveSegmenter(spy, lambda key: scenes[key].pixels, **options)


def clicks_on(scene, count: int) -> list[Click]:
    return [Click(*scene.inside_point(i % 3), positive=i % 3 != 2) for i in range(count)]


def expected(scene, count: int):
    mask = scene.objects[0]
    for i in range(1, count):
        mask = mask | scene.objects[i % 3] if i % 3 != 2 else mask & ~scene.objects[i % 3]
    return mask


# -- 6: special files under LOCAL_FILES_DOCUMENT_ROOT ----------------------------------------------------


def local_source(root, **config) -> ImageSource:
    return ImageSource(ImageFetchConfig(
        label_studio_url="http://ls.example:8080", local_files_document_root=str(root), **config
    ))


def fetch_in_thread(source: ImageSource, relative: str):
    """source.fetch of a local file, in a thread: (finished, result or error)."""
    outcome = []

    def fetch():
        try:
            outcome.append(source.fetch(source.locate(f"/data/local-files/?d={relative}")))
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome.append(error)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(WAIT_SECONDS)
    return not thread.is_alive(), (outcome or [None])[0]


def test_a_fifo_under_the_local_files_root_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    finished, outcome = fetch_in_thread(local_source(tmp_path), "pipe.png")
    if not finished:  # let the hung reader go before failing
        os.close(os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
    assert finished, "reading a FIFO hung the thread"
    assert isinstance(outcome, ImageUnavailableError) and "not a regular file" in str(outcome)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_device_under_the_local_files_root_is_refused_before_a_byte_is_read():
    # /dev/zero reports size 0 and never ends: without the check it is read until the byte limit (or memory).
    finished, outcome = fetch_in_thread(local_source("/dev", max_bytes=1024 * 1024), "zero")
    assert finished and isinstance(outcome, ImageUnavailableError) and "not a regular file" in str(outcome)
    finished, outcome = fetch_in_thread(local_source("/"), "dev")  # a folder: the same refusal
    assert finished and isinstance(outcome, ImageUnavailableError)


def test_a_regular_file_is_read_and_a_slow_file_system_meets_the_download_deadline(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"x" * 5_000_000)
    finished, outcome = fetch_in_thread(local_source(tmp_path), "a.png")
    assert finished and outcome == b"x" * 5_000_000
    # A network file system that answers each read after 0.2 s: the whole read ends at the deadline.
    real_read = os.read

    def slow_read(fd, size):
        time.sleep(0.2)
        return real_read(fd, size)

    monkeypatch.setattr(images.os, "read", slow_read)
    finished, outcome = fetch_in_thread(local_source(tmp_path, download_timeout=0.5), "a.png")
    assert finished and isinstance(outcome, ImageUnavailableError) and "IMAGE_DOWNLOAD_TIMEOUT" in str(outcome)


@needs_redis
def test_waiting_for_another_process_encode_ends_at_its_deadline(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=41)
    spy, segmenter = segmenter_for(test_model_paths, {"img": scene}, shared_store=SharedStore(
        redis_server.url, namespace="test", lock_seconds=1.0, encode_wait_seconds=1.5
    ))
    # Another process takes the encode lock and hangs alive (reading a FIFO, say), renewing its lock.
    holder = SharedStore(redis_server.url, namespace="test", lock_seconds=1.0)
    hung, taken = threading.Event(), threading.Event()

    def hang():
        taken.set()
        hung.wait(10 * WAIT_SECONDS)  # longer than the waiter is waited for
        raise RuntimeError("released")

    holding = threading.Thread(
        target=lambda: pytest.raises(RuntimeError, holder.features, ("img", segmenter.feature_identity), hang), daemon=True
    )
    holding.start()
    assert taken.wait(WAIT_SECONDS)
    try:
        waiter = threading.Thread(target=segmenter.encoded_image, args=("img",), daemon=True)
        waiter.start()
        waiter.join(WAIT_SECONDS)
        assert not waiter.is_alive(), "still waiting for a hung process's encode"
        assert spy.encodes == 1 and segmenter.shared_store.stats.encode_wait_timeouts == 1
    finally:
        hung.set()
        holding.join(WAIT_SECONDS)


# -- 7: a slow Redis -------------------------------------------------------------------------------------


@needs_redis
def test_a_slow_redis_costs_a_click_at_most_its_budget_and_is_reported(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=42)
    proxy = SlowProxy(redis_server.port)
    try:
        store = SharedStore(proxy.url, namespace="test", socket_timeout=2.0, click_budget_seconds=0.3)
        spy, segmenter = segmenter_for(test_model_paths, {"img": scene}, shared_store=store)
        clicks = clicks_on(scene, 6)
        segmenter.predict("img", clicks[:1], scene.width, scene.height)  # features and the first state in Redis
        assert store.stats.clicks_over_budget == 0 and store.status()["slow"] is False

        proxy.delay = 0.25  # alive, each call 0.25 s late, below the socket time-out
        segmenter.object_states.clear()  # the next click replays: a dozen Redis calls without a budget
        in_redis = store.stats.seconds
        prediction = segmenter.predict("img", clicks, scene.width, scene.height)
        in_redis = store.stats.seconds - in_redis
        assert iou(prediction.object_mask.mask, expected(scene, 6)) >= 0.98
        assert in_redis < store.click_budget_seconds + 2.0, in_redis  # the budget and the call in flight (< 2 s)
        assert store.stats.clicks_over_budget == 1 and store.available
        status = store.status()
        assert status["slow"] is True and status["ping_seconds"] >= 0.25
        assert any("REDIS_CLICK_BUDGET_SECONDS" in warning for warning in status["warnings"])
    finally:
        proxy.close()


@needs_redis
def test_health_and_metrics_report_a_slow_redis(make_client, image_server, redis_server):
    scene = make_scene(640, 480, seed=49)
    path = image_server.add("/data/upload/1/slow-redis.png", encode_png(scene.pixels))
    proxy = SlowProxy(redis_server.port)
    try:
        client, _ = make_client(redis_url=proxy.url, redis_socket_timeout=2.0, redis_click_budget_seconds=0.3)
        points = [click_on(scene, 0), click_on(scene, 1)]
        assert client.post("/predict", json=predict_body(path, points[:1])).status_code == 200
        assert client.get("/health").json["redis"]["slow"] is False and client.get("/health").json["warnings"] == []
        proxy.delay = 0.4  # two calls over the budget
        response = client.post("/predict", json=predict_body(path, points))
        region = response.json["results"][0]["result"][0]
        assert iou(decode_region(region, scene.width, scene.height), scene.objects[0] | scene.objects[1]) >= 0.98
        for route in ("/health", "/metrics"):
            status = client.get(route).json
            assert status["redis"]["slow"] is True and status["redis"]["clicks_over_budget"] == 1
            assert any("REDIS_CLICK_BUDGET_SECONDS" in warning for warning in status["warnings"])
    finally:
        proxy.close()


# -- 9: Redis values trusted too far ---------------------------------------------------------------------


def state_key(segmenter, scene, clicks):
    from segnext_backend.geometry import ModelFrame

    frame = ModelFrame(scene.width, scene.height)
    return ("img", (scene.width, scene.height), segmenter._click_key(clicks, frame))


def misshapen_state() -> bytes:
    # The right magic and a length consistent with its header, but not the decoder's 1024 x 1024.
    return HEADER.pack(STATE_MAGIC, 512, 2048) + np.zeros((512, 2048), dtype="<f4").tobytes()


@needs_redis
def test_a_state_of_the_wrong_shape_is_a_miss(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=43)
    store = SharedStore(redis_server.url, namespace="test")
    spy, segmenter = segmenter_for(test_model_paths, {"img": scene}, shared_store=store)
    clicks = clicks_on(scene, 2)
    store._client.set(store._key("state", state_key(segmenter, scene, clicks[:1])), misshapen_state())
    prediction = segmenter.predict("img", clicks, scene.width, scene.height)
    assert iou(prediction.object_mask.mask, expected(scene, 2)) >= 0.98
    assert len(spy.decodes) == 2 and store.stats.foreign_values == 1
    # The foreign value was overwritten with the real state: the next process reads it.
    assert store.load_state(state_key(segmenter, scene, clicks[:1])).shape == (1024, 1024)


@needs_redis
def test_states_that_exist_but_cannot_be_used_do_not_lift_the_replay_limit(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=44)
    store = SharedStore(redis_server.url, namespace="test")
    spy, segmenter = segmenter_for(test_model_paths, {"img": scene}, shared_store=store, max_decoder_runs=5)
    clicks = clicks_on(scene, 30)
    for k in range(1, 30):  # EXISTS says every prefix is kept; none can be used
        store._client.set(store._key("state", state_key(segmenter, scene, clicks[:k])), misshapen_state())
    with pytest.raises(RequestError, match="MAX_DECODER_RUNS_PER_REQUEST"):
        segmenter.predict("img", clicks, scene.width, scene.height)
    assert len(spy.decodes) <= 5


def test_states_evicted_from_memory_between_the_check_and_their_use_do_not_lift_the_replay_limit(test_model_paths):
    scene = make_scene(640, 480, seed=45)
    evict = threading.Event()
    spy = EngineSpy(SegNextEngine(*test_model_paths, intra_op_threads=1))

    def load_image(key):
        if evict.is_set():  # other annotators' clicks push this object's states out meanwhile
            segmenter.object_states.clear()
        return scene.pixels

    segmenter = InteractiveSegmenter(spy, load_image, max_decoder_runs=3)
    clicks = clicks_on(scene, 9)
    for k in range(1, 9):
        segmenter.predict("img", clicks[:k], scene.width, scene.height)
    segmenter.feature_cache.clear()
    evict.set()
    decodes = len(spy.decodes)
    with pytest.raises(RequestError, match="MAX_DECODER_RUNS_PER_REQUEST"):
        segmenter.predict("img", clicks, scene.width, scene.height)
    assert len(spy.decodes) - decodes <= 3


# -- 11: a crash's leftovers in the feature disk cache ---------------------------------------------------


def test_leftover_temporary_files_are_removed_or_counted(test_model_paths, tmp_path):
    scene = make_scene(640, 480, seed=46)
    folder = tmp_path / "features"
    folder.mkdir()
    old = folder / ".abc.npz.123.456.tmp"  # a worker killed mid-write, an hour ago
    old.write_bytes(b"x" * 8_000_000)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    spy, segmenter = segmenter_for(
        test_model_paths, {"img": scene}, feature_disk_cache_dir=folder, feature_disk_cache_bytes=10_000_000
    )
    assert not old.exists()  # removed at start
    writing = folder / ".def.npz.789.1011.tmp"  # another process writing now: kept, but counted
    writing.write_bytes(b"x" * 5_000_000)
    segmenter.encoded_image("img")
    assert writing.exists()
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 10_000_000


# -- 12: settings that change the features are part of their keys ---------------------------------------


def test_features_of_another_decode_setting_are_never_reused_from_disk(test_model_paths, tmp_path):
    scene = make_scene(640, 480, seed=47)
    folder = tmp_path / "features"
    first = segmenter_for(test_model_paths, {"img": scene}, feature_disk_cache_dir=folder,
                          feature_settings={"fast_jpeg_decode": True})
    first[1].encoded_image("img")
    other = segmenter_for(test_model_paths, {"img": scene}, feature_disk_cache_dir=folder,
                          feature_settings={"fast_jpeg_decode": False})
    other[1].encoded_image("img")
    same = segmenter_for(test_model_paths, {"img": scene}, feature_disk_cache_dir=folder,
                         feature_settings={"fast_jpeg_decode": True})
    same[1].encoded_image("img")
    assert (first[0].encodes, other[0].encodes, same[0].encodes) == (1, 1, 0)


@needs_redis
def test_features_of_another_decode_setting_are_never_reused_from_redis(test_model_paths, redis_server):
    scene = make_scene(640, 480, seed=48)
    spies = []
    for fast in (True, False, True):
        spy, segmenter = segmenter_for(test_model_paths, {"img": scene}, feature_settings={"fast_jpeg_decode": fast},
                                       shared_store=SharedStore(redis_server.url, namespace="test"))
        segmenter.encoded_image("img")
        spies.append(spy)
    assert [spy.encodes for spy in spies] == [1, 1, 0]


def test_the_runtime_keys_features_by_the_decode_setting(test_model_paths):
    from segnext_backend.runtime import build_runtime
    from segnext_backend.settings import Settings

    engine = SegNextEngine(*test_model_paths, intra_op_threads=1)
    identities = []
    for fast in (False, True):
        runtime = build_runtime(Settings(fast_jpeg_decode=fast), engine)
        runtime.pre_encoder.stop()
        identities.append(dict(runtime.segmenter.feature_identity))
    assert [identity["fast_jpeg_decode"] for identity in identities] == [False, True]
    assert identities[0]["execution_provider"] == "CPUExecutionProvider"
