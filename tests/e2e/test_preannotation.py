"""Masks for points with a real Label Studio 1.23.2: "Retrieve Predictions" (the Data Manager action) and
tools.preannotate turn a project's points into masks, in brush, polygon and rectangle regions.

Each project has points in an annotation, a draft, another model's imported predictions and the task data, a
task without points and a task whose point is outside the image. Every mask is checked against the object its
point is on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import decode_region, iou, make_scene
from tools.scenes import pillow_polygon_mask

from .conftest import ROOT, LabelStudio, log, step
from .test_label_studio import Api, Image, create_project

DEMO_VERSION = "demo-colour-region-NOT-SegNext"

# Each label is answered in another format: Thing as brush, Other as polygons, Box as a rectangle.
POINTS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Thing"/></BrushLabels>
  <PolygonLabels name="polygon" toName="image"><Label value="Other"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Box"/></RectangleLabels>
  <KeyPointLabels name="smart" toName="image" smart="true">
    <Label value="Thing" smart="true"/><Label value="Other" smart="true"/><Label value="Box" smart="true"/>
  </KeyPointLabels>
  <KeyPointLabels name="points" toName="image">
    <Label value="Thing"/><Label value="Other"/><Label value="Box"/>
  </KeyPointLabels>
</View>"""

REGION_TYPES = {"Thing": "brushlabels", "Other": "polygonlabels", "Box": "rectanglelabels"}


def keypoint_result(image: Image, index: int, label: str) -> dict:
    x, y = image.shown.inside_point(index)
    w, h = image.shown.width, image.shown.height
    return {
        "from_name": "points", "to_name": "image", "type": "keypointlabels",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.5, "keypointlabels": [label]},
    }


# name -> (scene seed, size, where its points are, [(object index, label)])
CASES = {
    "annotated": (61, (1200, 800), "annotation", [(0, "Thing"), (1, "Other")]),
    "drafted": (62, (1000, 700), "draft", [(2, "Box")]),
    "detected": (63, (900, 900), "prediction", [(1, "Thing"), (2, "Other")]),
    "imported": (64, (1300, 700), "data", [(0, "Box"), (2, "Thing")]),
    "nothing": (65, (800, 600), None, []),
    "stray": (66, (800, 600), "data-outside", []),
}


def make_images() -> dict[str, Image]:
    images = {}
    for name, (seed, (width, height), _, _) in CASES.items():
        scene = make_scene(width, height, seed=seed)
        images[name] = Image(f"points-{name}.png", scene, scene.pixels, None)
    return images


def put_points(api: Api, images: dict[str, Image], task_ids: dict[str, int]) -> None:
    """The points of each case where it keeps them, through Label Studio's API."""
    for name, (_, _, where, objects) in CASES.items():
        image, task_id = images[name], task_ids[name]
        results = [keypoint_result(image, index, label) for index, label in objects]
        if where == "annotation":
            api.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": results})
        elif where == "draft":
            api.call("POST", f"/api/tasks/{task_id}/drafts", json={"result": results, "lead_time": 1})
        elif where == "prediction":
            api.call("POST", "/api/predictions", json={"task": task_id, "result": results, "model_version": "detector"})
        elif where in ("data", "data-outside"):
            task = api.call("GET", f"/api/tasks/{task_id}").json()
            shown = image.shown
            if where == "data":  # in pixels of the image, with its size
                points = [
                    {"x": shown.inside_point(index)[0], "y": shown.inside_point(index)[1], "label": label}
                    for index, label in objects
                ]
                value = {"width": shown.width, "height": shown.height, "points": points}
            else:
                value = [{"x": 50, "y": 130, "label": "Thing"}]  # percent: below the image
            api.call("PATCH", f"/api/tasks/{task_id}", json={"data": {**task["data"], "points": value}})


def our_predictions(api: Api, task_id: int) -> list[dict]:
    predictions = api.call("GET", "/api/predictions", params={"task": task_id}).json()
    return [p for p in predictions if p["model_version"] == DEMO_VERSION]


