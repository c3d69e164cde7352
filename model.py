"""Label Studio in, Label Studio out: the translation between Label Studio's tasks and the segmenter.

`SegNextBackend.predict` reads a smart-keypoint context (the clicks of the object being drawn), finds the
image and the control that the clicked label belongs to in the label config (`label_config.py`), asks the
`segnext_backend` package for the object's mask, and answers it in that control's region format: one brush
region, one polygon per part of the mask, or the mask's box (`regions.py`). Without a context (a task opened,
"Retrieve Predictions") the points already on each task become masks (`preannotation.py`). No ONNX, caching or
geometry lives here; the process's models and caches are `segnext_backend.runtime`'s.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from label_studio_ml.exceptions import AnswerException
from label_studio_ml.model import LabelStudioMLBase

from label_config import (
    ImageTarget,
    image_target,
    parsed_label_config,
    require_answerable_config,
    require_interactive_config,
)
from label_studio_api import LabelStudioApi
from preannotation import preannotate_tasks
from regions import mask_regions
from segnext_backend.errors import AnswerTooLargeError, RequestError, TooLargeError
from segnext_backend.limits import check_frame_size, finite_number, positive_whole_number
from segnext_backend.runtime import (
    SEGNEXT_VERSION,
    Runtime,
    current_settings,
    get_runtime,
    loaded_runtime,
    start_loading,
)

# The segmenter (and with it ONNX Runtime) is imported where it is used, not here: a server that imports this
# module and then forks its workers (gunicorn --preload) must not have imported onnxruntime, or every worker
# aborts when it exits.
if TYPE_CHECKING:
    from segnext_backend.segmenter import Click

logger = logging.getLogger(__name__)

# -- the context: clicks of the object being drawn ----------------------------------------------------------


@dataclass(frozen=True)
class ObjectClicks:
    clicks: list[Click]  # in original_width x original_height pixels
    label: str
    to_name: str
    original_width: int
    original_height: int
    image_rotation: float


def clicks_from_context(context: dict) -> ObjectClicks:
    """The smart keypoints of `context.result`, in the order they were made, as clicks in pixels."""
    from segnext_backend.segmenter import Click

    results = context.get("result") if isinstance(context, dict) else None
    if not isinstance(results, list):
        raise RequestError("context.result must be a list of keypoints")
    keypoints = [r for r in results if isinstance(r, dict) and r.get("type") == "keypointlabels"]
    if not keypoints:
        raise RequestError("context.result holds no keypointlabels: click with a smart KeyPointLabels tool")
    first = keypoints[0]
    to_name = first.get("to_name")
    if not isinstance(to_name, str) or not to_name:
        raise RequestError("a keypoint has no to_name")
    width = positive_whole_number(first.get("original_width"), "original_width")
    height = positive_whole_number(first.get("original_height"), "original_height")
    clicks = []
    label = None
    for index, point in enumerate(keypoints):
        value = point.get("value")
        if not isinstance(value, dict):
            raise RequestError(f"keypoint {index} has no value")
        if point.get("to_name") != to_name:
            raise RequestError("all keypoints of one object must be on the same image")
        x = finite_number(value.get("x"), f"keypoint {index} x")
        y = finite_number(value.get("y"), f"keypoint {index} y")
        if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            raise RequestError(f"keypoint {index} ({x:g}%, {y:g}%) is outside the image")
        labels = value.get("keypointlabels") or value.get("labels")
        if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
            raise RequestError(f"keypoint {index} has no keypointlabels")
        label = labels[0]
        positive = point.get("is_positive", True)
        clicks.append(Click(x=x / 100.0 * width, y=y / 100.0 * height, positive=positive is not False))
    rotation = first.get("image_rotation", 0) or 0
    return ObjectClicks(
        clicks=clicks,
        label=label,
        to_name=to_name,
        original_width=width,
        original_height=height,
        image_rotation=finite_number(rotation, "image_rotation"),
    )


# -- Label Studio's API --------------------------------------------------------------------------------------

_api: LabelStudioApi | None = None


def label_studio_api(settings) -> LabelStudioApi | None:
    """The process's client of Label Studio's API (one, so that a personal access token is exchanged once per
    access token's life, not per request); None without LABEL_STUDIO_URL."""
    global _api
    if not settings.label_studio_url:
        return None
    if _api is None or (_api.url, _api.auth.api_key) != (settings.label_studio_url, settings.label_studio_api_key):
        _api = LabelStudioApi.from_settings(settings)
    return _api


# -- the backend ----------------------------------------------------------------------------------------------


class LabelStudioMLRequestError(RequestError, AnswerException):
    """A RequestError as it leaves the model class: label-studio-ml's own servers (its `init_app`, 2.x and
    1.0.9) answer an AnswerException with its status and any other exception with a 500, so they answer this
    one with its 4xx and message; the project's server (api.py) answers it as any RequestError."""

    def __init__(self, error: RequestError):
        Exception.__init__(self, str(error))  # not AnswerException's: it builds a Flask response at once
        self.http_status = error.http_status
        self.status, self.msg, self.result = error.http_status, str(error), {}


def _answered_with_its_status(method):
    """Every entry point that label-studio-ml's servers call: a RequestError leaves it as LabelStudioMLRequestError."""

    @functools.wraps(method)
    def answered(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except LabelStudioMLRequestError:
            raise
        except RequestError as error:
            raise LabelStudioMLRequestError(error) from error

    return answered


# label-studio-ml 2.x's base class takes the label config through use_label_config() (its constructor calls it);
# 1.0.9's assigns it and parses it in its constructor, without a bound.
_BASE_TAKES_LABEL_CONFIG = hasattr(LabelStudioMLBase, "use_label_config")


class SegNextBackend(LabelStudioMLBase):
    """SegNext interactive segmentation: smart keypoints in, brush, polygon or rectangle regions out."""

    # Plain attributes, set by use_label_config() from label_config.py's bounded cache (parsed once per distinct
    # config, although label-studio-ml makes an instance per request). In 2.x they are read-only properties over
    # its per-project store, filled by an unbounded parse: nothing here goes to that store.
    label_config: str | None = None
    parsed_label_config: dict = {}

    @_answered_with_its_status
    def __init__(self, project_id=None, label_config=None, **kwargs):
        if _BASE_TAKES_LABEL_CONFIG:  # 2.x: calls use_label_config(label_config), then setup()
            super().__init__(project_id=project_id, label_config=label_config)
        else:  # 1.0.9: would parse the config itself
            super().__init__(label_config=None, project_id=project_id, **kwargs)
            self.use_label_config(label_config)

    def use_label_config(self, label_config: str | None) -> None:
        """The request's label config and its parse (label-studio-ml 2.x calls this from its constructor)."""
        self.label_config = label_config
        self.parsed_label_config = parsed_label_config(label_config)

    @property
    def model_version(self) -> str:
        runtime = loaded_runtime()
        return runtime.model_version if runtime else SEGNEXT_VERSION

    def setup(self):
        """label-studio-ml 2.x calls this from the constructor of every request's instance: start loading the
        models, without waiting (Label Studio gives /setup 3 s)."""
        start_loading()

    @_answered_with_its_status
    def get(self, key: str):
        """label-studio-ml 2.x's per-project store. Its /setup answers `get("model_version")`: that is the
        checked version here; every other key is the store's."""
        if key == "model_version":
            return self.setup_model_version()
        return super().get(key)

    def setup_model_version(self) -> str:
        """What /setup answers: the model version, once the label config passes `require_answerable_config`.
        Label Studio calls /setup when a model is added or validated, and shows a refusal there; a click's
        error reaches no one but Label Studio's log."""
        require_answerable_config(self.parsed_label_config, current_settings().region_control_order)
        return self.model_version

    @_answered_with_its_status
    def predict(self, tasks, context=None, **kwargs) -> list[dict]:
        runtime = get_runtime()
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks")
        if not all(isinstance(task, dict) for task in tasks):
            raise RequestError("every task must be an object")
        if len(tasks) > runtime.settings.max_tasks_per_request:
            raise TooLargeError(
                f"the request carries {len(tasks)} tasks, over the limit of {runtime.settings.max_tasks_per_request} "
                "(MAX_TASKS_PER_REQUEST)"
            )
        require_interactive_config(self.parsed_label_config, runtime.settings.region_control_order)

        if not context or not context.get("result"):
            # A task was opened or predictions were asked for in a batch: the points on the tasks become masks.
            return self._masks_for_points(runtime, tasks)

        if len(tasks) != 1:
            raise RequestError(f"an interactive request must carry one task, got {len(tasks)}")
        task = tasks[0]
        obj = clicks_from_context(context)
        check_frame_size(obj.original_width, obj.original_height, runtime.settings.max_image_pixels)
        target = image_target(self.parsed_label_config, obj.to_name, obj.label, runtime.settings.region_control_order)
        image_ref = runtime.image_source.locate(self._image_ref(task, target.data_field), task.get("id"))
        image_key = runtime.image_source.current(image_ref)
        prediction = runtime.segmenter.predict(image_key, obj.clicks, obj.original_width, obj.original_height)
        logger.info(
            "task %s: %d click(s) on %dx%d image, features %s (encoder %.0f ms), %d decoder run(s) %.0f ms, "
            "mask %.0f ms",
            task.get("id"),
            len(obj.clicks),
            prediction.image_width,
            prediction.image_height,
            "cached"
            if prediction.timings.feature_cache_hit
            else "from Redis"
            if prediction.timings.shared_cache_hit
            else "computed",
            prediction.timings.encoder_ms,
            prediction.timings.decoder_runs,
            prediction.timings.decoder_ms,
            prediction.timings.postprocess_ms,
        )
        try:
            return [self._answer(runtime, obj, target, prediction.object_mask)]
        except AnswerTooLargeError:
            runtime.segmenter.forget(prediction)  # nothing is kept from a refused answer
            raise
        finally:
            prediction.release()  # the mask's pixels back to MASK_PIXEL_BUDGET

    def _masks_for_points(self, runtime: Runtime, tasks: list[dict]) -> list:
        """One answer per task (preannotation.py): a prediction with a region per point; an error for a task
        whose points cannot be segmented (Label Studio logs it and stores nothing); or, for a task without
        points or done already, an empty list of predictions (Label Studio stores nothing and logs nothing;
        an empty list of results would make it log an error for every task opened), and its image is encoded
        in the background, since the first click will need its features and the encoder is slow."""
        started = time.monotonic()
        answers = []
        outcomes = preannotate_tasks(
            tasks,
            self.parsed_label_config,
            runtime,
            api=label_studio_api(runtime.settings),
            deadline=started + runtime.settings.batch_predict_seconds,
        )
        for outcome in outcomes:
            task_id = str(outcome.task.get("id"))[:40]
            if outcome.status == "done":
                logger.info(
                    "task %s: %d point(s) from %s, %d region(s)",
                    task_id, outcome.objects, outcome.source, len(outcome.answer["result"]),
                )
                answers.append(outcome.answer)
            elif outcome.status == "failed":
                logger.warning("task %s: no masks for its points: %s", task_id, outcome.error)
                answers.append(outcome.answer)
            else:
                self._encode_in_background(runtime, outcome.task)
                answers.append([])
        return answers

    @staticmethod
    def _image_ref(task: dict, data_field: str) -> str:
        data = task.get("data")
        if not isinstance(data, dict) or data_field not in data:
            raise RequestError(f"task {task.get('id')} has no data field {data_field!r} for the image")
        return data[data_field]

    def _encode_in_background(self, runtime: Runtime, task: dict) -> None:
        for info in self.parsed_label_config.values():
            for source in info.get("inputs", []):
                if source.get("type") != "Image":
                    continue
                try:
                    image_ref = runtime.image_source.locate(self._image_ref(task, source.get("value")), task.get("id"))
                except RequestError as error:
                    logger.info("task %s: not pre-encoding its image: %s", str(task.get("id"))[:40], error)
                    continue
                runtime.pre_encoder.submit(image_ref)
                return

    def _answer(self, runtime: Runtime, obj: ObjectClicks, target: ImageTarget, object_mask) -> dict:
        regions = mask_regions(
            runtime.settings, target, obj.label, object_mask, obj.original_width, obj.original_height, obj.image_rotation
        )
        return {
            "result": regions,
            "score": object_mask.score if regions else 0.0,
            "model_version": runtime.model_version,
        }
