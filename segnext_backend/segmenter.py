"""Interactive segmentation over many images and objects at once: what one click costs, and why.

- An image is encoded once: its features are kept in `feature_cache`, keyed by the image's URL, with the
  size of the pixels that were encoded.
- An object is the sequence of its clicks on one image, in one frame (the size Label Studio reports). After
  each click the decoder's logits for that click sequence are kept in `object_states`; the next click feeds
  back, as upstream does, their probability at the frame's size resized back to 1024x1024 as `prev_mask`
  (`ModelFrame.through_frame`), so the k-th click costs one decoder run. That `prev_mask` depends on the
  frame's size, so the state is keyed by it too. When the state of the prefix is missing (a restart, an
  eviction, a click undone and a new one made), it is rebuilt by replaying the prefix click by click, which
  gives exactly what the clicks would have given one at a time.
- Clicks are keyed in the model frame (whole pixels of the 1024 frame, upstream's rounding), which is what
  the decoder sees.
- Features also depend on how they were computed: how the image was decoded (FAST_JPEG_DECODE) and what
  ran the encoder (execution provider, OpenVINO's precision). That is `feature_identity`, part of every key
  of features kept outside this object (disk, Redis), so that a process with other such settings never reads
  them. The memory cache lives and dies with this object, whose identity never changes: it is keyed by the
  image alone.

This is the package's front door; it knows nothing of Label Studio or HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from .budgets import PixelBudget
from .caches import LruCache
from .engine import FEATURE_BYTES, FEATURE_SHAPE, SegNextEngine
from .errors import RequestError
from .geometry import MODEL_SIZE, ModelFrame, to_model_input
from .masks import ObjectMask, logits_to_mask, sigmoid

logger = logging.getLogger(__name__)

# A replay keeps the states of its last few click prefixes only (what the next click, or an undo and a new
# click, will ask for): a long replay does not push every other annotator's states out of the cache.
REPLAY_STATES_KEPT = 4

# A `.tmp` file in the feature disk cache older than this is a crashed writer's leftover (a write of 6.3 MB
# takes well under a second): removed by the next trim. Younger ones may be another process's write in
# progress: kept, but counted against the folder's budget.
DISK_CACHE_LEFTOVER_SECONDS = 600.0

ClickKey = tuple[tuple[int, int, int], ...]  # ((x, y, label), ...) in the model frame, label 1 or 0


@dataclass(frozen=True)
class Click:
    """One click in the frame's pixels (x right, y down), positive or negative."""

    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class EncodedImage:
    key: str
    features: ort.OrtValue  # on the decoder's device (engine.feature_device)
    width: int  # of the pixels that were encoded, after EXIF orientation
    height: int


@dataclass
class PredictionTimings:
    """What one prediction cost: for the request log and the benchmarks."""

    feature_cache_hit: bool = True
    disk_cache_hit: bool = False  # features read from the on-disk cache instead of encoding
    shared_cache_hit: bool = False  # features read from Redis (shared_store.py) instead of encoding
    encoder_ms: float = 0.0
    decoder_runs: int = 0
    decoder_ms: float = 0.0
    postprocess_ms: float = 0.0


@dataclass(frozen=True)
class Prediction:
    object_mask: ObjectMask
    image_width: int
    image_height: int
    timings: PredictionTimings = field(compare=False)
    # Gives the mask's pixels back to the mask pixel budget: call it once the answer is built (it runs once;
    # if it is never called, it runs when the mask is garbage).
    release: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)
    state_key: tuple | None = field(default=None, compare=False, repr=False)  # for `forget`


