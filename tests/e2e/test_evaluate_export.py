"""tools.evaluate on an export made by the real Label Studio 1.23.2: brush and polygon annotations created
through its API, exported as JSON, read back as the ground truth, the image fetched from Label Studio."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import encode_png, make_scene
from segnext_backend.masks import mask_to_rle
from tools.eval_datasets import read_label_studio_export
from segnext_backend.demo_models import build_demo_models

from .conftest import ROOT, LabelStudio, step
from .test_label_studio import Api

EVALUATION_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Thing"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels>
</View>"""
SIZE = 1024  # the model frame's size: the test models' masks are then exactly the clicked colour's pixels


def test_a_label_studio_export_is_the_ground_truth(label_studio: LabelStudio, tmp_path):
    ls = label_studio
    api = Api(ls.url, None)
    api.session.headers["Authorization"] = f"Token {ls.legacy_token}"
    scene = make_scene(SIZE, SIZE, seed=51)
    ellipse, rectangle = scene.objects[0], scene.objects[1]
    rows, cols = np.nonzero(rectangle)
    left, top, right, bottom = int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
    frame = {"to_name": "image", "original_width": SIZE, "original_height": SIZE, "image_rotation": 0}
    result = [
        {**frame, "id": "brush1", "from_name": "brush", "type": "brushlabels",
         "value": {"format": "rle", "rle": mask_to_rle(ellipse), "brushlabels": ["Thing"]}},
        {**frame, "id": "poly1", "from_name": "poly", "type": "polygonlabels",
         "value": {"points": [[100 * x / SIZE, 100 * y / SIZE] for x, y in ((left, top), (right, top), (right, bottom), (left, bottom))],
                   "closed": True, "polygonlabels": ["Thing"]}},
    ]
    with step("create a project, upload an image, annotate it with a brush and a polygon, export it"):
        project = api.call("POST", "/api/projects", json={"title": "evaluate export", "label_config": EVALUATION_CONFIG}).json()
        files = {"file": ("scene.png", encode_png(scene.pixels), "image/png")}
        api.call("POST", f"/api/projects/{project['id']}/import", files=files)
        listed = api.call("GET", "/api/tasks", params={"project": project["id"]}).json()
        (task,) = listed["tasks"] if isinstance(listed, dict) else listed
        api.call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result, "was_cancelled": False})
        export = api.call("GET", f"/api/projects/{project['id']}/export", params={"exportType": "JSON"}).json()
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(export))

    # The export read back: the same two objects, pixel for pixel.
    objects = read_label_studio_export(export_path, images_dir=None)
    assert [(o.name, o.location.reference, o.location.task_id) for o in objects] == [
        ("brush1", task["data"]["image"], task["id"]), ("poly1", task["data"]["image"], task["id"])
    ]
    np.testing.assert_array_equal(objects[0].load().object_mask, ellipse)
    np.testing.assert_array_equal(objects[1].load().object_mask, rectangle)

    models = tmp_path / "models"
    build_demo_models(models)
    out = tmp_path / "out"
    env = dict(os.environ, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.legacy_token)
    for name in ("MODEL_DIR", "DEMO", "MASK_THRESHOLD", "LOCAL_FILES_DOCUMENT_ROOT"):
        env.pop(name, None)
    with step("python -m tools.evaluate on the export, the image fetched from Label Studio"):
        done = subprocess.run(
            [sys.executable, "-m", "tools.evaluate", "--models", str(models), "--ls-export", str(export_path),
             "--out", str(out), "--no-progress"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    per_object = (out / "objects.csv").read_text()
    # Both objects are single flat colours: the test models find each with the first click.
    assert summary["objects"] == 2
    assert (summary["noc85"], summary["noc90"], summary["noc95"]) == (1.0, 1.0, 1.0)
    assert summary["miou"] == [1.0] * 20, per_object + done.stdout + done.stderr
    assert "1 image encoded" in done.stdout
