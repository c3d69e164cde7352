"""Label Studio in, Label Studio out: the translation between Label Studio's tasks and the segmenter.

`SegNextBackend.predict` reads a smart-keypoint context (the clicks of the object being drawn), finds the
image and the control that the clicked label belongs to in the label config (BrushLabels, PolygonLabels or
RectangleLabels), asks the `segnext_backend` package for the object's mask, and answers it in that control's
region format: one brush region, one polygon per part of the mask, or the mask's box. No ONNX, caching or
geometry lives here.

The heavy state (ONNX sessions, caches) is built once per process and kept at module level: label-studio-ml
builds a new `SegNextBackend` for every request. `_wsgi.py` loads it before it serves; under any other server
(label-studio-ml's own `init_app(model_class=SegNextBackend)`, `gunicorn --preload`) the first request that
needs it loads it, in the process that serves (never in a parent that forks workers).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from label_studio_ml.model import LabelStudioMLBase
from label_studio_tools.core.label_config import parse_config

from segnext_backend.caches import LruCache
from segnext_backend.errors import NotReadyError, RequestError, TooLargeError
from segnext_backend.images import ImageFetchConfig, ImageSource, abort_download
from segnext_backend.limits import check_frame_size
from segnext_backend.masks import mask_to_rle
from segnext_backend.model_files import file_sha256
from segnext_backend.preencode import PreEncoder
from segnext_backend.settings import Settings

# The segmenter (and with it ONNX Runtime) is imported where it is used, not here: a server that imports this
# module and then forks its workers (gunicorn --preload) must not have imported onnxruntime, or every worker
# aborts when it exits.
if TYPE_CHECKING:
    from segnext_backend.segmenter import Click, InteractiveSegmenter

logger = logging.getLogger(__name__)

SEGNEXT_VERSION = "segnext-vitb-sax2-hq44k"
DEMO_VERSION = "demo-colour-region-NOT-SegNext"


@dataclass
class Runtime:
    """What every request of the process shares."""

    settings: Settings
    image_source: ImageSource
    segmenter: InteractiveSegmenter
    model_version: str
    model_sha256: dict  # role -> SHA-256 of the loaded file, for /health
    pre_encoder: PreEncoder


_runtime: Runtime | None = None

# A failed load (model files that cannot be fetched, say) is tried again after this long, not on every request.
LOAD_RETRY_SECONDS = 60.0
_load_lock = threading.Lock()
_load: Future | None = None  # this process's load of the models, once started
_load_started = 0.0


def build_runtime(settings: Settings, engine) -> Runtime:
    from segnext_backend.segmenter import InteractiveSegmenter
    from segnext_backend.shared_store import SharedStore

    image_source = ImageSource(
        ImageFetchConfig(
            label_studio_url=settings.label_studio_url,
            label_studio_api_key=settings.label_studio_api_key,
            local_files_document_root=settings.local_files_document_root,
            allow_private_hosts=settings.allow_private_image_hosts,
            download_cache_bytes=settings.download_cache_bytes,
            fast_jpeg_decode=settings.fast_jpeg_decode,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            connect_timeout=settings.image_connect_timeout,
            read_timeout=settings.image_read_timeout,
            download_timeout=settings.image_download_timeout,
            revalidate_seconds=settings.image_revalidate_seconds,
            decode_pixel_budget=settings.decode_pixel_budget,
        )
    )
    digests = {role: file_sha256(Path(info.path)) for role, info in engine.files.items()}
    shared_store = None
    if settings.redis_url:
        # Values computed by other model files must never be read: the namespace is the files' digests.
        namespace = hashlib.sha256((digests["encoder"] + digests["decoder"]).encode()).hexdigest()[:20]
        shared_store = SharedStore(
            settings.redis_url,
            namespace=namespace,
            ttl_seconds=settings.redis_ttl_seconds,
            socket_timeout=settings.redis_socket_timeout,
            retry_seconds=settings.redis_retry_seconds,
        )
        if shared_store.check():
            logger.info("sharing features and click states through Redis at %s", shared_store.url)
    segmenter = InteractiveSegmenter(
        engine,
        # The segmenter's image key is an ImageVersion (a content digest): the image source knows its bytes.
        load_image=image_source.load,
        mask_threshold=settings.mask_threshold,
        feature_cache_bytes=settings.feature_cache_bytes,
        object_state_cache_bytes=settings.object_state_cache_bytes,
        max_clicks=settings.max_clicks,
        feature_disk_cache_dir=settings.feature_disk_cache_dir or None,
        feature_disk_cache_bytes=settings.feature_disk_cache_bytes,
        shared_store=shared_store,
        max_decoder_runs=settings.max_decoder_runs_per_request,
    )
    pre_encoder = PreEncoder(
        lambda ref: segmenter.encoded_image(image_source.current(ref)), settings.preencode_queue_length, abort_download
    )
    version = DEMO_VERSION if engine.is_test_model else SEGNEXT_VERSION
    return Runtime(
        settings=settings,
        image_source=image_source,
        segmenter=segmenter,
        model_version=version,
        model_sha256=digests,
        pre_encoder=pre_encoder,
    )


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime, _load
    with _load_lock:
        if _runtime is not None and _runtime is not runtime:
            _runtime.pre_encoder.stop()
        _runtime = runtime
        if runtime is None:
            _load = None  # the next request that needs the models loads them again


def stop_background_work() -> None:
    """On SIGTERM: no more background fetches or encodes (the clicks in progress still finish)."""
    if _runtime is not None:
        _runtime.pre_encoder.stop()


def get_runtime() -> Runtime:
    """This process's runtime; the first call loads the models (the others wait for that load)."""
    runtime = _runtime
    if runtime is not None:
        return runtime
    try:
        return start_loading().result()
    except Exception as error:
        raise NotReadyError(f"the models could not be loaded: {error}") from None