class InteractiveSegmenter:
    def __init__(
        self,
        engine: SegNextEngine,
        load_image: Callable[[str], np.ndarray],
        *,
        mask_threshold: float = 0.49,
        feature_cache_bytes: int = 1024 * 1024 * 1024,
        object_state_cache_bytes: int = 512 * 1024 * 1024,
        max_clicks: int = 100,
        feature_disk_cache_dir: str | os.PathLike | None = None,
        feature_disk_cache_bytes: int = 4 * 1024 * 1024 * 1024,
        shared_store=None,
        max_decoder_runs: int = 100,
        feature_settings: dict | None = None,
        mask_pixel_budget: int = 100_000_000,
    ):
        """`load_image(image_key)` returns the image's HxWx3 uint8 RGB pixels (fetching is its business).

        `feature_disk_cache_dir`: when set, every encoded image's features are also written there as float16
        (6.3 MB per image) and read back instead of encoding when the memory cache no longer has them (after a
        restart, an eviction, or in another worker process). Files are keyed by the image key, the encoder
        file (path, size, modification time) and `feature_identity`. The folder is kept under
        `feature_disk_cache_bytes`, least recently used files out first (a read refreshes a file's time), writes
        in progress counted, a crashed write's leftover removed. The float16 rounding moves the logits slightly
        (docs/performance.md). None (the default): off.

        `shared_store`: a `shared_store.SharedStore` (Redis), the tier between the memory caches and the disk
        cache or the encoder, shared by every process of the fleet. None (the default): off.

        `feature_settings`: the settings outside the engine that change the features `load_image`'s pixels
        give (e.g. {"fast_jpeg_decode": True}); with the engine's provider and precision they are the
        features' identity, part of their disk and Redis keys.

        `mask_pixel_budget`: frame pixels whose masks are made and answered at once, over all threads. A
        mask costs one byte per frame pixel, its answer (brush RLE, polygons) a few more for a moment: a click
        takes its frame's pixels before its mask is made, and `Prediction.release` gives them back. The rest
        wait, in arrival order; a frame larger than the whole budget runs alone.
        """
        self.engine = engine
        self.load_image = load_image
        self.mask_threshold = mask_threshold
        self.max_clicks = max_clicks
        self.max_decoder_runs = max_decoder_runs
        self.mask_budget = PixelBudget(mask_pixel_budget)
        self.feature_cache: LruCache[str, EncodedImage] = LruCache(feature_cache_bytes, lambda e: FEATURE_BYTES)
        # (image key, (frame width, frame height), clicks) -> the decoder's logits after those clicks
        self.object_states: LruCache[tuple[str, tuple[int, int], ClickKey], np.ndarray] = LruCache(
            object_state_cache_bytes, lambda logits: logits.nbytes
        )
        self.feature_disk_cache_dir = Path(feature_disk_cache_dir) if feature_disk_cache_dir else None
        self.feature_disk_cache_bytes = feature_disk_cache_bytes
        self.shared_store = shared_store
        self.feature_identity = (
            ("execution_provider", engine.execution_providers[0]),
            ("openvino_precision", engine.openvino_precision),
            *sorted((feature_settings or {}).items()),
        )
        self.disk_cache_hits = 0
        self._disk_hits_lock = threading.Lock()
        if self.feature_disk_cache_dir is not None:
            try:
                self.feature_disk_cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # the cache costs only itself: without its folder, it is off
                logger.warning("feature disk cache off: cannot create %s: %s", self.feature_disk_cache_dir, error)
                self.feature_disk_cache_dir = None
        if self.feature_disk_cache_dir is not None:
            self._trim_disk_cache()  # a crash's leftovers, and a budget lowered since the last run

    def _redis_click(self):
        """The scope of one click's (or pre-encode's) Redis budget (shared_store.py)."""
        return self.shared_store.click() if self.shared_store is not None else nullcontext()

    # -- images -------------------------------------------------------------------------------------------

    def encoded_image(
        self, image_key: str, timings: PredictionTimings | None = None, pixels: np.ndarray | None = None
    ) -> EncodedImage:
        """The image's features, encoding it if no request has yet (and waiting if one is encoding it now).

        `pixels`: the image's RGB pixels when the caller has decoded them already (a batch that fetches and
        decodes ahead of the model); otherwise `load_image` fetches them when they are needed."""

        def encode() -> EncodedImage:
            if timings is not None:
                timings.feature_cache_hit = False
            if self.shared_store is not None:
                return self._shared_encoded_image(image_key, encode_here, timings)
            return encode_here()

        def encode_here() -> EncodedImage:
            stored = self._read_disk_features(image_key)
            if stored is not None:
                if timings is not None:
                    timings.disk_cache_hit = True
                return stored
            rgb = pixels if pixels is not None else self.load_image(image_key)
            started = time.perf_counter()
            features = self.engine.encode(to_model_input(rgb))
            if timings is not None:
                timings.encoder_ms = (time.perf_counter() - started) * 1000
            encoded = EncodedImage(key=image_key, features=features, width=rgb.shape[1], height=rgb.shape[0])
            try:
                self._write_disk_features(encoded)
            except OSError as error:  # a read-only, full or foreign folder costs the cache, never the click
                logger.warning("feature disk cache: %s", error)
            return encoded

        with self._redis_click():
            return self.feature_cache.get_or_compute(image_key, encode)

    def _shared_encoded_image(self, image_key, encode_here, timings: PredictionTimings | None) -> EncodedImage:
        """The features from Redis, or from `encode_here` under the fleet's encode lock (then put in Redis)."""

        def compute():
            encoded = encode_here()
            # A copy: a host OrtValue's .numpy() may share memory the OrtValue frees with it.
            return np.array(encoded.features.numpy()), encoded.width, encoded.height

        features, width, height, from_redis = self.shared_store.features((image_key, self.feature_identity), compute)
        if timings is not None:
            timings.shared_cache_hit = from_redis
        return EncodedImage(key=image_key, features=self.engine.features_from_numpy(features), width=width, height=height)

    # -- the optional on-disk feature cache ---------------------------------------------------------------

    def _disk_path(self, image_key) -> Path | None:
        if self.feature_disk_cache_dir is None:
            return None
        # Features belong to one encoder file: a replaced model must not read the old model's features.
        encoder = self.engine.files["encoder"]
        try:
            modified = os.stat(encoder.path).st_mtime_ns
        except OSError:
            modified = 0
        model_id = f"{encoder.path}|{encoder.size_bytes}|{modified}"
        identity = f"{type(image_key).__name__}|{getattr(image_key, 'kind', '')}|{image_key}|{model_id}|{self.feature_identity}"
        return self.feature_disk_cache_dir / (hashlib.sha256(identity.encode()).hexdigest() + ".npz")

    def _read_disk_features(self, image_key) -> EncodedImage | None:
        path = self._disk_path(image_key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                features = stored["features"]
                width, height = int(stored["width"]), int(stored["height"])
        except Exception as error:  # a truncated or foreign file: encode instead
            logger.warning("ignoring unreadable cached features %s: %s", path.name, error)
            return None
        try:
            os.utime(path)  # recently used: the last to be trimmed
        except OSError:
            pass
        if features.shape != FEATURE_SHAPE:
            return None
        with self._disk_hits_lock:
            self.disk_cache_hits += 1
        return EncodedImage(key=image_key, features=self.engine.features_from_numpy(features), width=width, height=height)

    def _write_disk_features(self, encoded: EncodedImage) -> None:
        path = self._disk_path(encoded.key)
        if path is None:
            return
        half = encoded.features.numpy().astype(np.float16)
        if not np.isfinite(half).all():  # beyond float16's range: keep this image in memory only
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            with open(tmp, "wb") as file:
                np.savez(file, features=half, width=encoded.width, height=encoded.height)
            os.replace(tmp, path)
        except OSError as error:  # a full or read-only disk costs the cache, not the click
            logger.warning("could not write cached features %s: %s", path.name, error)
            tmp.unlink(missing_ok=True)  # may fail too (a read-only folder): encoded_image logs it and goes on
            return
        self._trim_disk_cache()

    def _trim_disk_cache(self) -> None:
        """Remove crashed writers' leftovers, then the least recently used feature files until the folder
        fits its byte budget (writes in progress counted)."""
        files, writing = [], 0
        for path in [*self.feature_disk_cache_dir.glob("*.npz"), *self.feature_disk_cache_dir.glob(".*.tmp")]:
            try:
                stat = path.lstat()
            except OSError:  # removed by another worker meanwhile
                continue
            if path.suffix == ".npz":
                files.append((stat.st_mtime_ns, stat.st_size, path))
            elif time.time() - stat.st_mtime < DISK_CACHE_LEFTOVER_SECONDS:
                writing += stat.st_size
            else:
                try:
                    path.unlink()
                    logger.info("feature disk cache: removed %s, left by a write that never finished", path.name)
                except OSError as error:
                    writing += stat.st_size
                    logger.warning("feature disk cache: cannot remove %s: %s", path.name, error)
        total = writing + sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.feature_disk_cache_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as error:  # not ours to remove (a folder, permissions): skip it
                logger.warning("feature disk cache: cannot remove %s: %s", path.name, error)
                continue
            total -= size

    # -- objects ------------------------------------------------------------------------------------------

    def _click_key(self, clicks: Sequence[Click], frame: ModelFrame) -> ClickKey:
        if not clicks:
            raise RequestError("at least one click is needed")
        if len(clicks) > self.max_clicks:
            raise RequestError(f"{len(clicks)} clicks in one object, over the limit of {self.max_clicks} (MAX_CLICKS)")
        points = np.array([(c.x, c.y) for c in clicks], dtype=np.float64)
        if not np.isfinite(points).all():
            raise RequestError("click coordinates must be finite numbers")
        outside = (points[:, 0] < 0) | (points[:, 0] > frame.width) | (points[:, 1] < 0) | (points[:, 1] > frame.height)
        if outside.any():
            x, y = points[np.argmax(outside)]
            raise RequestError(f"click ({x:g}, {y:g}) is outside the {frame.width}x{frame.height} image")
        model_points = frame.clicks_to_model_frame(points).astype(int)
        return tuple((int(x), int(y), int(c.positive)) for (x, y), c in zip(model_points, clicks))

    def _state_kept(self, key) -> bool:
        return key in self.object_states or (self.shared_store is not None and self.shared_store.has_state(key))

    def _check_decoder_runs(self, image_key, frame: ModelFrame, clicks: ClickKey) -> None:
        """Refuse, before any work, a click whose replay would cost more decoder runs than one request may.
        A state found here may still be unusable or evicted when it is read: `_object_logits` counts again."""
        size = (frame.width, frame.height)
        runs = 0
        while runs < len(clicks) and not self._state_kept((image_key, size, clicks[: len(clicks) - runs])):
            runs += 1
            if runs > self.max_decoder_runs:
                raise self._too_many_decoder_runs(len(clicks))

    def _too_many_decoder_runs(self, clicks: int) -> RequestError:
        return RequestError(
            f"this click would replay more than {self.max_decoder_runs} of its object's {clicks} clicks "
            "(their states are not kept), over the limit of decoder runs per request "
            "(MAX_DECODER_RUNS_PER_REQUEST)"
        )

    def _object_logits(
        self, image: EncodedImage, frame: ModelFrame, clicks: ClickKey, timings: PredictionTimings, depth: int = 0
    ) -> np.ndarray:
        """Logits after this click sequence: one decoder run when the prefix's state is known. A replay keeps
        the states of its last REPLAY_STATES_KEPT prefixes (depth counts back from the request's click), in
        memory and in the shared store."""
        key = (image.key, (frame.width, frame.height), clicks)  # prev_mask depends on the frame's size
        keep = depth < REPLAY_STATES_KEPT

        def decode() -> np.ndarray:
            if self.shared_store is not None:
                stored = self.shared_store.load_state(key)
                if stored is not None:
                    return stored
            if len(clicks) == 1:
                prev_mask = np.zeros((MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
            else:
                # SegNext is trained with the previous prediction's probability, not its logits or its mask;
                # upstream keeps it at the image's size and resizes it back to 1024 for the next click.
                prev_mask = frame.through_frame(self._object_logits(image, frame, clicks[:-1], timings, depth + 1), sigmoid)
            if timings.decoder_runs >= self.max_decoder_runs:  # states that were there at the check are not now
                raise self._too_many_decoder_runs(len(clicks) + depth)
            coords = np.array([(x, y) for x, y, _ in clicks], dtype=np.float32)
            labels = np.array([label for _, _, label in clicks], dtype=np.float32)
            started = time.perf_counter()
            logits = self.engine.decode(image.features, coords, labels, prev_mask)
            timings.decoder_runs += 1
            timings.decoder_ms += (time.perf_counter() - started) * 1000
            if self.shared_store is not None and keep:  # before the click is answered: the next may land elsewhere
                self.shared_store.store_state(key, logits)
            return logits

        if keep:
            return self.object_states.get_or_compute(key, decode)
        kept = self.object_states.get(key)
        return kept if kept is not None else decode()

    def single_click_mask(
        self, image: EncodedImage, click: Click, frame_width: int, frame_height: int, timings: PredictionTimings
    ) -> ObjectMask:
        """The mask of the object under one click on an encoded image: one decoder run, and no click state kept
        (a batch of points is not refined by clicks that follow; keeping its states would push the annotators'
        out of the cache). For batches: encode the image once (`encoded_image`), then call this per point."""
        frame = ModelFrame(frame_width, frame_height)
        ((x, y, label),) = self._click_key([click], frame)
        started = time.perf_counter()
        logits = self.engine.decode(
            image.features,
            np.array([(x, y)], dtype=np.float32),
            np.array([label], dtype=np.float32),
            np.zeros((MODEL_SIZE, MODEL_SIZE), dtype=np.float32),
        )
        timings.decoder_runs += 1
        timings.decoder_ms += (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        object_mask = logits_to_mask(logits, frame, self.mask_threshold)
        timings.postprocess_ms += (time.perf_counter() - started) * 1000
        return object_mask

    def predict(self, image_key: str, clicks: Sequence[Click], frame_width: int, frame_height: int) -> Prediction:
        """The object's mask after these clicks, in the frame_width x frame_height frame the clicks are in.

        The frame may differ from the image's own pixel size (Label Studio may report another size than the
        file has): clicks and mask are then scaled with the frame, since the model sees a stretched image.
        """
        frame = ModelFrame(frame_width, frame_height)
        click_key = self._click_key(clicks, frame)
        timings = PredictionTimings()
        with self._redis_click():
            self._check_decoder_runs(image_key, frame, click_key)
            image = self.encoded_image(image_key, timings)
            logits = self._object_logits(image, frame, click_key, timings)
        started = time.perf_counter()  # the wait for the mask budget counts: it is part of the click's time
        taken = self.mask_budget.acquire(frame.width * frame.height)
        try:
            object_mask = logits_to_mask(logits, frame, self.mask_threshold)
        except BaseException:
            self.mask_budget.release(taken)
            raise
        timings.postprocess_ms = (time.perf_counter() - started) * 1000
        return Prediction(
            object_mask=object_mask,
            image_width=image.width,
            image_height=image.height,
            timings=timings,
            release=weakref.finalize(object_mask.mask, self.mask_budget.release, taken),
            state_key=(image.key, (frame.width, frame.height), click_key),
        )

    def forget(self, prediction: Prediction) -> None:
        """Drop the state a prediction left (in memory and in the shared store): its answer was refused."""
        if prediction.state_key is None:
            return
        self.object_states.discard(prediction.state_key)
        if self.shared_store is not None:
            with self._redis_click():
                self.shared_store.forget_state(prediction.state_key)
