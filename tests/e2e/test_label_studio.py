"""Label Studio 1.23.2 and the backend, end to end, driven over Label Studio's HTTP API as its front end does.

Each scenario runs twice: with a legacy API token and with a personal access token (a JWT refresh token, with
legacy tokens turned off for the organisation), given to both the test client and the backend.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from conftest import LABEL_CONFIG, Scene, decode_region, encode_png, iou, keypoint, make_scene

from .conftest import Backend, LabelStudio, log, step


class PersonalAccessToken(requests.auth.AuthBase):
    """Bearer auth with access tokens from `POST /api/token/refresh/`, renewed before their 5 minutes end."""

    def __init__(self, label_studio_url: str, refresh_token: str):
        self.url = label_studio_url
        self.refresh_token = refresh_token
        self.access = ""
        self.fetched_at = 0.0

    def __call__(self, request):
        if time.monotonic() - self.fetched_at > 180:
            response = requests.post(self.url + "/api/token/refresh/", json={"refresh": self.refresh_token}, timeout=30)
            assert response.status_code == 200, (response.status_code, response.text)
            self.access, self.fetched_at = response.json()["access"], time.monotonic()
        request.headers["Authorization"] = f"Bearer {self.access}"
        return request


class Api:
    def __init__(self, url: str, auth):
        self.url = url
        self.session = requests.Session()
        self.session.auth = auth

    def call(self, method: str, path: str, expect=(200, 201), **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        response = self.session.request(method, self.url + path, **kwargs)
        assert response.status_code in expect, f"{method} {path} -> {response.status_code}: {response.text[:2000]}"
        return response


class Image:
    def __init__(self, name: str, shown: Scene, stored: np.ndarray, orientation: int | None):
        self.name, self.shown, self.stored, self.orientation = name, shown, stored, orientation
        self.task_id: int | None = None


def build_images() -> dict[str, Image]:
    plain = make_scene(1600, 1000, seed=41)
    rotated = make_scene(900, 600, seed=42)  # as the browser shows it; stored rotated, with EXIF orientation 6
    large = make_scene(4000, 3000, seed=43)
    prefetch = make_scene(1200, 800, seed=44)
    restart = make_scene(1000, 700, seed=45)
    opened = make_scene(1100, 750, seed=46)
    return {
        "plain": Image("plain.png", plain, plain.pixels, None),
        "exif6": Image("exif6.png", rotated, np.ascontiguousarray(np.rot90(rotated.pixels, 1)), 6),
        "large": Image("large.png", large, large.pixels, None),
        "prefetch": Image("prefetch.png", prefetch, prefetch.pixels, None),
        "restart": Image("restart.png", restart, restart.pixels, None),
        "opened": Image("opened.png", opened, opened.pixels, None),
    }


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    with step("build the test images (make_scene)"):
        return build_images()


class Lab:
    """One Label Studio project with the uploaded images and the backend connected to it."""

    def __init__(self, auth_kind: str, ls: LabelStudio, api: Api, backend: Backend, project_id: int, ml_id: int,
                 images: dict):
        self.auth_kind, self.ls, self.api, self.backend = auth_kind, ls, api, backend
        self.project_id, self.ml_id, self.images = project_id, ml_id, images

    def click(self, image: Image, points: list[dict]) -> dict | None:
        """POST /api/ml/{id}/interactive-annotating as the front end does; the one region, or None."""
        body = {"task": image.task_id, "context": {"result": points}}
        response = self.api.call("POST", f"/api/ml/{self.ml_id}/interactive-annotating", json=body)
        data = response.json().get("data")
        assert isinstance(data, dict), f"no prediction in {response.text[:2000]}\nbackend log:\n{self.backend.log_tail()}"
        regions = data.get("result") or []
        assert len(regions) <= 1, regions
        return regions[0] if regions else None

    def mask(self, image: Image, points: list[dict]) -> tuple[np.ndarray, dict]:
        region = self.click(image, points)
        assert region is not None, f"an empty answer to {points}\nbackend log:\n{self.backend.log_tail()}"
        shown = image.shown
        assert (region["original_width"], region["original_height"]) == (shown.width, shown.height), region
        assert region["from_name"] == "tag" and region["to_name"] == "image" and region["type"] == "brushlabels"
        return decode_region(region, shown.width, shown.height), region


def point(image: Image, index: int, positive: bool = True, label: str = "Thing") -> dict:
    x, y = image.shown.inside_point(index)
    w, h = image.shown.width, image.shown.height
    return keypoint(100 * x / w, 100 * y / h, w, h, positive, label)


def personal_access_token(ls: LabelStudio) -> str:
    """Create the admin's personal access token (with the legacy token), then turn legacy tokens off."""
    legacy = {"Authorization": f"Token {ls.legacy_token}"}
    response = requests.post(ls.url + "/api/jwt/settings", headers=legacy, timeout=30,
                             json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    assert response.status_code in (200, 201), response.text
    response = requests.post(ls.url + "/api/token/", headers=legacy, timeout=30)
    assert response.status_code in (200, 201), response.text
    return response.json()["token"]


@pytest.fixture(scope="module", params=["legacy-token", "personal-access-token"])
def lab(request, label_studio: LabelStudio, start_backend, images):
    auth_kind = request.param
    ls = label_studio
    restore_legacy = None
    if auth_kind == "legacy-token":
        api_key, auth = ls.legacy_token, None
        api = Api(ls.url, None)
        api.session.headers["Authorization"] = f"Token {ls.legacy_token}"
    else:
        with step("create a personal access token, turn legacy tokens off"):
            api_key = personal_access_token(ls)
            auth = PersonalAccessToken(ls.url, api_key)
            api = Api(ls.url, auth)
            api.call("POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
            refused = requests.get(ls.url + "/api/projects", headers={"Authorization": f"Token {ls.legacy_token}"}, timeout=30)
            assert refused.status_code == 401, f"the legacy token still works: {refused.status_code}"
            restore_legacy = api
    try:
        with step(f"[{auth_kind}] start the backend (DEMO models)"):
            backend = start_backend(ls.url, api_key)
        with step(f"[{auth_kind}] create the project"):
            project = api.call("POST", "/api/projects", json={"title": f"e2e {auth_kind}", "label_config": LABEL_CONFIG}).json()
        with step(f"[{auth_kind}] upload {len(images)} images"):
            for image in images.values():
                files = {"file": (image.name, encode_png(image.stored, image.orientation), "image/png")}
                api.call("POST", f"/api/projects/{project['id']}/import", files=files)
            listed = api.call("GET", "/api/tasks", params={"project": project["id"], "page_size": 100}).json()
            tasks = listed["tasks"] if isinstance(listed, dict) else listed
            by_name = {}
            for task in tasks:
                path = task["data"]["image"]
                assert path.startswith(f"/data/upload/{project['id']}/"), path
                for name, image in images.items():
                    if path.endswith("-" + image.name):
                        by_name[name] = task["id"]
            assert sorted(by_name) == sorted(images), (by_name, [t["data"] for t in tasks])
            # The backend must authenticate to fetch an upload: anonymous (and, for a personal access token,
            # the token itself) is refused, so a right mask below proves that its token handling works.
            upload = ls.url + tasks[0]["data"]["image"]
            assert requests.get(upload, timeout=30).status_code in (401, 403)
            assert requests.get(upload, headers={"Authorization": f"Token {api_key}"}, timeout=30).status_code == (
                200 if auth_kind == "legacy-token" else 401
            )
            lab_images = {name: Image(i.name, i.shown, i.stored, i.orientation) for name, i in images.items()}
            for name, image in lab_images.items():
                image.task_id = by_name[name]
        with step(f"[{auth_kind}] connect the backend (interactive)"):
            ml = api.call("POST", "/api/ml", json={
                "url": backend.url, "project": project["id"], "title": "SegNext", "is_interactive": True,
            }).json()
            state = api.call("GET", f"/api/ml/{ml['id']}").json()
            assert state.get("state") in ("CO", "CONNECTED", None) or state.get("is_interactive"), state
        yield Lab(auth_kind, ls, api, backend, project["id"], ml["id"], lab_images)
    finally:
        if restore_legacy is not None:  # later sessions of the same Label Studio (none here) get it back
            try:
                restore_legacy.call("POST", "/api/jwt/settings", json={"legacy_api_tokens_enabled": True})
            except Exception as error:  # noqa: BLE001 - teardown must go on
                log(f"could not turn legacy tokens back on: {error}")


def test_positive_positive_negative_clicks(lab: Lab):
    image = lab.images["plain"]
    objects = image.shown.objects
    clicks = [point(image, 0), point(image, 1), point(image, 0, positive=False)]
    expected = [objects[0], objects[0] | objects[1], objects[1]]
    for k, wanted in enumerate(expected, start=1):
        with step(f"[{lab.auth_kind}] click {k} on {image.name} ({image.shown.width}x{image.shown.height})"):
            mask, _ = lab.mask(image, clicks[:k])
        assert iou(mask, wanted) >= 0.98, f"click {k}: IoU {iou(mask, wanted):.3f}"


def test_exif_rotated_and_large_images(lab: Lab):
    for name, index in (("exif6", 1), ("large", 2), ("large", 0)):
        image = lab.images[name]
        with step(f"[{lab.auth_kind}] click on object {index} of {image.name} ({image.shown.width}x{image.shown.height})"):
            mask, _ = lab.mask(image, [point(image, index)])
        assert iou(mask, image.shown.objects[index]) >= 0.98, f"{name}: IoU {iou(mask, image.shown.objects[index]):.3f}"


def test_opening_a_task_encodes_its_image_in_the_background(lab: Lab):
    image = lab.images["prefetch"]
    before = lab.backend.metrics()["feature_cache"]
    with step(f"[{lab.auth_kind}] retrieve_tasks_predictions (the backend answers at once)"):
        start = time.monotonic()
        lab.api.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": lab.project_id},
                     json={"selectedItems": {"all": False, "included": [image.task_id]}})
        elapsed = time.monotonic() - start
    assert elapsed < 10, f"retrieving predictions took {elapsed:.1f} s"
    with step(f"[{lab.auth_kind}] wait for the background encoding"):
        after = wait_for_new_features(lab, before)
    assert after["misses"] == before["misses"] + 1, (before, after)
    assert lab.api.call("GET", "/api/predictions", params={"task": image.task_id}).json() == []
    with step(f"[{lab.auth_kind}] first click on the prefetched image"):
        mask, _ = lab.mask(image, [point(image, 1)])
    clicked = lab.backend.metrics()["feature_cache"]
    assert iou(mask, image.shown.objects[1]) >= 0.98
    # The click found the features: no encoder run (no new miss, no new entry), one more hit.
    assert clicked["misses"] == after["misses"] and clicked["entries"] == after["entries"], (after, clicked)
    assert clicked["hits"] > after["hits"], (after, clicked)


INCORRECT_RESPONSE = "ML backend returns an incorrect"  # Label Studio's error for a /predict answer it rejects


def wait_for_new_features(lab: Lab, before: dict) -> dict:
    deadline = time.monotonic() + 60
    while True:
        after = lab.backend.metrics()["feature_cache"]
        if after["entries"] > before["entries"]:
            return after
        assert time.monotonic() < deadline, f"the image was not encoded in the background: {after}\n{lab.backend.log_tail()}"
        time.sleep(0.2)


def test_opening_a_task_encodes_its_image_and_leaves_nothing_on_the_task(lab: Lab):
    # The labeling page loads a task with GET /api/tasks/{id}; a task without predictions makes Label Studio
    # send /predict without context. The backend answers one empty list of predictions per task ([[]]):
    # Label Studio then logs no error (an empty `results` list makes it log one for every task opened), stores
    # no prediction (an empty one would be shown to annotators), and asks again the next time the task opens.
    image = lab.images["opened"]
    before = lab.backend.metrics()["feature_cache"]
    log_offset = lab.ls.log_size()
    predicts = lab.backend.predict_requests()
    with step(f"[{lab.auth_kind}] open the task (GET /api/tasks/{image.task_id})"):
        task = lab.api.call("GET", f"/api/tasks/{image.task_id}").json()
    assert lab.backend.predict_requests() == predicts + 1, lab.backend.log_tail()
    with step(f"[{lab.auth_kind}] wait for the background encoding"):
        wait_for_new_features(lab, before)
    assert task.get("predictions") == [], task.get("predictions")
    stored = lab.api.call("GET", "/api/predictions", params={"task": image.task_id}).json()
    assert stored == [], stored
    logged = lab.ls.log_since(log_offset)
    assert INCORRECT_RESPONSE not in logged and "[ERROR]" not in logged, logged[-3000:]
    with step(f"[{lab.auth_kind}] open the task again"):
        lab.api.call("GET", f"/api/tasks/{image.task_id}")
    assert lab.backend.predict_requests() == predicts + 2  # no stored prediction: Label Studio asks again
    assert lab.api.call("GET", "/api/predictions", params={"task": image.task_id}).json() == []
    with step(f"[{lab.auth_kind}] first click on the opened task"):
        mask, _ = lab.mask(image, [point(image, 2)])
    assert iou(mask, image.shown.objects[2]) >= 0.98
    assert INCORRECT_RESPONSE not in lab.ls.log_since(log_offset)


def test_a_restart_between_two_clicks_gives_the_same_mask(lab: Lab):
    image = lab.images["restart"]
    clicks = [point(image, 0), point(image, 2), point(image, 0, positive=False)]
    uninterrupted = []
    for k in range(1, 4):
        with step(f"[{lab.auth_kind}] uninterrupted click {k}"):
            uninterrupted.append(lab.mask(image, clicks[:k])[1])
    assert iou(decode_region(uninterrupted[2], image.shown.width, image.shown.height), image.shown.objects[2]) >= 0.98

    # The same sequence again (the label differs: a new object for the backend), with a restart before click 3.
    relabelled = [dict(c, value=dict(c["value"], labels=["Other"], keypointlabels=["Other"])) for c in clicks]
    for k in range(1, 3):
        lab.mask(image, relabelled[:k])
    with step(f"[{lab.auth_kind}] restart the backend"):
        lab.backend.restart()
    with step(f"[{lab.auth_kind}] click 3 after the restart (replay)"):
        mask, region = lab.mask(image, relabelled)
    assert region["value"]["rle"] == uninterrupted[2]["value"]["rle"]
    assert region["value"]["brushlabels"] == ["Other"]
    assert iou(mask, image.shown.objects[2]) >= 0.98