def start_loading() -> Future:
    """Load the models in the background unless this process has them or is loading them; the load's Future.

    One load per process at a time; a failed one is started again after LOAD_RETRY_SECONDS.
    """
    global _load, _load_started
    with _load_lock:
        if _runtime is not None:
            loaded = Future()
            loaded.set_result(_runtime)
            return loaded
        failed = _load is not None and _load.done() and _load.exception() is not None
        if _load is None or (failed and time.monotonic() - _load_started >= LOAD_RETRY_SECONDS):
            _load, _load_started = Future(), time.monotonic()
            threading.Thread(target=_load_models, args=(_load,), name="segnext-load-models", daemon=True).start()
        return _load


def _load_models(done: Future) -> None:
    try:
        # _wsgi.py, beside this file, is how the process loads its models (model files, DEMO, device).
        import _wsgi

        _wsgi.load(Settings.from_env())
        done.set_result(_runtime)
    except BaseException as error:  # noqa: BLE001 - every failure goes to the requests that wait for the load
        logger.error("the models could not be loaded: %s", error)
        done.set_exception(error)


def _forget_runtime_in_forked_child() -> None:
    # ONNX Runtime sessions and their threads do not survive a fork: a forked worker loads its own.
    global _runtime, _load, _load_lock
    _runtime, _load, _load_lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_runtime_in_forked_child)


def runtime_status() -> dict:
    """For /health and /metrics: which models are loaded, and how the caches are doing.

    Raises NotReadyError while the models load (starting the load if nothing has yet) or after a failed load.
    """
    load = start_loading()
    if not load.done():
        raise NotReadyError("the models are loading")
    if load.exception() is not None:
        raise NotReadyError(f"the models could not be loaded: {load.exception()}")
    runtime = get_runtime()
    segmenter = runtime.segmenter
    shared = segmenter.shared_store
    shared_status = shared.status() if shared is not None else {"configured": False}
    return {
        "model_version": runtime.model_version,
        "demo": segmenter.engine.is_test_model,
        # DEVICE as set, and the ONNX Runtime provider that really runs the models (DEVICE=auto may mean the CPU).
        "device": runtime.settings.device,
        "execution_provider": segmenter.engine.execution_providers[0],
        # DEVICE=openvino: what OpenVINO computes in ("bf16" where the CPU has it, else "f32"); null otherwise.
        "openvino_precision": segmenter.engine.openvino_precision,
        "models": {
            role: {**asdict(info), "sha256": runtime.model_sha256[role]} for role, info in segmenter.engine.files.items()
        },
        "download_cache": asdict(runtime.image_source.downloads.stats()),
        "feature_cache": asdict(segmenter.feature_cache.stats()),
        "object_state_cache": asdict(segmenter.object_states.stats()),
        # This process's totals: summed over the fleet they show each image encoded once, each click decoded once.
        "encoder_runs": segmenter.engine.encoder_runs,
        "decoder_runs": segmenter.engine.decoder_runs,
        "hits": {
            "features": {
                "memory": segmenter.feature_cache.stats().hits,
                "redis": shared_status.get("feature_hits", 0),
                "disk": segmenter.disk_cache_hits,
            },
            "object_states": {
                "memory": segmenter.object_states.stats().hits,
                "redis": shared_status.get("state_hits", 0),
            },
        },
        "redis": shared_status,
        "warnings": (
            [f"Redis unavailable ({shared_status['error']}): clicks are served from this process's caches alone"]
            if shared_status.get("configured") and not shared_status["available"]
            else []
        ),
    }


