"""The process's runtime: what every request of one process shares, how it is built, loaded and reported.

A `Runtime` holds the image source, the segmenter (and through it the ONNX sessions and caches) and the
pre-encoder. It is built once per process and kept here, at module level, because label-studio-ml makes a new
model instance for every request. `load(settings)` builds it before a server listens (`_wsgi.py`); under any
other server (label-studio-ml's own `init_app(model_class=...)`, `gunicorn --preload`) the first request that
needs it loads it (`get_runtime`, `start_loading`), in the process that serves: never in a parent that forks
workers, since ONNX Runtime's sessions and threads do not survive a fork.

ONNX Runtime, the engine and the segmenter are imported inside the functions that load them: a server that
imports this module and then forks its workers must not have imported onnxruntime, or every worker aborts when
it exits (std::system_error "No such process", then SIGABRT).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from segnext_backend.errors import NotReadyError
from segnext_backend.images import ImageFetchConfig, ImageSource, abort_download
from segnext_backend.model_files import ensure_model_files, file_sha256
from segnext_backend.preencode import PreEncoder
from segnext_backend.settings import Settings

if TYPE_CHECKING:
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.segmenter import InteractiveSegmenter

logger = logging.getLogger(__name__)

SEGNEXT_VERSION = "segnext-vitb-sax2-hq44k"
DEMO_VERSION = "demo-colour-region-NOT-SegNext"

DEMO_BANNER = """
###############################################################################
#  DEMO MODE: these are the project's colour-region TEST MODELS, NOT SegNext.  #
#  A click selects the pixels of the clicked colour. Unset DEMO for SegNext.   #
###############################################################################"""

# A failed load (model files that cannot be fetched, say) is tried again after this long, not on every request.
LOAD_RETRY_SECONDS = 60.0


@dataclass
class Runtime:
    """What every request of the process shares."""

    settings: Settings
    image_source: ImageSource
    segmenter: InteractiveSegmenter
    model_version: str
    model_sha256: dict  # role -> SHA-256 of the loaded file, for /health
    pre_encoder: PreEncoder


# -- building one ---------------------------------------------------------------------------------------------


def prepare_model_files(settings: Settings) -> tuple[Path, Path]:
    """Where the encoder and decoder are, downloading them (or building the demo ones) first if needed."""
    if settings.demo:
        from segnext_backend.demo_models import build_demo_models

        return build_demo_models(settings.model_dir / "demo")
    ensure_model_files(settings.model_dir, settings.model_url, settings.model_sha256)
    return settings.model_dir / "encoder.onnx", settings.model_dir / "decoder.onnx"


def build_runtime(settings: Settings, engine: SegNextEngine) -> Runtime:
    """The image source, segmenter and pre-encoder that these settings make around `engine`."""
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
            max_reference_length=settings.max_image_url_length,
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
            click_budget_seconds=settings.redis_click_budget_seconds,
            encode_wait_seconds=settings.redis_encode_wait_seconds,
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
        feature_settings={"fast_jpeg_decode": settings.fast_jpeg_decode},
        mask_pixel_budget=settings.mask_pixel_budget,
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


def load_runtime(settings: Settings) -> Runtime:
    """The model files fetched, the engine on the chosen device, and the runtime around it (tools.evaluate
    measures the backend through this same path)."""
    from segnext_backend.device import choose_execution_providers
    from segnext_backend.engine import SegNextEngine

    encoder_path, decoder_path = prepare_model_files(settings)
    engine = SegNextEngine(
        encoder_path,
        decoder_path,
        intra_op_threads=settings.intra_op_threads,
        max_concurrent_decodes=settings.max_concurrent_decodes,
        providers=choose_execution_providers(
            settings.device, openvino_precision=settings.openvino_precision, threads=settings.intra_op_threads
        ),
        encoder_memory_arena=settings.encoder_memory_arena,
        decoder_memory_arena=settings.decoder_memory_arena,
    )
    if engine.is_test_model:
        logger.warning(DEMO_BANNER)
    runtime = build_runtime(settings, engine)
    logger.info("models loaded from %s and %s (%s)", encoder_path, decoder_path, runtime.model_version)
    return runtime


# -- this process's runtime -----------------------------------------------------------------------------------

_runtime: Runtime | None = None
_load_lock = threading.Lock()
_load: Future | None = None  # this process's load of the models, once started
_load_started = 0.0


def load(settings: Settings) -> None:
    """Load the models into this process now (once: every request shares them)."""
    set_runtime(load_runtime(settings))


def set_runtime(runtime: Runtime | None) -> None:
    """Make `runtime` this process's (None: the next request that needs the models loads them again)."""
    global _runtime, _load
    with _load_lock:
        if _runtime is not None and _runtime is not runtime:
            _runtime.pre_encoder.stop()
        _runtime = runtime
        if runtime is None:
            _load = None


def loaded_runtime() -> Runtime | None:
    """This process's runtime if it is loaded, without starting a load."""
    return _runtime


def current_settings() -> Settings:
    """The loaded runtime's settings, or before the models are in, the environment's (those the load will use)."""
    runtime = _runtime
    return runtime.settings if runtime is not None else Settings.from_env()


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

    One load per process at a time, with the settings of the environment; a failed one is started again after
    LOAD_RETRY_SECONDS.
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
        load(Settings.from_env())
        done.set_result(_runtime)
    except BaseException as error:  # noqa: BLE001 - every failure goes to the requests that wait for the load
        logger.error("the models could not be loaded: %s", error)
        done.set_exception(error)


def _forget_runtime_in_forked_child() -> None:
    # ONNX Runtime sessions and their threads do not survive a fork: a forked worker loads its own.
    global _runtime, _load, _load_lock
    _runtime, _load, _load_lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_runtime_in_forked_child)


# -- what /health and /metrics report -------------------------------------------------------------------------

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
        "warnings": shared_status.get("warnings", []),
    }
