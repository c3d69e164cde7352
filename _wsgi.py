"""The backend's process: settings, logging, model files, and the web server.

    python _wsgi.py --host 0.0.0.0 --port 9090      # Flask's threaded server, one process
    label-studio-ml start . -p 9090                 # the same, as label-studio-ml starts a backend
    gunicorn -c gunicorn.conf.py                    # production: WORKERS processes x THREADS threads
    gunicorn --preload _wsgi:app                    # label-studio-ml's Docker command: workers load on first use

Every setting comes from the environment (see the README); label-studio-ml's command-line flags (-p/--port,
--host, --basic-auth-user, --basic-auth-pass, --log-level, --model-dir) override their variables.
Missing model files are downloaded first (by gunicorn's master, once); a model file that cannot be loaded
stops the process with a message that says why, before it listens.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import sys
from pathlib import Path

from segnext_backend.exposure import check_exposure
from segnext_backend.logs import escape_request_text
from segnext_backend.model_files import ModelFilesError
from segnext_backend.runtime import load, runtime_status
from segnext_backend.settings import Settings, SettingsError

# The Label Studio glue and the engine (and with them ONNX Runtime) are imported in the functions that load
# and serve the models. gunicorn's master imports this module, and a worker forked from a process that has
# imported onnxruntime aborts when it exits (std::system_error "No such process", then SIGABRT).

logger = logging.getLogger("segnext_backend")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s",
        stream=sys.stderr,
    )
    # Task ids, labels, URLs and error messages come from requests: a newline in one must not start a line.
    escape_request_text(logging.getLogger())


def create_app(settings: Settings):
    from api import init_app
    from model import SegNextBackend

    basic_auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    return init_app(SegNextBackend, basic_auth=basic_auth, status=runtime_status, settings=settings)


def gunicorn_app():
    """gunicorn's app factory: each worker process loads its own models (ONNX sessions do not survive fork)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    load(settings)
    return create_app(settings)


def __getattr__(name: str):
    # `gunicorn _wsgi:app`, the command of label-studio-ml's Docker template, with or without --preload: the
    # app is made when it is asked for, not at import (gunicorn.conf.py imports this module too), and it
    # loads the models in the worker on first use (segnext_backend.runtime.start_loading), never in the master.
    if name == "app":
        global app
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        app = create_app(settings)
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: label-studio-ml's flags (`label-studio-ml start DIR -p 9090` passes them on) and ours."""
    parser = argparse.ArgumentParser(description="SegNext ML backend for Label Studio")
    parser.add_argument("--host", help="address to listen on (default: HOST, 0.0.0.0)")
    parser.add_argument("-p", "--port", type=_port, help="port to listen on (default: PORT, 9090)")
    parser.add_argument("--basic-auth-user", help="protect every route with basic auth (BASIC_AUTH_USER)")
    parser.add_argument("--basic-auth-pass", help="the basic auth password (BASIC_AUTH_PASS)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(LOG_LEVEL)")
    parser.add_argument("--model-dir", type=Path, help="folder of encoder.onnx and decoder.onnx (MODEL_DIR)")
    parser.add_argument("--check", action="store_true", help="fetch and load the models, then exit")
    parser.add_argument(
        "--health-check", action="store_true", help="exit 0 if the backend on PORT answers /health (for Docker)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment's settings, with the values given on the command line in place of their variables."""
    flags = {
        "host": args.host,
        "port": args.port,
        "basic_auth_user": args.basic_auth_user,
        "basic_auth_pass": args.basic_auth_pass,
        "log_level": args.log_level,
        "model_dir": args.model_dir,
    }
    given = {name: value for name, value in flags.items() if value is not None}
    return dataclasses.replace(Settings.from_env(), **given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.health_check:
        return health_check(settings)
    if not args.check:
        try:
            check_exposure(settings, [settings.host])
        except SettingsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level)
    logger.info("settings: %s", settings.redacted())
    from segnext_backend.device import DeviceError
    from segnext_backend.engine import ModelInterfaceError

    try:
        load(settings)
    except (ModelFilesError, ModelInterfaceError, FileNotFoundError, DeviceError) as error:
        logger.error("cannot start: %s", error)
        return 1
    if args.check:
        return 0
    create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