# -- the label config ---------------------------------------------------------------------------------------

# Parsed configs by SHA-256 of their text: every click of a project carries the same config. Bounded by the
# bytes of the config texts (the parsed form is a few times larger).
_parsed_configs: LruCache[str, tuple[int, dict]] = LruCache(8 * 1024 * 1024, lambda entry: entry[0])


def parsed_label_config(label_config: str | None) -> dict:
    """The parsed label config (shared between requests: read it, never change it)."""
    if not label_config:
        return {}
    limit = _runtime.settings.max_label_config_bytes if _runtime else Settings().max_label_config_bytes
    text = label_config.encode("utf-8", "surrogatepass")
    if len(text) > limit:
        raise TooLargeError(f"the label config is {len(text)} bytes, over the limit of {limit} (MAX_LABEL_CONFIG_BYTES)")
    digest = hashlib.sha256(text).hexdigest()
    return _parsed_configs.get_or_compute(digest, lambda: (len(text), parse_config(label_config)))[1]


# The controls a click can be answered in: kind (REGION_CONTROL_ORDER's name) -> control tag, region type.
REGION_CONTROLS = {
    "brush": ("BrushLabels", "brushlabels"),
    "polygon": ("PolygonLabels", "polygonlabels"),
    "rectangle": ("RectangleLabels", "rectanglelabels"),
}


@dataclass(frozen=True)
class ImageTarget:
    """Where a smart keypoint's mask goes: the Image tag, its task data field, and the control answered."""

    to_name: str
    data_field: str
    from_name: str
    region_type: str  # brushlabels, polygonlabels or rectanglelabels


def _controls_on(parsed: dict, tag_type: str, to_name: str) -> list[tuple[str, dict]]:
    return [
        (name, info)
        for name, info in parsed.items()
        if info.get("type") == tag_type and to_name in info.get("to_name", [])
    ]


def _image_field(parsed: dict, to_name: str) -> str | None:
    for info in parsed.values():
        for target, source in zip(info.get("to_name", []), info.get("inputs", [])):
            if target == to_name and source.get("type") == "Image":
                return source.get("value")
    return None


def _controls_found(parsed: dict) -> str:
    return ", ".join(f"{name} ({info.get('type')}: {', '.join(info.get('labels', []))})" for name, info in parsed.items())


def require_interactive_config(parsed: dict, region_order: tuple[str, ...]) -> None:
    """A clear error for label configs that cannot work with this backend at all."""
    types = {info.get("type") for info in parsed.values()}
    inputs = {source.get("type") for info in parsed.values() for source in info.get("inputs", [])}
    region_tags = [REGION_CONTROLS[kind][0] for kind in region_order]
    missing = [
        what
        for what, present in (
            ("an <Image> tag", "Image" in inputs),
            ("a " + " or ".join(f"<{tag}>" for tag in region_tags) + " control", bool(types & set(region_tags))),
            ("a <KeyPointLabels smart=\"true\"> control", "KeyPointLabels" in types),
        )
        if not present
    ]
    if missing:
        raise RequestError(
            "the label config needs " + ", ".join(missing) + f" (controls found: {_controls_found(parsed) or 'none'};"
            f" answered: REGION_CONTROL_ORDER={','.join(region_order)}; see the README for configs to paste)"
        )


def image_target(parsed: dict, to_name: str, label: str, region_order: tuple[str, ...]) -> ImageTarget:
    """The control on the image that answers `label`: the first kind in `region_order` with a control carrying
    the label, and of several such controls of that kind, the first in the config."""
    data_field = _image_field(parsed, to_name)
    if data_field is None:
        raise RequestError(f"the label config has no <Image name=\"{to_name}\"> for the keypoints' toName")
    for kind in region_order:
        tag, region_type = REGION_CONTROLS[kind]
        for name, info in _controls_on(parsed, tag, to_name):
            if label in info.get("labels", []):
                return ImageTarget(to_name=to_name, data_field=data_field, from_name=name, region_type=region_type)
    raise RequestError(
        f"no control on the image '{to_name}' that this backend answers carries the label {label!r} "
        f"(controls found: {_controls_found(parsed)}; answered: REGION_CONTROL_ORDER={','.join(region_order)})"
    )


