"""tools.preannotate against a stand-in Label Studio on loopback: the project's tasks, drafts and images
served, predictions stored; the masks made by the test models, checked against the scenes' objects."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import decode_region, encode_png, iou, make_scene

from segnext_backend.engine import SegNextEngine
from segnext_backend.runtime import build_runtime
from segnext_backend.settings import Settings
from test_preannotation import POINTS_CONFIG, annotation, plain_keypoint
from tools.file_server import BytesHandler, start_server
from tools.preannotate import main

WIDTH, HEIGHT = 640, 480


@dataclass
class StandInLabelStudio:
    """Label Studio's API as tools.preannotate uses it: one project, its tasks, their drafts and images."""

    project_id: int = 1
    tasks: dict = field(default_factory=dict)  # id -> task
    drafts: dict = field(default_factory=dict)  # task id -> [draft]
    files: dict = field(default_factory=dict)  # path -> bytes
    uploads: list = field(default_factory=list)
    fail_uploads_of: set = field(default_factory=set)
    authorizations: set = field(default_factory=set)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self):
        lab = self

        class Handler(BytesHandler):
            def send_json(self, value, status=200):
                self.reply(status, json.dumps(value).encode(), [("Content-Type", "application/json")])

            def do_GET(self):
                lab.authorizations.add(self.headers.get("Authorization"))
                parts = urlsplit(self.path)
                path, query = parts.path, parse_qs(parts.query)
                segments = path.strip("/").split("/")
                if path in lab.files:
                    return self.answer(lab.files[path])
                if path == f"/api/projects/{lab.project_id}":
                    return self.send_json(
                        {"id": lab.project_id, "label_config": POINTS_CONFIG.format(tag="BrushLabels"), "task_number": len(lab.tasks)}
                    )
                if path == "/api/tasks":
                    page, size = int(query["page"][0]), int(query["page_size"][0])
                    ordered = [lab.task_json(i) for i in sorted(lab.tasks)]
                    if (page - 1) * size >= len(ordered) > 0:
                        return self.send_json({"detail": "Invalid page."}, 404)
                    return self.send_json({"tasks": ordered[(page - 1) * size : page * size], "total": len(ordered)})
                if segments[:2] == ["api", "tasks"] and int(segments[2]) in lab.tasks:
                    if len(segments) == 4 and segments[3] == "drafts":
                        return self.send_json(lab.drafts.get(int(segments[2]), []))
                    return self.send_json(lab.task_json(int(segments[2])))
                return self.send_json({"detail": "Not found."}, 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/api/predictions":
                    return self.send_json({"detail": "Not found."}, 404)
                if body["task"] in lab.fail_uploads_of:
                    return self.send_json({"detail": "database is locked"}, 500)
                with lab.lock:
                    lab.uploads.append(body)
                    lab.tasks[body["task"]]["predictions"].append({"id": len(lab.uploads), **body})
                return self.send_json({"id": len(lab.uploads), **body}, 201)

        return Handler

    def task_json(self, task_id: int) -> dict:
        # The key owner's drafts only, as Label Studio's task API gives them.
        return json.loads(json.dumps({**self.tasks[task_id], "drafts": []}))

    def add_task(self, task_id: int, **fields) -> object:
        scene = make_scene(WIDTH, HEIGHT, seed=task_id)
        path = f"/data/upload/{self.project_id}/t{task_id}.png"
        self.files[path] = encode_png(scene.pixels)
        self.tasks[task_id] = {
            "id": task_id, "project": self.project_id, "data": {"image": path}, "annotations": [], "predictions": [], **fields
        }
        return scene


@pytest.fixture
def label_studio():
    lab = StandInLabelStudio()
    lab.url, httpd = start_server(lab.handler())
    yield lab
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def runtime(test_model_paths, label_studio):
    settings = replace(Settings(), label_studio_url=label_studio.url, label_studio_api_key="test-token")
    made = build_runtime(settings, SegNextEngine(*test_model_paths, intra_op_threads=1))
    yield made
    made.pre_encoder.stop()


def project_with_points(lab: StandInLabelStudio) -> dict:
    """Tasks with points in an annotation, in a draft, in another model's prediction and in the data; one
    without points; one with a point outside the image. Returns task id -> (scene, object indices)."""
    expected = {}
    scene = lab.add_task(1)
    lab.tasks[1]["annotations"] = [annotation([plain_keypoint(scene, 0), plain_keypoint(scene, 2)])]
    expected[1] = (scene, [0, 2])
    scene = lab.add_task(2)
    lab.drafts[2] = [{"id": 7, "result": [plain_keypoint(scene, 1)]}]
    expected[2] = (scene, [1])
    scene = lab.add_task(3)
    lab.tasks[3]["predictions"] = [{"id": 70, "model_version": "detector", "result": [plain_keypoint(scene, 2)]}]
    expected[3] = (scene, [2])
    scene = lab.add_task(4)
    x, y = scene.inside_point(0)
    lab.tasks[4]["data"]["points"] = {"width": WIDTH, "height": HEIGHT, "points": [{"x": x, "y": y, "label": "Thing"}]}
    expected[4] = (scene, [0])
    lab.add_task(5)
    lab.add_task(6)
    lab.tasks[6]["data"]["points"] = [{"x": 120, "y": 5, "label": "Thing"}]
    return expected


def assert_uploaded(lab: StandInLabelStudio, expected: dict, model_version: str) -> None:
    by_task = {upload["task"]: upload for upload in lab.uploads}
    assert sorted(by_task) == sorted(expected)
    for task_id, (scene, indices) in expected.items():
        upload = by_task[task_id]
        assert upload["model_version"] == model_version
        assert len(upload["result"]) == len(indices)
        for region, index in zip(upload["result"], indices):
            assert iou(decode_region(region, scene.width, scene.height), scene.objects[index]) >= 0.98, (task_id, index)


def test_a_project_is_preannotated_and_a_rerun_skips_what_is_done(label_studio, runtime, capsys):
    expected = project_with_points(label_studio)
    assert main(["--project", "1"], runtime=runtime) == 1  # task 6 fails
    out = capsys.readouterr().out
    assert_uploaded(label_studio, expected, runtime.model_version)
    assert "tasks done: 4 (5 objects, 4 images)" in out
    assert "tasks without points: 1" in out
    assert "task 6: data.points point 0 (120%, 5%) is outside the image" in out
    assert label_studio.authorizations == {"Token test-token"}

    decodes = runtime.segmenter.engine.decoder_runs
    assert main(["--project", "1"], runtime=runtime) == 1
    out = capsys.readouterr().out
    assert "tasks skipped (a prediction of this model version exists): 4" in out and "tasks done: 0" in out
    assert len(label_studio.uploads) == 4 and runtime.segmenter.engine.decoder_runs == decodes


def test_limit_and_tasks_choose_what_is_done_and_a_failed_upload_is_reported(label_studio, runtime, capsys):
    expected = project_with_points(label_studio)
    label_studio.fail_uploads_of = {3}
    assert main(["--project", "1", "--tasks", "2-4", "--limit", "2"], runtime=runtime) == 1
    out = capsys.readouterr().out
    assert sorted(u["task"] for u in label_studio.uploads) == [2]
    assert "task 3: uploading its prediction failed" in out and "HTTP 500" in out
    label_studio.fail_uploads_of = set()
    assert main(["--project", "1", "--tasks", "1-4,99"], runtime=runtime) == 1
    assert_uploaded(label_studio, {k: v for k, v in expected.items() if k <= 4}, runtime.model_version)
    out = capsys.readouterr().out
    assert "tasks skipped (a prediction of this model version exists): 1" in out
    assert "task 99: GET /api/tasks/99" in out and "HTTP 404" in out  # a wrong id fails alone


def test_dry_run_checks_points_and_uploads_nothing(label_studio, runtime, capsys):
    project_with_points(label_studio)
    assert main(["--project", "1", "--dry-run"], runtime=runtime) == 1
    out = capsys.readouterr().out
    assert "tasks would be done: 4 (5 objects)" in out and "task 6:" in out
    assert label_studio.uploads == [] and runtime.segmenter.engine.decoder_runs == 0


def test_an_interruption_keeps_what_was_uploaded_and_the_next_run_finishes(label_studio, runtime, capsys, monkeypatch):
    expected = project_with_points(label_studio)
    from label_studio_api import LabelStudioApi

    upload = LabelStudioApi.create_prediction

    def upload_then_interrupt(self, task_id, prediction):
        answer = upload(self, task_id, prediction)
        if len(label_studio.uploads) == 2:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(LabelStudioApi, "create_prediction", upload_then_interrupt)
    assert main(["--project", "1"], runtime=runtime) == 1
    assert "interrupted" in capsys.readouterr().out and len(label_studio.uploads) == 2
    monkeypatch.setattr(LabelStudioApi, "create_prediction", upload)
    main(["--project", "1"], runtime=runtime)
    assert "tasks skipped (a prediction of this model version exists): 2" in capsys.readouterr().out
    assert_uploaded(label_studio, expected, runtime.model_version)


def test_a_running_backend_makes_the_masks_with_backend(label_studio, started_backend, capsys, tmp_path):
    expected = project_with_points(label_studio)
    backend = started_backend(DEMO="true", LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY="test-token")
    settings = replace(Settings(), label_studio_url=label_studio.url, label_studio_api_key="test-token")
    fake_runtime = type("SettingsOnly", (), {"settings": settings})()
    assert main(["--project", "1", "--backend", backend, "--concurrency", "2"], runtime=fake_runtime) == 1
    out = capsys.readouterr().out
    assert_uploaded(label_studio, expected, "demo-colour-region-NOT-SegNext")
    assert "task 6: data.points point 0 (120%, 5%) is outside the image" in out
