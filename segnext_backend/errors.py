"""Errors that a request can cause, each with the HTTP status it should be answered with.

The package knows nothing of HTTP servers; the status is just a number that the web layer reads, so that a
bad click and a broken image URL end as a clear 4xx with a message, never as a 500.
"""


class RequestError(Exception):
    """Something about the request is wrong; `str(error)` says what, in words fit for the user."""

    http_status = 400


class ImageUnavailableError(RequestError):
    """The task's image could not be fetched or decoded."""

    http_status = 422


class TooLargeError(RequestError):
    """Something in the request is over a size limit (the message names the setting that raises it)."""

    http_status = 413


class ImageTooLargeError(TooLargeError):
    pass


class AnswerTooLargeError(RequestError):
    """The answer to a sound request would be over a size limit (a speckled mask's brush RLE, say); the
    message names the setting that raises it."""

    http_status = 422


class NotReadyError(RequestError):
    """The models are not loaded (yet, or because loading failed)."""

    http_status = 503
