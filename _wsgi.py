"""The backend's process: settings, logging, model files, and the web server.

    python _wsgi.py --host 0.0.0.0 --port 9090      # Flask's threaded server, one process
    gunicorn -c gunicorn.conf.py                    # production: WORKERS processes x THREADS threads

Every setting comes from the environment (see the README); the command line only says where to listen.
Missing model files are downloaded first (by gunicorn's master, once); a model file that cannot be loaded
stops the process with a message that says why, before it listens.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path

from segnext_backend.model_files import ModelFilesError, ensure_model_files
from segnext_backend.settings import Settings, SettingsError

# The Label Studio glue and the engine (and with them ONNX Runtime) are imported in the functions that load
# and serve the models. gunicorn's master imports this module, and a worker forked from a process that has
# imported onnxruntime aborts when it exits (std::system_error "No such process", then SIGABRT).

logger = logging.getLogger("segnext_backend")

DEMO_BANNER = """
###############################################################################
#  DEMO MODE: these are the project's colour-region TEST MODELS, NOT SegNext.  #
#  A click selects the pixels of the clicked colour. Unset DEMO for SegNext.   #
###############################################################################"""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s",
        stream=sys.stderr,
    )


def prepare_model_files(settings: Settings) -> tuple[Path, Path]:
    """Where the encoder and decoder are, downloading them (or building the demo ones) first if needed."""
    if settings.demo:
        from tools.test_models import build_test_models

        return build_test_models(settings.model_dir / "demo")
    ensure_model_files(settings.model_dir, settings.model_url, settings.model_sha256)
    return settings.model_dir / "encoder.onnx", settings.model_dir / "decoder.onnx"


def execution_providers(settings: Settings) -> list[str]:
    """ONNX Runtime providers for DEVICE: CUDA when asked for and available, else the CPU, saying so."""
    if settings.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        logger.warning(
            "DEVICE=cuda but this onnxruntime has no CUDA execution provider (install onnxruntime-gpu, see "
            "requirements-gpu.txt): running on the CPU"
        )
    return ["CPUExecutionProvider"]


def load(settings: Settings) -> None:
    """Load the models into this process (once: every request shares them)."""
    import model
    from segnext_backend.engine import SegNextEngine

    encoder_path, decoder_path = prepare_model_files(settings)
    engine = SegNextEngine(
        encoder_path,
        decoder_path,
        intra_op_threads=settings.intra_op_threads,
        max_concurrent_decodes=settings.max_concurrent_decodes,
        providers=execution_providers(settings),
        encoder_memory_arena=settings.encoder_memory_arena,
        decoder_memory_arena=settings.decoder_memory_arena,
    )
    if engine.is_test_model:
        logger.warning(DEMO_BANNER)
    model.set_runtime(model.build_runtime(settings, engine))
    logger.info("models loaded from %s and %s (%s)", encoder_path, decoder_path, model.get_runtime().model_version)


def create_app(settings: Settings):
    import model
    from api import init_app

    basic_auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    return init_app(model.SegNextBackend, basic_auth=basic_auth, status=model.runtime_status)


def gunicorn_app():
    """gunicorn's app factory: each worker process loads its own models (ONNX sessions do not survive fork)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    load(settings)
    return create_app(settings)


def health_check(settings: Settings) -> int:
    import requests

    headers = {}
    if settings.basic_auth_user:  # sent as UTF-8: requests' own auth= would send a non-ASCII password as Latin-1
        credentials = f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    try:
        response = requests.get(f"http://127.0.0.1:{settings.port}/health", headers=headers, timeout=5)
    except requests.RequestException as error:
        print(f"unhealthy: {type(error).__name__}", file=sys.stderr)
        return 1
    print(response.status_code, response.text[:200])
    return 0 if response.status_code == 200 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SegNext ML backend for Label Studio")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9090, help="port to listen on (default 9090)")
    parser.add_argument("--check", action="store_true", help="fetch and load the models, then exit")
    parser.add_argument(
        "--health-check", action="store_true", help="exit 0 if the backend on PORT answers /health (for Docker)"
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.health_check:
        return health_check(settings)
    configure_logging(settings.log_level)
    logger.info("settings: %s", settings.redacted())
    from segnext_backend.engine import ModelInterfaceError

    try:
        load(settings)
    except (ModelFilesError, ModelInterfaceError, FileNotFoundError) as error:
        logger.error("cannot start: %s", error)
        return 1
    if args.check:
        return 0
    app = create_app(settings)
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
