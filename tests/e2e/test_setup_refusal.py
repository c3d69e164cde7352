"""What the person adding the model sees in Label Studio 1.23.2 when the label config cannot work with it.

The backend's /setup refuses such a config with a 400 and the reason (the reason a click would get); Label
Studio calls /setup when a model is added or its state is read, and shows the status line of the answer, not
its reason, which is in the backend's log. A click's error, by contrast, reaches no one but Label Studio's log.
"""

from __future__ import annotations

import requests

from conftest import LABEL_CONFIG, decode_region, encode_png, iou, keypoint, make_scene
from tools.scenes import LABEL_NOT_CARRIED, NO_KEYPOINT_LABELS

from .conftest import LabelStudio, log, step

REFUSED_BY_LABEL_STUDIO = "doesn't look like a valid ML backend"  # Label Studio's words, then the status line


def call(ls: LabelStudio, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Token {ls.legacy_token}"}
    return requests.request(method, ls.url + path, headers=headers, timeout=120, **kwargs)


def new_project(ls: LabelStudio, label_config: str, title: str) -> int:
    response = call(ls, "POST", "/api/projects", json={"title": title, "label_config": label_config})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def models_of(ls: LabelStudio, project_id: int) -> list[dict]:
    """The project's ML backends as its Model settings page lists them (Label Studio calls /setup for it)."""
    response = call(ls, "GET", "/api/ml", params={"project": project_id})
    assert response.status_code == 200, response.text
    return response.json()


def test_adding_the_model_to_a_project_whose_config_cannot_work_is_refused(label_studio, start_backend):
    ls = label_studio
    backend = start_backend(ls.url, ls.legacy_token)
    cases = {
        "a label no brush carries": (LABEL_NOT_CARRIED, "no control on the image 'image'", "label 'Other'"),
        "no KeyPointLabels": (NO_KEYPOINT_LABELS, "KeyPointLabels", "controls found: tag (BrushLabels: Thing)"),
    }
    for name, (label_config, *reasons) in cases.items():
        project_id = new_project(ls, label_config, f"refused: {name}")
        log_offset = len(backend.log_text())
        with step(f"connect the backend to a project with {name}"):
            response = call(ls, "POST", "/api/ml", json={
                "url": backend.url, "project": project_id, "title": "SegNext", "is_interactive": True,
            })
        log(f"Label Studio answered {response.status_code}: {response.text[:1000]}")
        # Label Studio refuses, naming the status of /setup's answer and the URL, but not the backend's reason.
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert REFUSED_BY_LABEL_STUDIO in response.text and "400 Client Error" in response.text, response.text
        assert "/setup" in response.text and reasons[-1] not in response.text, response.text
        assert models_of(ls, project_id) == [], name  # nothing was added
        # The reason is in the backend's log, as /setup answered it.
        logged = backend.log_text()[log_offset:]
        assert "POST /setup -> 400" in logged and all(reason in logged for reason in reasons), logged

    # Added to a project whose config works, the model then sees the config edited into one that cannot:
    # the Model settings show it in the error state with the same status line. Clicks still reach it (Label
    # Studio checks the state before batch predictions only): a label that is carried still gets its mask, and
    # the other gets nothing the annotator sees.
    project_id = new_project(ls, LABEL_CONFIG, "setup refused after an edit")
    scene = make_scene(500, 400, seed=47)
    files = {"file": ("edited.png", encode_png(scene.pixels), "image/png")}
    assert call(ls, "POST", f"/api/projects/{project_id}/import", files=files).status_code == 201
    tasks = call(ls, "GET", "/api/tasks", params={"project": project_id}).json()
    task_id = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]
    with step("connect the backend to a project whose config works"):
        added = call(ls, "POST", "/api/ml", json={
            "url": backend.url, "project": project_id, "title": "SegNext", "is_interactive": True,
        })
    assert added.status_code == 201, added.text
    assert models_of(ls, project_id)[0]["state"] == "CO"
    edited = call(ls, "PATCH", f"/api/projects/{project_id}", json={"label_config": LABEL_NOT_CARRIED})
    assert edited.status_code == 200, edited.text
    (listed,) = models_of(ls, project_id)
    log(f"the model after the edit: state {listed['state']}, error_message {listed['error_message']!r}")
    assert listed["state"] == "ER" and "400 Client Error" in (listed["error_message"] or ""), listed
    x, y = scene.inside_point(1)
    for label in ("Thing", "Other"):
        point = keypoint(100 * x / 500, 100 * y / 400, 500, 400, label=label)
        with step(f"click with {label!r} while the model is in the error state"):
            clicked = call(ls, "POST", f"/api/ml/{listed['id']}/interactive-annotating",
                           json={"task": task_id, "context": {"result": [point]}})
        assert clicked.status_code == 200, clicked.text
        if label == "Thing":
            region = clicked.json()["data"]["result"][0]
            assert iou(decode_region(region, 500, 400), scene.objects[1]) >= 0.98
        else:
            log(f"a click with a label no region carries: Label Studio answered the page {clicked.text[:300]}")
            assert "data" not in clicked.json() and "400 Client Error" in clicked.json()["errors"][0], clicked.text