# -- the context: clicks of the object being drawn ----------------------------------------------------------


@dataclass(frozen=True)
class ObjectClicks:
    clicks: list[Click]  # in original_width x original_height pixels
    label: str
    to_name: str
    original_width: int
    original_height: int
    image_rotation: float


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{what} must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)  # an int beyond float's range (10**400) raises here
    except OverflowError:
        raise RequestError(f"{what} must be a finite number, got one of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise RequestError(f"{what} must be a finite number, got {value!r}")
    return number


def _size(value, what: str) -> int:
    size = _number(value, what)
    if size < 1 or size != int(size):
        raise RequestError(f"{what} must be a positive whole number, got {value!r}")
    return int(size)


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
    width = _size(first.get("original_width"), "original_width")
    height = _size(first.get("original_height"), "original_height")
    clicks = []
    label = None
    for index, point in enumerate(keypoints):
        value = point.get("value")
        if not isinstance(value, dict):
            raise RequestError(f"keypoint {index} has no value")
        if point.get("to_name") != to_name:
            raise RequestError("all keypoints of one object must be on the same image")
        x = _number(value.get("x"), f"keypoint {index} x")
        y = _number(value.get("y"), f"keypoint {index} y")
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
        image_rotation=_number(rotation, "image_rotation"),
    )


# -- the backend ----------------------------------------------------------------------------------------------


class SegNextBackend(LabelStudioMLBase):
    """SegNext interactive segmentation: smart keypoints in, brush, polygon or rectangle regions out."""

    def __init__(self, label_config=None, **kwargs):
        super().__init__(label_config=None, **kwargs)  # parsed below: bounded, and once per distinct config
        self.label_config = label_config
        self.parsed_label_config = parsed_label_config(label_config)

    @property
    def model_version(self) -> str:
        return _runtime.model_version if _runtime else SEGNEXT_VERSION

    def setup(self):
        """label-studio-ml 2.x calls this from the constructor of every request's instance and answers /setup
        with `self.get("model_version")`: start loading the models (without waiting: Label Studio gives
        /setup 3 s), and keep the version where 2.x reads it."""
        start_loading()
        if self.get("model_version") != self.model_version:
            self.set("model_version", self.model_version)

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
            # A task was opened or predictions were asked for in a batch: nothing to segment without clicks,
            # but the first click will need the image's features, and the encoder is slow.
            for task in tasks:
                self._encode_in_background(runtime, task)
            # One empty list of predictions per task: Label Studio stores nothing and logs nothing. (`[]` makes
            # it log an error for every task opened; an empty prediction would be shown to the annotators and
            # stop Label Studio from asking again when the task is next opened.)
            return [[] for _ in tasks]

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
        return [self._answer(runtime, obj, target, prediction.object_mask)]

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
        prediction = {"result": [], "score": 0.0, "model_version": runtime.model_version}
        if object_mask.is_empty:
            # An empty region would be an invisible suggestion the annotator cannot act on.
            return prediction
        # Imported here, like the segmenter: OpenCV starts threads when imported, and a server that imports
        # this module and then forks its workers (gunicorn --preload) must not have them in the parent.
        from segnext_backend.polygons import bounding_box, box_to_percent, mask_polygons, to_percent

        width, height = obj.original_width, obj.original_height
        label = {target.region_type: [obj.label]}
        if target.region_type == "polygonlabels":
            settings = runtime.settings
            polygons = mask_polygons(object_mask.mask, settings.polygon_tolerance, settings.polygon_min_area)
            values = [{"points": to_percent(p, width, height), "closed": True, **label} for p in polygons]
        elif target.region_type == "rectanglelabels":
            values = [{**box_to_percent(bounding_box(object_mask.mask), width, height), **label}]
        else:
            values = [{"format": "rle", "rle": mask_to_rle(object_mask.mask), **label}]
        regions = [
            {
                "id": uuid.uuid4().hex[:10],
                "from_name": target.from_name,
                "to_name": target.to_name,
                "type": target.region_type,
                "original_width": width,
                "original_height": height,
                "image_rotation": obj.image_rotation,
                "value": value,
                "score": object_mask.score,
                "readonly": False,
            }
            for value in values
        ]
        if regions:
            prediction.update(result=regions, score=object_mask.score)
        return prediction
