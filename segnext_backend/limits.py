"""Bounds on what one request may ask for, checked before any work is done for it."""

from __future__ import annotations

import math

from .errors import RequestError


def finite_number(value, what: str, error: type[Exception] = RequestError) -> float:
    """A JSON number as a finite float; anything else (a string, a bool, NaN, 10**400) raises `error`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)  # an int beyond float's range (10**400) raises here
    except OverflowError:
        raise error(f"{what} must be a finite number, got one of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise error(f"{what} must be a finite number, got {value!r}")
    return number


def positive_whole_number(value, what: str, error: type[Exception] = RequestError) -> int:
    """A JSON number that is a whole number of at least 1 (a width, a height), as an int."""
    size = finite_number(value, what, error)
    if size < 1 or size != int(size):
        raise error(f"{what} must be a positive whole number, got {value!r}")
    return int(size)


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
