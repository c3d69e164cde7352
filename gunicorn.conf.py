"""gunicorn settings: `gunicorn -c gunicorn.conf.py`. WORKERS, THREADS and PORT come from the environment.

No `preload_app`: ONNX Runtime sessions (and CUDA contexts) must be created in each worker, after the fork.
The model files are fetched once, in the master, before any worker starts.
"""

import sys

import _wsgi
from segnext_backend.settings import Settings

_settings = Settings.from_env()

wsgi_app = "_wsgi:gunicorn_app()"
bind = f"0.0.0.0:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# A click that must encode its image and replay its clicks on a slow CPU can take a minute: do not kill it.
timeout = 600
graceful_timeout = 30
loglevel = _settings.log_level.lower()
accesslog = "-"


def on_starting(server):
    _wsgi.configure_logging(_settings.log_level)
    try:
        _wsgi.prepare_model_files(_settings)
    except Exception as error:  # a clear message and a non-zero exit, not a crash loop of workers
        server.log.error("cannot start: %s", error)
        sys.exit(1)
