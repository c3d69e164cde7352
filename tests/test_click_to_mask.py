"""Click to mask over HTTP, through the Flask app, with requests shaped like the ones Label Studio 1.23 sends.

The test models segment the region of the clicked colour (and build on `prev_mask`), so each returned mask
can be checked against the object that was clicked.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import (
    captured,
    click_on,
    decode_region,
    encode_png,
    iou,
    keypoint,
    make_scene,
    predict_body,
)

from segnext_backend.images import ImageRef
from segnext_backend.masks import sigmoid


def only_region(response) -> dict:
    assert response.status_code == 200, response.json
    (prediction,) = response.json["results"]
    (region,) = prediction["result"]
    return region


@pytest.mark.parametrize("width, height", [(640, 480), (4000, 3000), (3000, 4000)])
def test_first_click_returns_the_clicked_object(make_client, image_server, width, height):
    client, _ = make_client()
    scene = make_scene(width, height, seed=width)
    path = image_server.add(f"/data/upload/1/{width}x{height}.png", encode_png(scene.pixels))

    for index in range(3):
        region = only_region(client.post("/predict", json=predict_body(path, [click_on(scene, index)])))
        mask = decode_region(region, width, height)
        assert iou(mask, scene.objects[index]) >= 0.98, f"object {index}"


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_before_segmenting(make_client, image_server, orientation):
    """The browser shows the image rotated by its EXIF tag, and the clicks are in that frame."""
    client, _ = make_client()
    shown = make_scene(800, 500, seed=orientation)  # what the annotator sees
    # How the pixels are stored so that a viewer applying the tag shows `shown`: orientation 3 means "rotate
    # 180 to display", 6 "rotate 90 clockwise", 8 "rotate 90 counter-clockwise".
    stored = {1: shown.pixels, 3: np.rot90(shown.pixels, 2), 6: np.rot90(shown.pixels, 1), 8: np.rot90(shown.pixels, -1)}
    path = image_server.add(f"/data/upload/1/exif{orientation}.png", encode_png(np.ascontiguousarray(stored[orientation]), orientation))

    region = only_region(client.post("/predict", json=predict_body(path, [click_on(shown, 1)])))
    assert (region["original_width"], region["original_height"]) == (800, 500)
    assert iou(decode_region(region, 800, 500), shown.objects[1]) >= 0.98


def test_positive_positive_negative_describes_the_object(make_client, image_server):
    client, spy = make_client()
    scene = make_scene(1200, 900, seed=7)
    path = image_server.add("/data/upload/1/three.png", encode_png(scene.pixels))
    clicks = [click_on(scene, 0), click_on(scene, 1), click_on(scene, 0, positive=False)]
    expected = [scene.objects[0], scene.objects[0] | scene.objects[1], scene.objects[1]]

    for k in range(1, 4):
        encodes_before, decodes_before = spy.encodes, len(spy.decodes)
        region = only_region(client.post("/predict", json=predict_body(path, clicks[:k])))
        assert iou(decode_region(region, 1200, 900), expected[k - 1]) >= 0.98, f"after click {k}"
        # The k-th click costs one decoder run and no encoder run once the image is encoded.
        assert len(spy.decodes) - decodes_before == 1
        assert spy.encodes - encodes_before == (1 if k == 1 else 0)

    # What was fed back is upstream's: the previous prediction's probability at the image's size (not its
    # logits, not a thresholded mask, not the 1024 probability), resized back to 1024x1024.
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    assert not spy.decodes[0]["prev_mask"].any()
    for previous, current in zip(spy.decodes, spy.decodes[1:]):
        logits = torch.from_numpy(np.ascontiguousarray(previous["logits"]))[None, None]
        at_image_size = F.interpolate(logits, size=(900, 1200), mode="bilinear", align_corners=False).sigmoid()
        expected = F.interpolate(at_image_size, size=(1024, 1024), mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(current["prev_mask"], expected, rtol=0, atol=1e-5)
        assert np.abs(current["prev_mask"] - sigmoid(previous["logits"])).max() > 0.01
    # Every click so far goes to the decoder, in order, with labels 1 and 0.
    np.testing.assert_array_equal(spy.decodes[2]["labels"], [1, 1, 0])


def test_a_restarted_process_replays_the_clicks_and_gives_the_same_mask(make_client, image_server):
    scene = make_scene(1000, 700, seed=3)
    path = image_server.add("/data/upload/1/replay.png", encode_png(scene.pixels))
    clicks = [click_on(scene, 0), click_on(scene, 2), click_on(scene, 0, positive=False)]
    client, _ = make_client()
    for k in range(1, 4):
        uninterrupted = only_region(client.post("/predict", json=predict_body(path, clicks[:k])))

    restarted, spy = make_client()  # new runtime: empty caches, as after a restart
    replayed = only_region(restarted.post("/predict", json=predict_body(path, clicks)))
    assert replayed["value"]["rle"] == uninterrupted["value"]["rle"]
    assert spy.encodes == 1 and len(spy.decodes) == 3  # the prefix was rebuilt click by click
    assert iou(decode_region(replayed, 1000, 700), scene.objects[2]) >= 0.98


def test_undoing_a_click_reuses_the_prefix_state(make_client, image_server):
    scene = make_scene(900, 600, seed=4)
    path = image_server.add("/data/upload/1/undo.png", encode_png(scene.pixels))
    client, spy = make_client()
    a, b, c = click_on(scene, 0), click_on(scene, 1), click_on(scene, 2)
    client.post("/predict", json=predict_body(path, [a]))
    client.post("/predict", json=predict_body(path, [a, b]))
    decodes = len(spy.decodes)
    # The annotator removes b and clicks c instead: the state after [a] is still known.
    region = only_region(client.post("/predict", json=predict_body(path, [a, c])))
    assert len(spy.decodes) == decodes + 1
    assert iou(decode_region(region, 900, 600), scene.objects[0] | scene.objects[2]) >= 0.98


def test_region_has_label_studio_shape_and_plain_numbers(make_client, image_server):
    client, _ = make_client()
    scene = make_scene(640, 480)
    path = image_server.add("/data/upload/1/shape.png", encode_png(scene.pixels))
    response = client.post("/predict", json=predict_body(path, [click_on(scene, 1)]))
    prediction = response.json["results"][0]
    region = prediction["result"][0]
    assert region["from_name"] == "tag" and region["to_name"] == "image" and region["type"] == "brushlabels"
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Thing"]
    assert region["readonly"] is False
    assert type(region["original_width"]) is int and type(region["score"]) is float
    assert all(type(v) is int and 0 <= v < 256 for v in region["value"]["rle"])
    assert 0.99 < region["score"] <= 1.0  # the test decoder's logits are +-8
    assert prediction["model_version"] == response.json["model_version"]


def test_label_studio_token_goes_with_uploads_only(make_client, image_server):
    client, _ = make_client(allow_private_image_hosts=True)
    scene = make_scene(640, 480)
    upload = image_server.add("/data/upload/1/token.png", encode_png(scene.pixels))
    client.post("/predict", json=predict_body(upload, [click_on(scene, 0)]))
    assert image_server.requests_for(upload)[0]["headers"]["Authorization"] == "Token test-token"

    # The same server under another host name is another host: no key.
    foreign = image_server.url.replace("127.0.0.1", "localhost") + "/elsewhere.png"
    image_server.add("/elsewhere.png", encode_png(scene.pixels))
    region = only_region(client.post("/predict", json=predict_body(foreign, [click_on(scene, 0)])))
    assert "Authorization" not in image_server.requests_for("/elsewhere.png")[0]["headers"]
    assert iou(decode_region(region, 640, 480), scene.objects[0]) >= 0.98


def test_context_size_differs_from_the_file_the_mask_follows_the_context(make_client, image_server):
    """Label Studio may report another size than the fetched file has (a resized copy, say)."""
    client, _ = make_client()
    scene = make_scene(1600, 1200, seed=5)
    small = make_scene(800, 600, seed=5)  # the same picture at half size
    path = image_server.add("/data/upload/1/half.png", encode_png(small.pixels))
    region = only_region(client.post("/predict", json=predict_body(path, [click_on(scene, 1)])))
    assert (region["original_width"], region["original_height"]) == (1600, 1200)
    assert iou(decode_region(region, 1600, 1200), scene.objects[1]) >= 0.98


def test_captured_label_studio_requests_are_answered(make_client, image_server):
    """The exact bodies a real Label Studio sent, with a 1600x1000 image behind their upload path."""
    client, _ = make_client()
    scene = make_scene(1600, 1000, seed=11)
    first = captured("ui-click1-positive-request.json")
    path = first["tasks"][0]["data"]["image"]
    image_server.add(path, encode_png(scene.pixels))
    x = first["params"]["context"]["result"][0]["value"]["x"] / 100 * 1600
    y = first["params"]["context"]["result"][0]["value"]["y"] / 100 * 1000
    clicked = next(obj for obj in scene.objects if obj[int(y), int(x)])

    region = only_region(client.post("/predict", json=first))
    assert region["from_name"] == "tag" and region["value"]["brushlabels"] == ["Thing"]
    assert iou(decode_region(region, 1600, 1000), clicked) >= 0.98

    second = client.post("/predict", json=captured("ui-click2-alt-negative-request.json"))
    assert second.status_code == 200
    # A lone negative point (Auto-Accept on) selects nothing: a prediction without regions, not an empty brush.
    lone_negative = captured("ui-autoaccept-then-negative-request.json")
    image_server.add(lone_negative["tasks"][0]["data"]["image"], encode_png(scene.pixels))
    response = client.post("/predict", json=lone_negative)
    assert response.status_code == 200 and response.json["results"][0]["result"] == []


def test_task_open_answers_at_once_and_encodes_in_the_background(make_client, image_server):
    client, spy = make_client()
    scene = make_scene(1000, 800, seed=9)
    path = image_server.add("/data/upload/1/open.png", encode_png(scene.pixels))
    image_server.delay_seconds = 0.5  # a slow image host: the answer must not wait for it

    started = time.perf_counter()
    response = client.post("/predict", json=predict_body(path, None))
    # One empty list of predictions for the one task: Label Studio stores no prediction and logs no error
    # (tests/e2e checks both against the real Label Studio).
    assert response.status_code == 200 and response.json["results"] == [[]]
    assert time.perf_counter() - started < 0.4

    runtime_cache = __import__("model").get_runtime().segmenter.feature_cache
    image = ImageRef("url", image_server.url + path)
    deadline = time.monotonic() + 10
    while spy.encodes == 0 or runtime_cache.is_pending(image):
        assert time.monotonic() < deadline, "background encode did not finish"
        time.sleep(0.02)
    image_server.delay_seconds = 0
    region = only_region(client.post("/predict", json=predict_body(path, [click_on(scene, 0)])))
    assert spy.encodes == 1 and len(image_server.requests_for(path)) == 1
    assert iou(decode_region(region, 1000, 800), scene.objects[0]) >= 0.98


def test_predict_works_without_setup_and_setup_answers_a_version(make_client, image_server):
    client, _ = make_client()
    setup = client.post("/setup", json=captured("setup-request.json"))
    assert setup.status_code == 200 and setup.json["model_version"].startswith("demo")
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP" and health.json["demo"] is True
    import hashlib
    from pathlib import Path

    for role in ("encoder", "decoder"):
        info = health.json["models"][role]
        assert info["sha256"] == hashlib.sha256(Path(info["path"]).read_bytes()).hexdigest()
    assert client.post("/webhook", json=captured("webhook-tasks-created-request.json")).status_code == 200


# -- bad input: a clear 4xx, nothing cached, and the next request is served ---------------------------------


def bad_requests(path: str, scene) -> dict:
    good_click = click_on(scene, 0)

    def with_points(points):
        return predict_body(path, points)

    no_image_field = predict_body(path, [good_click])
    no_image_field["tasks"][0]["data"] = {"picture": path}
    unknown_label = predict_body(path, [keypoint(30, 30, scene.width, scene.height, label="Nope")])
    no_brush = predict_body(path, [good_click])
    no_brush["label_config"] = '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image"><Label value="Thing"/></KeyPointLabels></View>'
    broken_xml = predict_body(path, [good_click])
    broken_xml["label_config"] = "<View><Image name="
    nan_click = with_points([keypoint(float("nan"), 30, scene.width, scene.height)])
    string_click = with_points([dict(good_click, value=dict(good_click["value"], x="12"))])
    return {
        "no tasks": {"tasks": [], "label_config": path},
        "tasks not a list": dict(predict_body(path, [good_click]), tasks="x"),
        "no image field": no_image_field,
        "missing image": predict_body("/data/upload/1/missing.png", [good_click]),
        "server error image": predict_body("/data/upload/1/error500.png", [good_click]),
        "not an image": predict_body("/data/upload/1/not-an-image.png", [good_click]),
        "keypoint outside": with_points([keypoint(101, 30, scene.width, scene.height)]),
        "negative keypoint": with_points([keypoint(-1, 30, scene.width, scene.height)]),
        "nan keypoint": nan_click,
        "string keypoint": string_click,
        "unknown label": unknown_label,
        "no brush control": no_brush,
        "broken label config": broken_xml,
        "no keypoints in context": with_points([{"type": "rectanglelabels", "value": {}}]),
        "zero width": with_points([dict(good_click, original_width=0)]),
        "unsupported scheme": predict_body("file:///etc/passwd", [good_click]),
        "too many clicks": with_points([good_click] * 101),
    }


def test_bad_input_gets_a_4xx_with_a_message_and_the_next_request_is_served(make_client, image_server):
    client, spy = make_client()
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/good.png", encode_png(scene.pixels))
    image_server.add("/data/upload/1/error500.png", 500)
    image_server.add("/data/upload/1/not-an-image.png", b"this is not an image")

    not_json = client.post("/predict", data=b"{not json", content_type="application/json")
    assert not_json.status_code == 400 and "JSON" in not_json.json["error"]
    for name, body in bad_requests(path, scene).items():
        response = client.post("/predict", json=body)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.json)
        assert isinstance(response.json.get("error"), str) and response.json["error"], name
    assert spy.encodes == 0 and spy.decodes == []  # nothing was computed, hence nothing cached

    region = only_region(client.post("/predict", json=predict_body(path, [click_on(scene, 0)])))
    assert iou(decode_region(region, 400, 300), scene.objects[0]) >= 0.98


def test_error_messages_name_the_problem(make_client, image_server):
    client, _ = make_client()
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/named.png", encode_png(scene.pixels))
    image_server.add("/data/upload/1/error500.png", 500)
    bodies = bad_requests(path, scene)
    expectations = {
        "no image field": "'image'",
        "server error image": "HTTP 500",
        "missing image": "HTTP 404",
        "keypoint outside": "outside",
        "unknown label": "'Nope'",
        "no brush control": "BrushLabels",
        "too many clicks": "MAX_CLICKS",
    }
    for name, fragment in expectations.items():
        message = client.post("/predict", json=bodies[name]).json["error"]
        assert fragment in message, (name, message)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(make_client, image_server):
    client, spy = make_client(max_image_pixels=640 * 480 - 1)
    scene = make_scene(640, 480)
    path = image_server.add("/data/upload/1/big.png", encode_png(scene.pixels))
    # Label Studio shows it at half size: the frame is within the limit, the file is not.
    point = click_on(scene, 0) | {"original_width": 320, "original_height": 240}
    response = client.post("/predict", json=predict_body(path, [point]))
    assert response.status_code == 413 and "MAX_IMAGE_PIXELS" in response.json["error"]
    assert spy.encodes == 0


def test_threshold_setting_is_used(make_client, image_server):
    """With the test decoder's +-8 logits, a threshold above sigmoid(8) leaves nothing in the mask."""
    client, _ = make_client(mask_threshold=0.9999)
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/threshold.png", encode_png(scene.pixels))
    response = client.post("/predict", json=predict_body(path, [click_on(scene, 0)]))
    assert response.status_code == 200 and response.json["results"][0]["result"] == []


def test_fast_jpeg_decode_still_answers_at_the_reported_size(make_client, image_server):
    import io

    from PIL import Image

    client, _ = make_client(fast_jpeg_decode=True)
    scene = make_scene(4000, 3000, seed=12)
    buffer = io.BytesIO()
    Image.fromarray(scene.pixels).save(buffer, "JPEG", quality=95)
    path = image_server.add("/data/upload/1/fast.jpg", buffer.getvalue())
    region = only_region(client.post("/predict", json=predict_body(path, [click_on(scene, 1)])))
    assert (region["original_width"], region["original_height"]) == (4000, 3000)
    assert iou(decode_region(region, 4000, 3000), scene.objects[1]) >= 0.98
