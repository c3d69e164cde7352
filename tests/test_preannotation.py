"""Masks for points: /predict without clicks, as Label Studio's "Retrieve Predictions" and task opening send it.

Each scene's objects are flat colours that the test models segment exactly, so each returned region can be
checked against the object its point is on. The image server stands in for Label Studio (images and API).
"""

from __future__ import annotations

import copy
import json

import numpy as np
from conftest import captured, decode_region, encode_png, iou, make_scene

from tools.scenes import pillow_polygon_mask

POINTS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <{tag} name="regions" toName="image">
    <Label value="Thing"/>
    <Label value="Other"/>
  </{tag}>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Thing" smart="true"/>
    <Label value="Other" smart="true"/>
  </KeyPointLabels>
  <KeyPointLabels name="points" toName="image">
    <Label value="Thing"/>
    <Label value="Other"/>
    <Label value="Stranger"/>
  </KeyPointLabels>
</View>"""

WIDTH, HEIGHT = 800, 600


def plain_keypoint(scene, index: int, label: str = "Thing", positive: bool = True) -> dict:
    """A point of the plain KeyPointLabels control on object `index`, as Label Studio stores it."""
    x, y = scene.inside_point(index)
    return {
        "id": f"p{index}",
        "from_name": "points",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "value": {"x": 100 * x / scene.width, "y": 100 * y / scene.height, "width": 0.5, "keypointlabels": [label]},
        **({} if positive else {"is_positive": False}),
    }


def annotation(result: list, annotation_id: int = 1, updated_at: str = "2026-01-01T00:00:00Z", **fields) -> dict:
    return {"id": annotation_id, "was_cancelled": False, "updated_at": updated_at, "result": result, **fields}


def batch_body(tasks: list[dict], tag: str = "BrushLabels") -> dict:
    """A /predict without context shaped like the one a real Label Studio sent for an opened task."""
    body = copy.deepcopy(captured("predict-task-open-request.json"))
    template = body["tasks"][0]
    body["tasks"] = [{**copy.deepcopy(template), **task} for task in tasks]
    body["label_config"] = POINTS_CONFIG.format(tag=tag)
    return body


def scene_task(image_server, task_id: int, **fields) -> tuple[dict, object]:
    scene = make_scene(WIDTH, HEIGHT, seed=task_id)
    path = image_server.add(f"/data/upload/1/t{task_id}.png", encode_png(scene.pixels))
    return {"id": task_id, "data": {"image": path}, **fields}, scene


def assert_objects(prediction: dict, scene, indices: list[int]) -> None:
    """One brush region per point, each the object its point is on, with this model's version and a score."""
    regions = prediction["result"]
    assert len(regions) == len(indices)
    for region, index in zip(regions, indices):
        assert region["from_name"] == "regions" and region["type"] == "brushlabels"
        assert iou(decode_region(region, scene.width, scene.height), scene.objects[index]) >= 0.98, index
        assert 0.0 < region["score"] <= 1.0
    assert prediction["model_version"].startswith("demo") and prediction["score"] > 0


def parsed_config(tag: str) -> dict:
    from label_config import parsed_label_config

    return parsed_label_config(POINTS_CONFIG.format(tag=tag))


def answers(response) -> list:
    assert response.status_code == 200, response.json
    return response.json["results"]


# -- the sources of points ---------------------------------------------------------------------------------------


def test_annotation_points_become_one_object_each_with_the_image_encoded_once(make_client, image_server):
    client, spy = make_client()
    task, scene = scene_task(image_server, 7)
    points = [plain_keypoint(scene, 0), plain_keypoint(scene, 2), plain_keypoint(scene, 1, positive=False)]
    task["annotations"] = [annotation(points)]
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    assert_objects(prediction, scene, [0, 2])  # the negative point is no object
    # Encoded once; one decoder run per point, each a lone positive click without a previous mask.
    assert spy.encodes == 1 and len(spy.decodes) == 2
    assert all(d["labels"].tolist() == [1.0] and not d["prev_mask"].any() for d in spy.decodes)


