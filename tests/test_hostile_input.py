"""Hostile and odd input: each gets a clear 4xx (or works), never a 500, a hang or a leak."""

from __future__ import annotations

import json
import logging
from xml.sax.saxutils import quoteattr

from conftest import LABEL_CONFIG, click_on, decode_region, encode_png, iou, keypoint, make_scene, predict_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import clicks_from_context
from segnext_backend.errors import RequestError
from segnext_backend.settings import Settings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
keypoint_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["keypointlabels", "rectanglelabels", 3]),
        "to_name": st.sampled_from(["image", "", None]),
        "original_width": st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=3)),
        "original_height": st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True)),
        "is_positive": json_values,
        "value": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "x": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3)),
                    "y": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()),
                    "keypointlabels": st.one_of(st.lists(st.text(max_size=5), max_size=2), json_values),
                }
            ),
        ),
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.fixed_dictionaries({"result": st.one_of(json_values, st.lists(keypoint_like, max_size=4))})))
def test_context_parser_either_parses_or_says_what_is_wrong(context):
    try:
        parsed = clicks_from_context(context)
    except RequestError as error:
        assert str(error)
        return
    assert parsed.original_width >= 1 and parsed.original_height >= 1
    for click in parsed.clicks:
        assert 0 <= click.x <= parsed.original_width and 0 <= click.y <= parsed.original_height


def test_oversized_and_deeply_nested_bodies_are_refused(make_client):
    client, spy = make_client()
    huge = client.post("/predict", data=b" " * (Settings().max_predict_body_bytes + 1), content_type="application/json")
    assert huge.status_code == 413 and "MAX_PREDICT_BODY_BYTES" in huge.json["error"]
    deep = client.post("/predict", data="[" * 100_000, content_type="application/json")
    assert deep.status_code == 400 and "nested" in deep.json["error"]
    infinite = '{"tasks": [{"data": {"image": "/x.png"}}], "params": {"context": {"result": [{"type": "keypointlabels", "to_name": "image", "original_width": 10, "original_height": 10, "value": {"x": Infinity, "y": 1, "keypointlabels": ["Thing"]}}]}}, "label_config": ' + json.dumps(LABEL_CONFIG) + "}"
    response = client.post("/predict", data=infinite, content_type="application/json")
    assert response.status_code == 400 and "finite" in response.json["error"]
    assert spy.encodes == 0


def test_thousands_of_clicks_are_refused_by_the_cap(make_client, image_server):
    client, spy = make_client(max_clicks=50)
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/many.png", encode_png(scene.pixels))
    response = client.post("/predict", json=predict_body(path, [click_on(scene, 0)] * 5000))
    assert response.status_code == 400 and "MAX_CLICKS" in response.json["error"]
    assert spy.encodes == 0 and spy.decodes == []


def test_labels_and_names_with_odd_characters_round_trip(make_client, image_server):
    label = 'Bär "quoted" <b>&amp; \u202e\u0000?'.replace("\u0000", "")
    config = LABEL_CONFIG.replace('"Thing"', quoteattr(label))
    client, _ = make_client()
    scene = make_scene(500, 400)
    path = image_server.add("/data/upload/1/odd.png", encode_png(scene.pixels))
    x, y = scene.inside_point(1)
    body = predict_body(path, [keypoint(100 * x / 500, 100 * y / 400, 500, 400, label=label)])
    body["label_config"] = config
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    region = response.json["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == [label]
    assert iou(decode_region(region, 500, 400), scene.objects[1]) >= 0.98


def test_request_log_has_timings_and_no_token(make_client, image_server, caplog):
    client, _ = make_client()
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/log.png", encode_png(scene.pixels))
    with caplog.at_level(logging.DEBUG):
        client.post("/predict", json=predict_body(path, [click_on(scene, 0)]))
        client.post("/predict", json=predict_body(path, [click_on(scene, 0), click_on(scene, 1)]))
        client.post("/predict", json=predict_body("/data/upload/1/missing.png", [click_on(scene, 0)]))
    lines = [r.getMessage() for r in caplog.records]
    assert any("task 2" in line and "400x300" in line and "computed" in line and "decoder" in line for line in lines)
    assert any("features cached" in line for line in lines)
    assert any("-> 422" in line and "HTTP 404" in line for line in lines)
    assert "test-token" not in caplog.text
