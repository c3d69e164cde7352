"""Log lines that a request cannot forge.

Task ids, labels, image URLs, basic-auth user names and the messages of errors built from them are text a
request chooses. Written raw, a newline in one (`&#10;` in a label config, `"1\\n[ERROR] ..."` as a task id)
starts a line that reads like one of the backend's own. `EscapingFilter` escapes control characters, as
Python's repr writes them (`\\n`, `\\x1b`, `\\u2028`), in everything a log record takes from outside its
format string: the arguments (`logger.info("task %s", task_id)`), a message that is not a string, and each
exception's own text in a traceback. The format strings, written in the code, keep their line breaks.
"""

from __future__ import annotations

import copy
import logging
import numbers
import traceback
import unicodedata
from collections.abc import Mapping

# Line and paragraph separators are not control characters (Cc), but some log viewers break lines at them.
_BREAKING = {"\u2028", "\u2029"}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with each control character written as repr writes it; anything else (accents, CJK) unchanged."""
    if text.isprintable():  # the usual case: nothing to escape (isprintable is False for every Cc, Zl, Zp)
        return text
    return "".join(_escaped(char) if unicodedata.category(char) == "Cc" or char in _BREAKING else char for char in text)


def _escaped(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escaped_argument(value):
    # Numbers (NumPy's too) stay numbers, for %d and %.1f; anything else is logged as its str (what %s
    # shows), escaped.
    if isinstance(value, numbers.Number):
        return value
    return escape_controls(str(value))


class EscapingFilter(logging.Filter):
    """Escapes what a record takes from outside its format string (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Escaping twice changes nothing: a record may pass a logger's filter and then a handler's.
        if not isinstance(record.msg, str):
            record.msg = escape_controls(str(record.msg))
        if isinstance(record.args, Mapping):
            escaped = copy.copy(record.args)  # the same type: gunicorn's access-log atoms answer "-" when missing
            for key, value in record.args.items():
                escaped[key] = _escaped_argument(value)
            record.args = escaped
        elif record.args:
            record.args = tuple(_escaped_argument(value) for value in record.args)
        if record.exc_info and record.exc_info[1] is not None:
            # Formatter.format uses the exc_text it finds (even one another handler formatted): the
            # traceback's frames as they are, each exception's own text escaped.
            record.exc_text = "".join(_traceback_lines(traceback.TracebackException(*record.exc_info))).rstrip("\n")
        return True


def _traceback_lines(exception: traceback.TracebackException, seen: set | None = None):
    """The lines of `TracebackException.format()`, with the text of each exception in the chain escaped."""
    seen = set() if seen is None else seen
    seen.add(id(exception))
    cause, context = exception.__cause__, exception.__context__
    if cause is not None and id(cause) not in seen:
        yield from _traceback_lines(cause, seen)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif context is not None and not exception.__suppress_context__ and id(context) not in seen:
        yield from _traceback_lines(context, seen)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if exception.stack:
        yield "Traceback (most recent call last):\n"
        yield from exception.stack.format()
    for line in exception.format_exception_only():
        yield escape_controls(line.rstrip("\n")) + "\n"


def escape_request_text(*loggers: logging.Logger) -> None:
    """Install `EscapingFilter` (once) on each logger, for the records logged on it (a logger's filter
    outlives its handlers, which gunicorn makes anew on SIGHUP), and on its handlers, for the records
    propagated to them from other loggers (the root logger's write the backend's own records)."""
    for filterer in [part for logger in loggers for part in (logger, *logger.handlers)]:
        if not any(isinstance(f, EscapingFilter) for f in filterer.filters):
            filterer.addFilter(EscapingFilter())