def test_the_smart_controls_points_count_too(make_client, image_server):
    client, _ = make_client()
    task, scene = scene_task(image_server, 8)
    point = {**plain_keypoint(scene, 1), "from_name": "tag2"}
    task["annotations"] = [annotation([point])]
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    assert_objects(prediction, scene, [1])


def test_drafts_missing_from_the_request_are_read_from_label_studio(make_client, image_server):
    client, _ = make_client()
    task, scene = scene_task(image_server, 9)
    task.pop("drafts", None)  # what a batch request of Label Studio 1.23 carries: no drafts
    image_server.add("/api/tasks/9/drafts", json.dumps([{"id": 4, "result": [plain_keypoint(scene, 2)]}]).encode())
    body = batch_body([task])
    del body["tasks"][0]["drafts"]
    (prediction,) = answers(client.post("/predict", json=body))
    assert_objects(prediction, scene, [2])
    (call,) = image_server.requests_for("/api/tasks/9/drafts")
    assert call["headers"]["Authorization"] == "Token test-token"


def test_another_models_predicted_points_are_a_source_and_this_models_prediction_means_done(make_client, image_server):
    client, spy = make_client()
    detector, scene = scene_task(image_server, 10)
    detector["predictions"] = [{"id": 3, "model_version": "detector-v1", "result": [plain_keypoint(scene, 0)]}]
    done, _ = scene_task(image_server, 11)
    done["predictions"] = [{"id": 5, "model_version": "demo-colour-region-NOT-SegNext", "result": []}]
    done["data"]["points"] = [{"x": 50, "y": 50, "label": "Thing"}]
    first, second = answers(client.post("/predict", json=batch_body([detector, done])))
    assert_objects(first, scene, [0])
    assert second == []  # not computed again, and nothing for Label Studio to store
    assert len(spy.decodes) == 1