def assert_masks(api: Api, images: dict[str, Image], task_ids: dict[str, int]) -> None:
    """Each task with points has one prediction of this model, one region per point, each the right object."""
    for name, (_, _, where, objects) in CASES.items():
        predictions = our_predictions(api, task_ids[name])
        if not objects:
            assert predictions == [], (name, predictions)
            continue
        (prediction,) = predictions
        regions = prediction["result"]
        assert len(regions) == len(objects), (name, regions)
        shown = images[name].shown
        for region, (index, label) in zip(regions, objects):
            assert region["type"] == REGION_TYPES[label] and region["value"][region["type"]] == [label], region
            assert (region["original_width"], region["original_height"]) == (shown.width, shown.height)
            truth = shown.objects[index]
            if region["type"] == "brushlabels":
                score = iou(decode_region(region, shown.width, shown.height), truth)
                assert score >= 0.98, (name, index, score)
            elif region["type"] == "polygonlabels":
                score = iou(pillow_polygon_mask([region], shown.width, shown.height), truth)
                assert score >= 0.97, (name, index, score)
            else:
                rows, columns = np.nonzero(truth)
                value = region["value"]
                expected = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
                scale = np.array([shown.width, shown.height] * 2) / 100
                got = np.array([value["x"], value["y"], value["x"] + value["width"], value["y"] + value["height"]]) * scale
                # Within 3 pixels: the box of the mask that the model frame (1024x1024) gives, resized back.
                assert np.allclose(got, expected, atol=3), (name, got, expected)
        log(f"{name}: {len(regions)} region(s) from the {where}'s points, right")


@pytest.fixture(scope="module")
def points_lab(label_studio: LabelStudio, start_backend):
    api = Api(label_studio.url, None)
    api.session.headers["Authorization"] = f"Token {label_studio.legacy_token}"
    with step("start the backend (DEMO models) for points"):
        backend = start_backend(label_studio.url, label_studio.legacy_token)
    return api, backend


def retrieve_predictions(api: Api, project_id: int, task_ids: dict[str, int]) -> None:
    api.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
             json={"selectedItems": {"all": False, "included": sorted(task_ids.values())}})


def test_retrieve_predictions_turns_every_source_of_points_into_masks(points_lab, label_studio: LabelStudio):
    api, backend = points_lab
    images = make_images()
    project_id, _, task_ids = create_project(
        api, label_studio, backend, images, POINTS_CONFIG, "e2e points: retrieve", "legacy-token", label_studio.legacy_token
    )
    put_points(api, images, task_ids)
    log_offset = label_studio.log_size()
    with step("Retrieve Predictions (Data Manager action) for 6 tasks"):
        retrieve_predictions(api, project_id, task_ids)
    assert_masks(api, images, task_ids)
    backend_log = (backend.workdir / f"backend-{backend.starts}.log").read_text(errors="replace")
    assert f"task {task_ids['drafted']}: 1 point(s) from draft" in backend_log  # read from Label Studio's API
    # The task whose point is outside the image: reported per task, logged by Label Studio, nothing stored.
    logged = label_studio.log_since(log_offset)
    assert f"task {task_ids['stray']}: data.points point 0 (50%, 130%) is outside the image" in logged, logged[-3000:]

    predicts = backend.predict_requests()
    with step("Retrieve Predictions again"):
        retrieve_predictions(api, project_id, task_ids)
    assert_masks(api, images, task_ids)  # still one prediction of this model per task: nothing made twice
    # Label Studio itself leaves out the tasks with a prediction of this model version.
    assert backend.predict_requests() == predicts + 1


def run_tool(label_studio: LabelStudio, project_id: int, model_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_URL", "MODEL_SHA256")}
    env.update(DEMO="true", MODEL_DIR=str(model_dir), LABEL_STUDIO_URL=label_studio.url,
               LABEL_STUDIO_API_KEY=label_studio.legacy_token)
    result = subprocess.run([sys.executable, "-m", "tools.preannotate", "--project", str(project_id)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    log(result.stdout)
    return result


def test_the_command_line_tool_gives_the_same_masks_and_resumes(points_lab, label_studio: LabelStudio, tmp_path):
    api, backend = points_lab
    images = make_images()
    project_id, ml_id, task_ids = create_project(
        api, label_studio, backend, images, POINTS_CONFIG, "e2e points: tool", "legacy-token", label_studio.legacy_token
    )
    api.call("DELETE", f"/api/ml/{ml_id}", expect=(200, 204))  # the tool alone makes this project's masks
    put_points(api, images, task_ids)
    with step("python -m tools.preannotate (DEMO models)"):
        result = run_tool(label_studio, project_id, tmp_path / "models")
    assert result.returncode == 1, result.stderr[-3000:]  # the stray point's task fails
    assert "tasks done: 4 (7 objects, 4 images)" in result.stdout, result.stdout
    assert f"task {task_ids['stray']}: data.points point 0 (50%, 130%) is outside the image" in result.stdout
    assert_masks(api, images, task_ids)
    with step("python -m tools.preannotate again (resumes: nothing to do)"):
        again = run_tool(label_studio, project_id, tmp_path / "models")
    assert "tasks skipped (a prediction of this model version exists): 4" in again.stdout, again.stdout
    assert "tasks done: 0" in again.stdout
    assert_masks(api, images, task_ids)
