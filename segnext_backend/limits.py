"""Bounds on what one request may ask for, checked before any work is done for it."""

from __future__ import annotations

from .errors import RequestError


def check_frame_size(width: int, height: int, max_pixels: int) -> None:
    """The frame a mask is answered in (Label Studio's original_width x original_height) is built and
    RLE-encoded at full size: it is held to the same pixel limit as images, before any mask exists."""
    if width * height > max_pixels:
        raise RequestError(
            f"original_width x original_height = {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (MAX_IMAGE_PIXELS)"
        )


# Request bodies: each route takes what it needs, and no more. Under gunicorn the worker (gunicorn_worker.py)
# refuses a larger body from its headers before receiving it; the app checks again (under `python _wsgi.py`).
BODY_LIMIT_SETTINGS = {
    "/predict": ("max_predict_body_bytes", "MAX_PREDICT_BODY_BYTES"),
    "/setup": ("max_setup_body_bytes", "MAX_SETUP_BODY_BYTES"),
    "/webhook": ("max_webhook_body_bytes", "MAX_WEBHOOK_BODY_BYTES"),
}
OTHER_ROUTES_BODY_BYTES = 64 * 1024  # the other routes take no body


def body_limit(settings, path: str) -> tuple[int, str]:
    """The most bytes of body that a request to `path` may carry, and the setting that raises it."""
    field, variable = BODY_LIMIT_SETTINGS.get(path.rstrip("/") or "/", (None, None))
    if field is None:
        return OTHER_ROUTES_BODY_BYTES, f"{path} takes no request body"
    return getattr(settings, field), variable


def body_too_large(size: int | None, limit: int, setting: str) -> str:
    """The message of the 413 for a body over its route's limit (`size` None: not known before reading)."""
    over = f"is {size} bytes, over" if size is not None else "is over"
    return f"the request body {over} the limit of {limit} ({setting})"


def body_budget_exhausted(budget: int) -> str:
    return (
        f"request bodies being received fill the budget of {budget} bytes (REQUEST_BODY_BUDGET_BYTES): "
        "try again in a moment"
    )