def test_points_in_the_task_data_in_percent_or_in_pixels(make_client, image_server):
    client, _ = make_client(points_data_field="centres")
    percent, scene_a = scene_task(image_server, 12)
    x, y = scene_a.inside_point(1)
    percent["data"]["centres"] = [{"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "label": "Thing"}]
    pixels, scene_b = scene_task(image_server, 13)
    # Pixels of the image at another size than the file's: scaled to the image as it is shown.
    xs = [scene_b.inside_point(i) for i in (0, 2)]
    pixels["data"]["centres"] = {
        "width": WIDTH * 2,
        "height": HEIGHT * 2,
        "points": [{"x": 2 * px, "y": 2 * py, "label": "Other", "to_name": "image"} for px, py in xs],
    }
    first, second = answers(client.post("/predict", json=batch_body([percent, pixels])))
    assert_objects(first, scene_a, [1])
    assert [r["value"]["brushlabels"] for r in second["result"]] == [["Other"], ["Other"]]
    for region, index in zip(second["result"], (0, 2)):
        assert (region["original_width"], region["original_height"]) == (WIDTH * 2, HEIGHT * 2)
        big = np.kron(scene_b.objects[index], np.ones((2, 2), bool))
        assert iou(decode_region(region, WIDTH * 2, HEIGHT * 2), big) >= 0.97


def test_annotations_win_over_drafts_predictions_and_data(make_client, image_server):
    client, _ = make_client()
    task, scene = scene_task(image_server, 14)
    task["annotations"] = [
        annotation([plain_keypoint(scene, 0)], 1, "2026-01-01T00:00:00Z"),
        annotation([plain_keypoint(scene, 1)], 2, "2026-02-01T00:00:00Z"),  # the most recent wins
        annotation([plain_keypoint(scene, 2)], 3, "2026-03-01T00:00:00Z", was_cancelled=True),
    ]
    task["drafts"] = [{"id": 1, "result": [plain_keypoint(scene, 0)]}]
    task["predictions"] = [{"id": 1, "model_version": "detector", "result": [plain_keypoint(scene, 0)]}]
    task["data"]["points"] = [{"x": 1, "y": 1, "label": "Thing"}]
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    assert_objects(prediction, scene, [1])

    task["annotations"] = []  # then the drafts, then other models' predictions, then the data
    task["drafts"] = [{"id": 1, "result": [plain_keypoint(scene, 2)]}]
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    assert_objects(prediction, scene, [2])
    task["drafts"] = []
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    assert_objects(prediction, scene, [0])


def test_tasks_without_points_are_encoded_in_the_background_and_answered_with_no_predictions(make_client, image_server):
    from segnext_backend.runtime import get_runtime

    client, spy = make_client()
    task, _ = scene_task(image_server, 15)
    assert answers(client.post("/predict", json=batch_body([task]))) == [[]]
    assert get_runtime().pre_encoder.wait_idle(60)
    assert spy.encodes == 1 and not spy.decodes


# -- region formats ----------------------------------------------------------------------------------------------


def test_polygon_and_rectangle_controls_get_their_own_formats(make_client, image_server):
    client, _ = make_client()
    task, scene = scene_task(image_server, 16)
    task["annotations"] = [annotation([plain_keypoint(scene, 1), plain_keypoint(scene, 0)])]
    (polygons,) = answers(client.post("/predict", json=batch_body([task], tag="PolygonLabels")))
    by_label = [r for r in polygons["result"] if r["type"] == "polygonlabels"]
    assert len(by_label) == 2  # each object is one part
    for region, index in zip(by_label, (1, 0)):
        assert iou(pillow_polygon_mask([region], WIDTH, HEIGHT), scene.objects[index]) >= 0.95
    (boxes,) = answers(client.post("/predict", json=batch_body([task], tag="RectangleLabels")))
    for region, index in zip(boxes["result"], (1, 0)):
        ys, xs = np.nonzero(scene.objects[index])
        value = region["value"]
        assert region["type"] == "rectanglelabels"
        assert abs(value["x"] - 100 * xs.min() / WIDTH) < 0.5 and abs(value["width"] - 100 * (xs.max() + 1 - xs.min()) / WIDTH) < 0.5
        assert abs(value["y"] - 100 * ys.min() / HEIGHT) < 0.5 and abs(value["height"] - 100 * (ys.max() + 1 - ys.min()) / HEIGHT) < 0.5


def test_a_point_whose_mask_is_empty_gives_no_region(make_client, image_server):
    client, spy = make_client()
    spy.engine.decode = lambda *args: np.full((1024, 1024), -20.0, np.float32)  # the model sees nothing
    task, scene = scene_task(image_server, 17)
    task["annotations"] = [annotation([plain_keypoint(scene, 0)])]
    (prediction,) = answers(client.post("/predict", json=batch_body([task])))
    # A prediction without regions: stored, so the task counts as done, and nothing invisible to act on.
    assert prediction["result"] == [] and prediction["model_version"].startswith("demo")


# -- what is wrong with one task is that task's ------------------------------------------------------------------


def test_each_tasks_error_is_its_own_answer_and_the_others_get_their_masks(make_client, image_server):
    client, spy = make_client(max_points_per_task=3)
    good, scene = scene_task(image_server, 20)
    good["annotations"] = [annotation([plain_keypoint(scene, 2)])]
    outside, _ = scene_task(image_server, 21)
    outside["data"]["points"] = [{"x": 50, "y": 50, "label": "Thing"}, {"x": 101, "y": 50, "label": "Thing"}]
    pixels_outside, _ = scene_task(image_server, 22)
    pixels_outside["data"]["points"] = {"width": 100, "height": 100, "points": [{"x": 120, "y": 5, "label": "Thing"}]}
    unknown, _ = scene_task(image_server, 23)
    unknown["annotations"] = [annotation([plain_keypoint(scene, 0, label="Stranger")])]
    too_many, _ = scene_task(image_server, 24)
    too_many["data"]["points"] = [{"x": 10 * i, "y": 50, "label": "Thing"} for i in range(1, 5)]
    missing_image = {"id": 25, "data": {"image": "/data/upload/1/gone.png", "points": [{"x": 5, "y": 5, "label": "Thing"}]}}
    malformed, _ = scene_task(image_server, 26)
    malformed["data"]["points"] = "50,50"
    keypoint_outside, _ = scene_task(image_server, 27)
    stray = plain_keypoint(scene, 0)
    stray["value"]["x"] = 150.0
    keypoint_outside["annotations"] = [annotation([stray])]
    huge_frame, _ = scene_task(image_server, 28)
    huge_frame["data"]["points"] = {"width": 40000, "height": 40000, "points": [{"x": 5, "y": 5, "label": "Thing"}]}

    encodes = spy.encodes
    results = answers(client.post("/predict", json=batch_body([good, outside, pixels_outside, unknown, too_many, missing_image, malformed, keypoint_outside, huge_frame])))
    assert_objects(results[0], scene, [2])
    assert spy.encodes == encodes + 1  # only the good task's image: every error is found before the encoder
    errors = [r.get("error", "") for r in results[1:]]
    assert all("result" not in r for r in results[1:])  # Label Studio logs these and stores nothing
    assert "task 21" in errors[0] and "(101%, 50%) is outside the image" in errors[0]
    assert "task 22" in errors[1] and "(120, 5) px is outside the 100x100 image" in errors[1]
    assert "'Stranger'" in errors[2]
    assert "4 points" in errors[3] and "MAX_POINTS_PER_TASK" in errors[3]
    assert "task 25" in errors[4] and "HTTP 404" in errors[4]
    assert "data.points must be a list" in errors[5]
    assert "task 28" in errors[7] and "MAX_IMAGE_PIXELS" in errors[7]
    assert "task 27" in errors[6] and "annotation 1: keypoint 0 (150%" in errors[6] and "outside the image" in errors[6]


def test_a_batch_stops_starting_tasks_after_its_time_and_says_how_to_continue(make_client, image_server):
    client, spy = make_client(batch_predict_seconds=0.0)
    task, scene = scene_task(image_server, 30)
    task["annotations"] = [annotation([plain_keypoint(scene, 0)])]
    (result,) = answers(client.post("/predict", json=batch_body([task])))
    assert "not reached within BATCH_PREDICT_SECONDS" in result["error"] and "result" not in result
    assert not spy.decodes


def test_a_task_whose_points_outlast_the_batchs_time_is_reported_not_cut_short(make_client, image_server):
    """A task is answered whole or not at all: a part of its objects stored would count it as done."""
    import time

    from preannotation import OutOfTime, TaskPoints, fetch_images, keypoints_in, plan_task, segment_plan
    from segnext_backend.runtime import get_runtime

    make_client()
    runtime = get_runtime()
    task, scene = scene_task(image_server, 31)
    points = TaskPoints("annotation 1", keypoints_in([plain_keypoint(scene, 0), plain_keypoint(scene, 1)], "annotation 1"))
    plan = plan_task(task, points, parsed_config("BrushLabels"), runtime.settings)
    fetch_images(plan, runtime)
    try:
        segment_plan(plan, runtime, deadline=time.monotonic() - 1)
    except OutOfTime as error:
        assert "2 points took longer than BATCH_PREDICT_SECONDS" in str(error)
    else:
        raise AssertionError("the task was segmented past its deadline")


def test_settings_of_points_are_read_from_the_environment():
    from segnext_backend.settings import Settings, SettingsError

    settings = Settings.from_env({"POINTS_DATA_FIELD": "centres", "MAX_POINTS_PER_TASK": "7", "BATCH_PREDICT_SECONDS": "30"})
    assert (settings.points_data_field, settings.max_points_per_task, settings.batch_predict_seconds) == ("centres", 7, 30.0)
    for name, value in (("MAX_POINTS_PER_TASK", "0"), ("BATCH_PREDICT_SECONDS", "0.5")):
        try:
            Settings.from_env({name: value})
        except SettingsError as error:
            assert name in str(error)
        else:
            raise AssertionError(f"{name}={value} was accepted")
