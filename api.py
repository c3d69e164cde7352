"""The HTTP routes Label Studio calls, with the request and response shapes of label-studio-ml 2.x.

label-studio-ml's PyPI release (1.0.9) gives us `LabelStudioMLBase`, but its Flask app is not usable as it
is: it needs Flask 1, refuses `/predict` until `/setup` has been called (after a restart Label Studio sends
`/predict` first), ignores the label config that each `/predict` carries, and answers every error as a 500.
This app keeps label-studio-ml 2.x's contract instead: a backend instance per request built from the
request's own label config, `predict(tasks, context=...)`, `{"results": [...]}`; and it answers bad input
with a 4xx and a JSON message naming what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from typing import Callable

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from segnext_backend.budgets import PixelBudget
from segnext_backend.errors import RequestError, TooLargeError
from segnext_backend.limits import BODY_LIMIT_SETTINGS, body_limit, body_too_large
from segnext_backend.settings import Settings

logger = logging.getLogger(__name__)

_READ_CHUNK = 1024 * 1024


def _json_body(settings: Settings, body_budget: PixelBudget) -> dict:
    """The request's JSON object, read only up to its route's limit, from the Content-Length before reading.

    A body being parsed costs many times its size (a 64 MB body took 1.7 GB), so bodies take their bytes from
    REQUEST_BODY_BUDGET_BYTES before they are read, and keep them until the request is answered; the rest
    wait their turn. A chunked body without Content-Length counts as its route's limit."""
    limit, setting = body_limit(settings, request.path)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLargeError(body_too_large(declared, limit, setting))
    g.body_bytes_taken = g.get("body_bytes_taken", 0) + body_budget.acquire(declared if declared is not None else limit)
    received = bytearray()
    while len(received) <= limit:
        chunk = request.stream.read(min(_READ_CHUNK, limit + 1 - len(received)))
        if not chunk:
            break
        received += chunk
    if len(received) > limit:
        raise TooLargeError(body_too_large(None, limit, setting))
    try:
        body = json.loads(received)
    except RecursionError:  # JSON nested deeper than Python's parser goes
        raise RequestError("the request body is JSON nested too deeply") from None
    except ValueError:  # not JSON, or not UTF-8
        body = None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _project_id(body: dict) -> str | None:
    project = body.get("project")
    return str(project).split(".", 1)[0] if project is not None else None


def basic_credentials_match(header: str | None, user: str, password: str) -> bool:
    """Whether an `Authorization: Basic ...` header carries this user and password.

    Compared as bytes, in UTF-8 (curl, browsers, Docker's health check here) or in Latin-1 (python-requests,
    and so Label Studio, encodes a str password that way), so that a non-ASCII password works from both.
    """
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    matches = False
    for encoding in ("utf-8", "latin-1"):
        try:
            expected = f"{user}:{password}".encode(encoding)
        except UnicodeEncodeError:
            continue
        matches |= hmac.compare_digest(given, expected)
    return matches


def init_app(
    model_class,
    *,
    basic_auth: tuple[str, str] | None = None,
    status: Callable[[], dict],
    settings: Settings | None = None,
) -> Flask:
    """The Flask app serving `model_class`.

    `status()` describes the loaded models for /health and /metrics; it raises NotReadyError while there are
    none. `basic_auth` (user, password) protects every route, as Label Studio's ML backend settings expect.
    `settings` gives the request body limits (the defaults when None).
    """
    settings = settings or Settings()
    body_budget = PixelBudget(settings.request_body_budget_bytes)  # bytes, here
    app = Flask(__name__)
    # A backstop only: each route's own limit is checked first, with a message naming its setting.
    app.config["MAX_CONTENT_LENGTH"] = max(getattr(settings, field) for field, _ in BODY_LIMIT_SETTINGS.values())

    def json_body() -> dict:
        return _json_body(settings, body_budget)

    @app.teardown_request
    def give_back_body_bytes(_error):
        taken = g.pop("body_bytes_taken", 0)
        if taken:
            body_budget.release(taken)

    def make_model(body: dict, label_config_key: str):
        label_config = body.get(label_config_key)
        if label_config is not None and not isinstance(label_config, str):
            raise RequestError(f"{label_config_key} must be a string of XML")
        return model_class(project_id=_project_id(body), label_config=label_config)  # a bad config: RequestError

    if basic_auth:
        user, password = basic_auth

        @app.before_request
        def require_basic_auth():
            if not basic_credentials_match(request.headers.get("Authorization"), user, password):
                response = jsonify(error="authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="segnext-backend"'
                return response
            return None

    @app.post("/predict")
    def predict():
        body = json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError("params must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise RequestError("params.context must be an object or null")
        model = make_model(body, "label_config")
        results = model.predict(tasks, context=context)
        return jsonify(results=results, model_version=model.model_version)

    @app.post("/setup")
    def setup():
        body = json_body()
        # Label Studio calls /setup when a model is added or validated: a config that cannot work is refused
        # there, where the person adding the model sees it.
        model = make_model(body, "schema")
        return jsonify(model_version=model.setup_model_version())

    @app.post("/webhook")
    def webhook():
        # Nothing to train: SegNext is used as it is. Acknowledge so that Label Studio does not retry.
        body = json_body()
        return jsonify(status="ok", action=body.get("action")), 200

    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify(status="UP", model_class=model_class.__name__, **status())

    @app.get("/metrics")
    def metrics():
        return jsonify(status())

    @app.errorhandler(RequestError)
    def request_error(error: RequestError):
        logger.info("%s %s -> %d: %s", request.method, request.path, error.http_status, error)
        return jsonify(error=str(error)), error.http_status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=error.description), error.code

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        logger.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error: {type(error).__name__}"), 500

    return app
