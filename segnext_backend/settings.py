"""Every setting of the backend, read from the environment once.

`Settings.from_env()` is the only place in the project that reads `os.environ`; everything else receives the
values it needs. Each field's comment is what the README's settings table says about it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

DEFAULT_MODEL_URL = (
    "https://github.com/darktable-org/darktable-ai/releases/download/release-5.6.0/"
    "mask-object-segnext-b2hq.dtmodel"
)
DEFAULT_MODEL_SHA256 = "87936f12f815e05c6f601be5e46d69ce2e52c788ae2c26ec7e3db39d33780857"

MIB = 1024 * 1024
DEVICES = ("cpu", "cuda", "auto", "openvino")  # segnext_backend/device.py says what each means
OPENVINO_PRECISIONS = ("bf16", "f32")

# The region kinds the backend can answer, by the name REGION_CONTROL_ORDER uses for each.
REGION_KINDS = ("brush", "polygon", "rectangle")


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    # Label Studio that the tasks come from: its URL resolves relative image paths (/data/upload/...),
    # and the API key is sent to that host only.
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    # Label Studio's local file storage: read /data/local-files/?d=... from this folder (never outside it)
    # instead of through Label Studio. Empty: fetch them from Label Studio.
    local_files_document_root: str = ""
    # Fetch images from hosts on loopback, link-local or private addresses (the Label Studio host always is).
    allow_private_image_hosts: bool = False
    # Basic auth for this backend's own routes (both empty: no auth).
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    log_level: str = "INFO"
    # Under gunicorn: processes, and threads per process. Each process loads its own models and caches,
    # so one process with several threads is the default: every click then finds its image's features.
    workers: int = 1
    threads: int = 8
    port: int = 9090
    # Where encoder.onnx and decoder.onnx live, and where to fetch them from when they are missing.
    model_dir: Path = Path("models")
    model_url: str = DEFAULT_MODEL_URL
    model_sha256: str = DEFAULT_MODEL_SHA256
    # Under gunicorn, a failed model download is tried again after this many seconds, then after twice as long
    # each time, at most the maximum: the server waits instead of exiting into a restart loop. 0: exit at once.
    model_download_retry_seconds: float = 60.0
    model_download_retry_max_seconds: float = 3600.0
    # Serve the project's colour-region test models instead of SegNext (for trying the backend out).
    demo: bool = False
    # A pixel is in the mask where the predicted probability is more than this (upstream: `> 0.49`).
    mask_threshold: float = 0.49
    # Bytes of image features kept in memory (12.6 MB per image for SegNext), least recently used out first.
    feature_cache_bytes: int = 1024 * MIB
    # Bytes of per-object click state (4 MB per click sequence), least recently used out first.
    object_state_cache_bytes: int = 512 * MIB
    # Images over this many pixels are refused before they are decoded.
    max_image_pixels: int = 100_000_000
    # Downloads over this many bytes are refused.
    max_image_bytes: int = 100 * MIB
    # A task's image reference (URL, path, cloud URI) longer than this many characters is refused: each
    # place is remembered (for IMAGE_REVALIDATE_SECONDS), in at most 64 MiB over all places.
    max_image_url_length: int = 16384
    # Bytes of downloaded image files kept, so that an image whose features were evicted is not fetched again.
    download_cache_bytes: int = 256 * MIB
    # Decode large JPEGs at a reduced size (Pillow's draft, never below 1024 px): faster, but not the input
    # upstream SegNext sees, so off by default (docs/performance.md says how far it moves).
    fast_jpeg_decode: bool = False
    image_connect_timeout: float = 5.0
    image_read_timeout: float = 30.0
    # A whole image download (redirects, retries, every read) ends after this many seconds: a host that
    # trickles bytes cannot hold a thread longer.
    image_download_timeout: float = 120.0
    # What is at an image's place (URL, local path, cloud URI) is trusted this long after it was checked;
    # then it is checked again (conditional GET, stat), so changed content gets new features within it.
    image_revalidate_seconds: float = 60.0
    # Image pixels decoded and held (until encoded) at once over all requests; larger decodes wait.
    decode_pixel_budget: int = 100_000_000
    # More clicks than this in one request are refused.
    max_clicks: int = 100
    # Decoder runs one request may cost (replaying clicks whose states are not kept); more are refused.
    max_decoder_runs_per_request: int = 20
    # Tasks in one request; more are refused (a request without clicks queues their images for encoding).
    max_tasks_per_request: int = 100
    # Images waiting to be encoded in the background; when full, the oldest waiting one is dropped.
    preencode_queue_length: int = 16
    # Label configs larger than this are refused (each distinct config is parsed once, then cached).
    max_label_config_bytes: int = 1 * MIB
    # ONNX Runtime threads for one model run; 0 means one per physical core.
    intra_op_threads: int = 0
    # ONNX Runtime's CPU memory arena per model: the encoder's keeps ~2.4 GB resident for a 5-10 % faster encode
    # (off), the decoder's ~2.2 GB for ~20 % faster clicks (on). See docs/performance.md.
    encoder_memory_arena: bool = False
    decoder_memory_arena: bool = True
    # A folder for image features as float16 files (6.3 MB per image), reused after a restart or eviction and
    # shared by worker processes. Empty: off. Kept under feature_disk_cache_bytes, least recently used out first.
    feature_disk_cache_dir: str = ""
    feature_disk_cache_bytes: int = 4096 * MIB
    # "cpu"; "cuda": ONNX Runtime's CUDA execution provider or refuse to start; "auto": the GPU when it works,
    # else the CPU with a warning; "openvino": ONNX Runtime's OpenVINO execution provider on the CPU (its own
    # build of ONNX Runtime, requirements-openvino.txt) or refuse to start (segnext_backend/device.py).
    device: str = "cpu"
    # What OpenVINO computes in: "bf16" (where the CPU has AVX512_BF16 or AMX; elsewhere f32, with a warning)
    # or "f32". Only with DEVICE=openvino.
    openvino_precision: str = "bf16"
    # How many decoder runs may go at once; the rest wait their turn (each holds ~1 GB on SegNext).
    max_concurrent_decodes: int = 1
    # Redis shared by every backend process (redis://host:6379/0): image features and object click states are
    # kept there too, so any process can serve any click. Empty: off (each process keeps its own).
    redis_url: str = ""
    # Entries in Redis expire this long after they were last read or written.
    redis_ttl_seconds: int = 3600
    # Seconds to connect to Redis and for each reply: a slow Redis costs a click at most this, then is skipped.
    redis_socket_timeout: float = 1.0
    # After a Redis failure, serve from this process's caches alone this long before trying Redis again.
    redis_retry_seconds: float = 10.0
    # Redis time one click may spend (all its calls together); then it goes on without Redis, and /health and
    # /metrics report Redis as slow. A click spends at most this, the call in flight when it ran out (bounded by
    # REDIS_SOCKET_TIMEOUT) and the release of an encode lock it holds in Redis calls.
    redis_click_budget_seconds: float = 1.0
    # How long a click waits for another process's encode of its image (that process holds the image's encode
    # lock) before encoding it itself: a holder that hangs but lives keeps renewing its lock.
    redis_encode_wait_seconds: float = 180.0
    # Which control answers a click when several on the image carry its label: the first kind in this order
    # that has one. Kinds left out are never answered. Brush first: the mask as it is, as before polygons.
    region_control_order: tuple[str, ...] = REGION_KINDS
    # Polygons: the most an answered outline may stray from the mask's pixel-edge outline, in image pixels
    # (Douglas-Peucker; docs/performance.md measures vertices against IoU), and the smallest part answered,
    # in pixels (smaller parts are left out, smaller holes filled).
    polygon_tolerance: float = 1.5
    polygon_min_area: float = 25.0
    # Under gunicorn (gunicorn_worker.py): a request must arrive whole (headers and body) within
    # request_read_timeout seconds of its first byte, and each answer be taken by the client within
    # response_send_timeout seconds; otherwise its connection is closed. Until it is whole, a request holds
    # no thread.
    request_read_timeout: float = 30.0
    response_send_timeout: float = 30.0
    # Request bodies larger than these are refused (413) before they are read, per route: a click is a few KB,
    # a task list with drafts carrying brush RLEs more; /setup carries the label config.
    max_predict_body_bytes: int = 16 * MIB
    max_setup_body_bytes: int = 2 * MIB
    max_webhook_body_bytes: int = 1 * MIB
    # Bytes of request bodies held at once over all connections (received, being parsed): more are refused
    # with a 503 while gunicorn receives them, and wait their turn to be parsed.
    request_body_budget_bytes: int = 64 * MIB
    # Address to listen on (gunicorn.conf.py; `_wsgi.py --host` overrides it).
    host: str = "0.0.0.0"
    # Listen beyond loopback with LABEL_STUDIO_API_KEY set and no basic auth: whoever reaches the port then gets
    # Label Studio's images through the key. Off: the backend refuses to start that way.
    allow_open_access: bool = False
    # The most brush RLE bytes one answer may take (a speckled mask's can take tens of megabytes, several
    # times that as JSON); a mask over it gets a 422 naming this setting. Real objects take a few kilobytes.
    max_brush_rle_bytes: int = 4 * MIB
    # The most polygon vertices one answer may have, all its polygons together: a bristly mask's outline is
    # simplified further (POLYGON_TOLERANCE doubled until it fits), or refused with a 422 if it cannot fit
    # (before tracing, if its outline has more than 50 corners per vertex allowed).
    max_polygon_vertices: int = 20_000
    # Frame pixels whose masks are made and answered (resize, threshold, RLE, polygons) at once over all
    # requests, a few bytes per pixel each; larger ones wait their turn.
    mask_pixel_budget: int = 100_000_000
    # Batch pre-annotation (README, "Masks for points"): the task data field that may carry points imported with
    # the tasks; the most points of one task made into masks (each costs a decoder run; a task with more is
    # reported, not segmented); and how long one /predict without clicks may spend on points, so that it
    # answers before Label Studio gives up on it (ML_TIMEOUT_PREDICT, 100 s by default): the tasks not reached
    # are reported, and the next "Retrieve Predictions" continues with them.
    points_data_field: str = "points"
    max_points_per_task: int = 100
    batch_predict_seconds: float = 80.0

    def __post_init__(self):
        # Half a basic-auth configuration would leave the backend open (or open to any password) without a
        # word; checked here, so that the command line's --basic-auth-user/--basic-auth-pass count too.
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            given, missing = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if self.basic_auth_user else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER")
            raise SettingsError(f"{given} is set but {missing} is empty: set both for basic auth, or neither")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, default).strip()

        def number(name: str, default, kind, minimum):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                value = kind(raw.strip())
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
            if value < minimum:
                raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")

        threshold = number("MASK_THRESHOLD", defaults.mask_threshold, float, 0.0)
        if not 0.0 < threshold < 1.0:
            raise SettingsError(f"MASK_THRESHOLD={threshold} must be between 0 and 1")
        device = text("DEVICE", defaults.device).lower()
        if device not in DEVICES:
            raise SettingsError(f"DEVICE={device!r} must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
        openvino_precision = text("OPENVINO_PRECISION", defaults.openvino_precision).lower()
        if openvino_precision not in OPENVINO_PRECISIONS:
            raise SettingsError(f"OPENVINO_PRECISION={openvino_precision!r} must be {' or '.join(OPENVINO_PRECISIONS)}")
        order = tuple(kind.strip().lower() for kind in (text("REGION_CONTROL_ORDER", "") or ",".join(REGION_KINDS)).split(","))
        if not set(order) <= set(REGION_KINDS) or len(set(order)) != len(order):
            raise SettingsError(
                f"REGION_CONTROL_ORDER={','.join(order)!r} must list some of {', '.join(REGION_KINDS)}, each once"
            )
        polygon_tolerance = number("POLYGON_TOLERANCE", defaults.polygon_tolerance, float, 0.0)
        polygon_min_area = number("POLYGON_MIN_AREA", defaults.polygon_min_area, float, 0.0)
        for name, value in (("POLYGON_TOLERANCE", polygon_tolerance), ("POLYGON_MIN_AREA", polygon_min_area)):
            if not math.isfinite(value):
                raise SettingsError(f"{name}={value} must be a finite number")
        return cls(
            # LABEL_STUDIO_HOST and LABEL_STUDIO_ACCESS_TOKEN: the names label-studio-ml's examples use.
            label_studio_url=(text("LABEL_STUDIO_URL", "") or text("LABEL_STUDIO_HOST", "")).rstrip("/"),
            label_studio_api_key=text("LABEL_STUDIO_API_KEY", "") or text("LABEL_STUDIO_ACCESS_TOKEN", ""),
            local_files_document_root=text("LOCAL_FILES_DOCUMENT_ROOT", ""),
            allow_private_image_hosts=flag("ALLOW_PRIVATE_IMAGE_HOSTS", defaults.allow_private_image_hosts),
            basic_auth_user=text("BASIC_AUTH_USER", ""),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            log_level=text("LOG_LEVEL", defaults.log_level).upper(),
            workers=number("WORKERS", defaults.workers, int, 1),
            threads=number("THREADS", defaults.threads, int, 1),
            port=number("PORT", defaults.port, int, 1),
            model_dir=Path(text("MODEL_DIR", str(defaults.model_dir))),
            model_url=text("MODEL_URL", defaults.model_url),
            model_sha256=text("MODEL_SHA256", defaults.model_sha256).lower(),
            model_download_retry_seconds=number(
                "MODEL_DOWNLOAD_RETRY_SECONDS", defaults.model_download_retry_seconds, float, 0.0
            ),
            model_download_retry_max_seconds=number(
                "MODEL_DOWNLOAD_RETRY_MAX_SECONDS", defaults.model_download_retry_max_seconds, float, 0.0
            ),
            demo=flag("DEMO", defaults.demo),
            mask_threshold=threshold,
            feature_cache_bytes=number("FEATURE_CACHE_BYTES", defaults.feature_cache_bytes, int, 0),
            object_state_cache_bytes=number(
                "OBJECT_STATE_CACHE_BYTES", defaults.object_state_cache_bytes, int, 0
            ),
            max_image_pixels=number("MAX_IMAGE_PIXELS", defaults.max_image_pixels, int, 1),
            max_image_bytes=number("MAX_IMAGE_BYTES", defaults.max_image_bytes, int, 1),
            max_image_url_length=number("MAX_IMAGE_URL_LENGTH", defaults.max_image_url_length, int, 1),
            download_cache_bytes=number("DOWNLOAD_CACHE_BYTES", defaults.download_cache_bytes, int, 0),
            fast_jpeg_decode=flag("FAST_JPEG_DECODE", defaults.fast_jpeg_decode),
            image_connect_timeout=number("IMAGE_CONNECT_TIMEOUT", defaults.image_connect_timeout, float, 0.1),
            image_read_timeout=number("IMAGE_READ_TIMEOUT", defaults.image_read_timeout, float, 0.1),
            image_download_timeout=number("IMAGE_DOWNLOAD_TIMEOUT", defaults.image_download_timeout, float, 0.1),
            image_revalidate_seconds=number("IMAGE_REVALIDATE_SECONDS", defaults.image_revalidate_seconds, float, 0.0),
            decode_pixel_budget=number("DECODE_PIXEL_BUDGET", defaults.decode_pixel_budget, int, 1),
            max_brush_rle_bytes=number("MAX_BRUSH_RLE_BYTES", defaults.max_brush_rle_bytes, int, 1),
            max_polygon_vertices=number("MAX_POLYGON_VERTICES", defaults.max_polygon_vertices, int, 3),
            mask_pixel_budget=number("MASK_PIXEL_BUDGET", defaults.mask_pixel_budget, int, 1),
            max_clicks=number("MAX_CLICKS", defaults.max_clicks, int, 1),
            max_decoder_runs_per_request=number(
                "MAX_DECODER_RUNS_PER_REQUEST", defaults.max_decoder_runs_per_request, int, 1
            ),
            max_tasks_per_request=number("MAX_TASKS_PER_REQUEST", defaults.max_tasks_per_request, int, 1),
            preencode_queue_length=number("PREENCODE_QUEUE_LENGTH", defaults.preencode_queue_length, int, 0),
            max_label_config_bytes=number("MAX_LABEL_CONFIG_BYTES", defaults.max_label_config_bytes, int, 1),
            intra_op_threads=number("ORT_INTRA_OP_THREADS", defaults.intra_op_threads, int, 0),
            device=device,
            openvino_precision=openvino_precision,
            encoder_memory_arena=flag("ORT_ENCODER_MEMORY_ARENA", defaults.encoder_memory_arena),
            decoder_memory_arena=flag("ORT_DECODER_MEMORY_ARENA", defaults.decoder_memory_arena),
            feature_disk_cache_dir=text("FEATURE_DISK_CACHE_DIR", ""),
            feature_disk_cache_bytes=number("FEATURE_DISK_CACHE_BYTES", defaults.feature_disk_cache_bytes, int, 0),
            max_concurrent_decodes=number("MAX_CONCURRENT_DECODES", defaults.max_concurrent_decodes, int, 1),
            redis_url=text("REDIS_URL", ""),
            redis_ttl_seconds=number("REDIS_TTL_SECONDS", defaults.redis_ttl_seconds, int, 1),
            redis_socket_timeout=number("REDIS_SOCKET_TIMEOUT", defaults.redis_socket_timeout, float, 0.01),
            redis_retry_seconds=number("REDIS_RETRY_SECONDS", defaults.redis_retry_seconds, float, 0.0),
            redis_click_budget_seconds=number(
                "REDIS_CLICK_BUDGET_SECONDS", defaults.redis_click_budget_seconds, float, 0.01
            ),
            redis_encode_wait_seconds=number("REDIS_ENCODE_WAIT_SECONDS", defaults.redis_encode_wait_seconds, float, 0.0),
            region_control_order=order,
            polygon_tolerance=polygon_tolerance,
            polygon_min_area=polygon_min_area,
            request_read_timeout=number("REQUEST_READ_TIMEOUT", defaults.request_read_timeout, float, 0.1),
            response_send_timeout=number("RESPONSE_SEND_TIMEOUT", defaults.response_send_timeout, float, 0.1),
            max_predict_body_bytes=number("MAX_PREDICT_BODY_BYTES", defaults.max_predict_body_bytes, int, 1),
            max_setup_body_bytes=number("MAX_SETUP_BODY_BYTES", defaults.max_setup_body_bytes, int, 1),
            max_webhook_body_bytes=number("MAX_WEBHOOK_BODY_BYTES", defaults.max_webhook_body_bytes, int, 1),
            request_body_budget_bytes=number("REQUEST_BODY_BUDGET_BYTES", defaults.request_body_budget_bytes, int, 1),
            host=text("HOST", defaults.host) or defaults.host,
            allow_open_access=flag("ALLOW_OPEN_ACCESS", defaults.allow_open_access),
            points_data_field=text("POINTS_DATA_FIELD", defaults.points_data_field),
            max_points_per_task=number("MAX_POINTS_PER_TASK", defaults.max_points_per_task, int, 1),
            batch_predict_seconds=number("BATCH_PREDICT_SECONDS", defaults.batch_predict_seconds, float, 1.0),
        )

    def redacted(self) -> dict:
        """The settings as a dict fit for a log line: secrets are replaced by whether they are set."""
        secret = {"label_studio_api_key", "basic_auth_pass"}
        shown = {
            f.name: ("<set>" if getattr(self, f.name) else "<empty>") if f.name in secret else str(getattr(self, f.name))
            for f in fields(self)
        }
        shown["redis_url"] = redact_url(self.redis_url)  # may carry a password
        shown["label_studio_url"] = redact_url(self.label_studio_url)  # so may this
        return shown
