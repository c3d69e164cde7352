"""gunicorn settings: `gunicorn -c gunicorn.conf.py`. WORKERS, THREADS and PORT come from the environment.

No `preload_app`: ONNX Runtime sessions (and CUDA contexts) must be created in each worker, after the fork.
The model files are fetched once, in the master, before any worker starts; a failed download is retried
there with a growing delay (MODEL_DOWNLOAD_RETRY_SECONDS) while the server does not listen yet.
"""

import signal
import sys

import _wsgi
from segnext_backend.exposure import check_exposure
from segnext_backend.logs import escape_request_text
from segnext_backend.model_files import retry_failed_downloads
from segnext_backend.runtime import prepare_model_files, stop_background_work
from segnext_backend.settings import Settings, SettingsError

_settings = Settings.from_env()

wsgi_app = "_wsgi:gunicorn_app()"
bind = f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
# gthread, except that a request holds a thread only once it has arrived whole, within REQUEST_READ_TIMEOUT,
# and its answer is cut off after RESPONSE_SEND_TIMEOUT: slow clients cannot take every thread.
worker_class = "gunicorn_worker.BufferingThreadWorker"
# A click that must encode its image and replay its clicks on a slow CPU can take a minute: do not kill it.
timeout = 600
graceful_timeout = 30
loglevel = _settings.log_level.lower()
accesslog = "-"


def on_starting(server):
    _wsgi.configure_logging(_settings.log_level)
    # gunicorn's own lines carry request text too: the access log's basic-auth user name, say.
    escape_request_text(server.log.error_log, server.log.access_log)
    try:  # the addresses gunicorn will listen on: `--bind` on the command line overrides HOST and PORT
        check_exposure(_settings, list(server.cfg.bind))
    except SettingsError as error:
        server.log.error("cannot start: %s", error)
        sys.exit(1)
    # gunicorn installs its signal handlers after this hook. Until then SIGTERM (`docker stop`) would do nothing
    # in a container, where this process is PID 1 and the kernel drops signals it has no handler for.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        # A download that fails is tried again later, in this process: exiting would let Docker's restart
        # policy start the ~440 MB download over and over.
        retry_failed_downloads(
            lambda: prepare_model_files(_settings),
            first_delay=_settings.model_download_retry_seconds,
            max_delay=_settings.model_download_retry_max_seconds,
        )
    except Exception as error:  # a clear message and a non-zero exit, not a crash loop of workers
        server.log.error("cannot start: %s", error)
        sys.exit(1)


def post_worker_init(worker):
    # On SIGTERM a worker finishes the clicks in progress (up to graceful_timeout), but must not go on
    # fetching and encoding the images of opened tasks meanwhile: stop that work first, then exit as gunicorn does.
    exit_as_gunicorn_does = signal.getsignal(signal.SIGTERM)

    def stop_background_work_then_exit(signum, frame):
        stop_background_work()  # nothing to stop in a worker that has not loaded its models
        exit_as_gunicorn_does(signum, frame)

    signal.signal(signal.SIGTERM, stop_background_work_then_exit)
