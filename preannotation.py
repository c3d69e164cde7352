"""Masks for points: each positive point on a task made into one object's mask, the task's masks one prediction.

Where a task's points come from: the first of these sources that has any point wins, whole (sources are not
merged: the same objects are often pointed at in several of them, which would make each object twice):
1. its annotations: the most recently updated one that is not cancelled and has points;
2. its drafts: the most recently updated one with points (Label Studio's batch request does not carry drafts:
   they are read from Label Studio's API, when LABEL_STUDIO_URL is set);
3. predictions of other models: the most recently updated one with points (a detector's keypoints imported as
   predictions); this backend's own predictions are never a source;
4. the task's data field POINTS_DATA_FIELD (points imported with the task; the format is below).

A point is a `keypointlabels` result of any KeyPointLabels control, plain or smart; a negative one
(`is_positive: false`) is no object and is left out. Its label picks the control that answers it
(label_config.image_target, as for clicks). A task that already has a prediction of this model version is
done and is not computed again. A point whose mask is empty gives no region; a task whose points give no
region gets a prediction without regions (so that it counts as done).

The data field holds either a list of points in percent of the image:
    [{"x": 31.5, "y": 40.2, "label": "Banana"}, ...]
or points in pixels of an image of the given size (as the annotator sees it, after EXIF rotation):
    {"width": 4000, "height": 3000, "points": [{"x": 1260, "y": 1206, "label": "Banana"}, ...]}
A point may name the image it is on ("to_name": the Image tag's name) where the config has several.

What is wrong with one task (a point outside the image, a label no control carries, more points than
MAX_POINTS_PER_TASK, an image that cannot be fetched) is that task's answer, `{"error": ...}`, never the
batch's: Label Studio logs it and stores nothing for the task, so a later run tries it again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from label_config import ImageTarget, image_target
from label_studio_api import LabelStudioApi
from regions import mask_regions
from segnext_backend.errors import RequestError
from segnext_backend.limits import check_frame_size, finite_number, positive_whole_number
from segnext_backend.runtime import Runtime
from segnext_backend.settings import Settings

logger = logging.getLogger(__name__)


class TaskError(Exception):
    """What keeps one task from its masks; the message is for the person who runs the batch."""


@dataclass(frozen=True)
class TaskPoint:
    x: float  # percent of the frame's width
    y: float  # percent of the frame's height
    label: str
    to_name: str
    frame: tuple[int, int] | None = None  # the size the percentages refer to; None: the image's own size
    rotation: float = 0.0


@dataclass(frozen=True)
class TaskPoints:
    source: str  # where the points were found, for logs and summaries: "annotation 12", "data.points", ...
    points: list[TaskPoint]


def _number(value, what: str) -> float:
    return finite_number(value, what, TaskError)


def _size(value, what: str) -> int:
    return positive_whole_number(value, what, TaskError)


def _inside(x: float, y: float, what: str, shown: str) -> None:
    if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
        raise TaskError(f"{what} {shown} is outside the image")


# -- points in Label Studio results ------------------------------------------------------------------------


def keypoints_in(results, where: str) -> list[TaskPoint]:
    """The positive points among Label Studio results (KeyPointLabels regions, plain or smart)."""
    if not isinstance(results, list):
        return []
    points = []
    for index, result in enumerate(results):
        if not isinstance(result, dict) or result.get("type") != "keypointlabels":
            continue
        if result.get("is_positive", True) is False:
            continue
        what = f"{where}: keypoint {index}"
        value = result.get("value")
        if not isinstance(value, dict):
            raise TaskError(f"{what} has no value")
        x, y = _number(value.get("x"), f"{what} x"), _number(value.get("y"), f"{what} y")
        _inside(x, y, what, f"({x:g}%, {y:g}%)")
        labels = value.get("keypointlabels") or value.get("labels")
        if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
            raise TaskError(f"{what} has no label")
        to_name = result.get("to_name")
        if not isinstance(to_name, str) or not to_name:
            raise TaskError(f"{what} has no to_name")
        frame = None
        if result.get("original_width") is not None and result.get("original_height") is not None:
            frame = (
                _size(result["original_width"], f"{what} original_width"),
                _size(result["original_height"], f"{what} original_height"),
            )
        rotation = _number(result.get("image_rotation") or 0, f"{what} image_rotation")
        points.append(TaskPoint(x, y, labels[0], to_name, frame, rotation))
    return points


def _latest_with_points(items, kind: str, skip: Callable[[dict], bool] = lambda item: False) -> TaskPoints | None:
    """The most recently updated item (annotation, draft, prediction) with points."""
    if not isinstance(items, list):
        return None
    candidates = [item for item in items if isinstance(item, dict) and not skip(item)]
    candidates.sort(key=lambda item: str(item.get("updated_at") or item.get("created_at") or ""), reverse=True)
    for item in candidates:
        points = keypoints_in(item.get("result"), f"{kind} {item.get('id')}")
        if points:
            return TaskPoints(f"{kind} {item.get('id')}", points)
    return None


# -- points in the task's data ------------------------------------------------------------------------------


def data_points(data_value, field_name: str, default_to_name: Callable[[], str]) -> list[TaskPoint]:
    """The points of the data field (see the module's docstring for its two forms)."""
    where = f"data.{field_name}"
    frame = None
    if isinstance(data_value, dict):
        width = _size(data_value.get("width"), f"{where}.width")
        height = _size(data_value.get("height"), f"{where}.height")
        frame, items = (width, height), data_value.get("points")
    else:
        items = data_value
    if not isinstance(items, list):
        raise TaskError(
            f"{where} must be a list of points {{x, y, label}} in percent, or {{width, height, points}} in pixels"
        )
    points = []
    for index, item in enumerate(items):
        what = f"{where} point {index}"
        if not isinstance(item, dict):
            raise TaskError(f"{what} must be an object {{x, y, label}}")
        x, y = _number(item.get("x"), f"{what} x"), _number(item.get("y"), f"{what} y")
        if frame is not None:
            if not (0.0 <= x <= frame[0] and 0.0 <= y <= frame[1]):
                raise TaskError(f"{what} ({x:g}, {y:g}) px is outside the {frame[0]}x{frame[1]} image")
            x, y = 100.0 * x / frame[0], 100.0 * y / frame[1]
        else:
            _inside(x, y, what, f"({x:g}%, {y:g}%)")
        label = item.get("label")
        if not isinstance(label, str) or not label:
            raise TaskError(f"{what} has no label")
        to_name = item.get("to_name")
        if to_name is None:
            to_name = default_to_name()
        elif not isinstance(to_name, str):
            raise TaskError(f"{what} to_name must be the name of an Image tag")
        points.append(TaskPoint(x, y, label, to_name, frame))
    return points


def _only_image(parsed: dict) -> str:
    names = {
        name
        for info in parsed.values()
        for name, source in zip(info.get("to_name", []), info.get("inputs", []))
        if source.get("type") == "Image"
    }
    if len(names) != 1:
        raise TaskError(f"the label config has {len(names)} images: name each point's image with to_name")
    return names.pop()


# -- which source -------------------------------------------------------------------------------------------


def is_done(task: dict, model_version: str) -> bool:
    """Whether the task has a prediction of this model version already."""
    predictions = task.get("predictions")
    return isinstance(predictions, list) and any(
        isinstance(p, dict) and p.get("model_version") == model_version for p in predictions
    )


def find_points(
    task: dict, parsed: dict, model_version: str, data_field: str, api: LabelStudioApi | None
) -> TaskPoints | None:
    """The task's points from the source that wins (see the module's docstring); None: it has none."""
    found = _latest_with_points(task.get("annotations"), "annotation", lambda a: bool(a.get("was_cancelled")))
    if found:
        return found
    drafts = task.get("drafts")
    sent = isinstance(drafts, list) and all(isinstance(d, dict) for d in drafts)
    if not sent and api is not None and task.get("id") is not None:
        drafts = api.drafts(task.get("id"))  # not in the request (or only as ids): read them from Label Studio
    found = _latest_with_points(drafts, "draft")
    if found:
        return found
    found = _latest_with_points(
        task.get("predictions"), "prediction", lambda p: p.get("model_version") == model_version
    )
    if found:
        return found
    data = task.get("data")
    if isinstance(data, dict) and data.get(data_field) not in (None, "", []):
        points = data_points(data[data_field], data_field, lambda: _only_image(parsed))
        if points:
            return TaskPoints(f"data.{data_field}", points)
    return None


# -- a task's plan, and its masks ------------------------------------------------------------------------------


@dataclass
class PlannedImage:
    to_name: str
    data_field: str
    points: list[tuple[TaskPoint, ImageTarget]]
    image_key: object = None  # the image's content (ImageVersion), once fetched
    pixels: np.ndarray | None = None  # decoded ahead of the model, when prefetched


@dataclass
class TaskPlan:
    task: dict
    source: str
    images: list[PlannedImage] = field(default_factory=list)

    @property
    def point_count(self) -> int:
        return sum(len(image.points) for image in self.images)


def plan_task(task: dict, points: TaskPoints, parsed: dict, settings: Settings) -> TaskPlan:
    """Which control answers each point, and which image each is on; raises TaskError for what is wrong."""
    if len(points.points) > settings.max_points_per_task:
        raise TaskError(
            f"{len(points.points)} points in {points.source}, over the limit of {settings.max_points_per_task} "
            "(MAX_POINTS_PER_TASK)"
        )
    plan = TaskPlan(task, points.source)
    by_image: dict[str, PlannedImage] = {}
    for point in points.points:
        try:
            target = image_target(parsed, point.to_name, point.label, settings.region_control_order)
            if point.frame is not None:  # before any fetch or encode: the mask is built at this size
                check_frame_size(*point.frame, settings.max_image_pixels)
        except RequestError as error:
            raise TaskError(f"{points.source}: {error}") from None
        planned = by_image.get(point.to_name)
        if planned is None:
            planned = by_image[point.to_name] = PlannedImage(point.to_name, target.data_field, [])
            plan.images.append(planned)
        planned.points.append((point, target))
    return plan


def fetch_images(plan: TaskPlan, runtime: Runtime) -> None:
    """Find each planned image's content, download it and decode it (unless its features are at hand)."""
    data = plan.task.get("data") if isinstance(plan.task.get("data"), dict) else {}
    for image in plan.images:
        if image.data_field not in data:
            raise TaskError(f"the task has no data field {image.data_field!r} for the image {image.to_name!r}")
        try:
            ref = runtime.image_source.locate(data[image.data_field], plan.task.get("id"))
            image.image_key = runtime.image_source.current(ref)
            if image.image_key not in runtime.segmenter.feature_cache:  # else the encoder will not need them
                image.pixels = runtime.image_source.load(image.image_key)
        except RequestError as error:
            raise TaskError(str(error)) from None


class OutOfTime(TaskError):
    pass


def segment_plan(plan: TaskPlan, runtime: Runtime, deadline: float | None = None) -> tuple[dict, int]:
    """The task's prediction (one object per point) and the decoder runs it took. Each image is encoded once
    (or its features found in the caches); each point is one decoder run."""
    from segnext_backend.segmenter import Click, PredictionTimings

    settings = runtime.settings
    timings = PredictionTimings()
    regions = []
    for image in plan.images:
        try:
            encoded = runtime.segmenter.encoded_image(image.image_key, timings, image.pixels)
        except RequestError as error:
            raise TaskError(str(error)) from None
        image.pixels = None  # the encoder has read them: their pixels go back to the decode budget
        for point, target in image.points:
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime(
                    f"{plan.point_count} points took longer than "
                    f"BATCH_PREDICT_SECONDS={settings.batch_predict_seconds:g}: raise it (and Label Studio's "
                    "ML_TIMEOUT_PREDICT), or use tools.preannotate"
                )
            width, height = point.frame or (encoded.width, encoded.height)
            # The mask's work (resize, threshold, RLE or polygons) takes its pixels from MASK_PIXEL_BUDGET, as a
            # click's does; an answer over its size limit is this task's error.
            taken = runtime.segmenter.mask_budget.acquire(width * height)
            try:
                click = Click(x=point.x / 100.0 * width, y=point.y / 100.0 * height)
                object_mask = runtime.segmenter.single_click_mask(encoded, click, width, height, timings)
                regions += mask_regions(settings, target, point.label, object_mask, width, height, point.rotation)
            except RequestError as error:
                raise TaskError(f"{plan.source}: {error}") from None
            finally:
                runtime.segmenter.mask_budget.release(taken)
    score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
    return {"result": regions, "score": score, "model_version": runtime.model_version}, timings.decoder_runs


# -- a batch ----------------------------------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    """What became of one task: `answer` is its prediction, None (nothing to do: no points, or done
    already) or an error; `objects` the decoder runs it took."""

    task: dict
    status: str  # "done", "skipped" (done already), "no points", "failed"
    answer: dict | None = None
    error: str = ""
    source: str = ""
    objects: int = 0
    images: int = 0


def _error_answer(task: dict, message: str) -> dict:
    # No "result": Label Studio logs the whole answer as an incorrect prediction and stores nothing.
    return {"error": f"task {task.get('id')}: {message}"}


def preannotate_tasks(
    tasks: Iterable[dict],
    parsed: dict,
    runtime: Runtime,
    *,
    api: LabelStudioApi | None,
    deadline: float | None = None,
    prefetch: int = 2,
) -> Iterator[TaskOutcome]:
    """Each task's outcome, in order. While the model segments one task, the next `prefetch` tasks' points are
    found and their images fetched and decoded (at most that many decoded images wait), so that the model does
    not wait for the network. Past `deadline` (time.monotonic()), the tasks left are answered as not reached."""
    settings = runtime.settings

    def prepare(task: dict) -> TaskOutcome | TaskPlan:
        try:
            if is_done(task, runtime.model_version):
                return TaskOutcome(task, "skipped")
            points = find_points(task, parsed, runtime.model_version, settings.points_data_field, api)
            if points is None:
                return TaskOutcome(task, "no points")
            plan = plan_task(task, points, parsed, settings)
            fetch_images(plan, runtime)
            return plan
        except (TaskError, RequestError) as error:
            return TaskOutcome(task, "failed", _error_answer(task, str(error)), str(error))
        except Exception as error:  # noqa: BLE001 - one task's failure is that task's, never the batch's
            logger.exception("task %s: preparing its points failed", str(task.get("id"))[:40])
            message = f"internal error: {type(error).__name__}"
            return TaskOutcome(task, "failed", _error_answer(task, message), message)

    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="segnext-prefetch")
    pending: deque[tuple[dict, Future]] = deque()
    remaining = iter(tasks)
    try:
        while True:
            while len(pending) < max(1, prefetch):
                task = next(remaining, None)
                if task is None:
                    break
                pending.append((task, pool.submit(prepare, task)))
            if not pending:
                return
            task, future = pending.popleft()
            if deadline is not None and time.monotonic() > deadline:
                message = (
                    f"not reached within BATCH_PREDICT_SECONDS={settings.batch_predict_seconds:g}: "
                    "retrieve predictions again to continue"
                )
                future.cancel()
                yield TaskOutcome(task, "failed", _error_answer(task, message), message)
                continue
            prepared = future.result()
            if isinstance(prepared, TaskOutcome):
                yield prepared
                continue
            try:
                answer, objects = segment_plan(prepared, runtime, deadline)
            except TaskError as error:
                yield TaskOutcome(task, "failed", _error_answer(task, str(error)), str(error), prepared.source)
                continue
            except Exception as error:  # noqa: BLE001
                logger.exception("task %s: segmenting its points failed", str(task.get("id"))[:40])
                message = f"internal error: {type(error).__name__}"
                yield TaskOutcome(task, "failed", _error_answer(task, message), message, prepared.source)
                continue
            images = len(prepared.images)
            yield TaskOutcome(task, "done", answer, source=prepared.source, objects=objects, images=images)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
