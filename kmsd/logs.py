"""One structlog configuration for the daemon: JSON lines when stdout is not
a terminal (journald), console rendering otherwise, and a redaction
processor just before the renderer so that no secret reaches a log line
even if a caller binds one by mistake."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

__all__ = [
    "REDACTED_KEYS", "configure_logging", "escape_controls", "raised_at", "redact", "get_logger", "set_log_level",
]

# Field names that may carry secrets: their values are never rendered.
REDACTED_KEYS = frozenset(
    {
        "data",
        "dek",
        "token",
        "access_token",
        "authorization",
        "password",
        "root_key",
        "key_material",
        "encrypted_key",
        "encrypted_dek",
        "secret",
    }
)


# Characters that JSON leaves raw but that break a line or reorder text when
# a person reads the log or the audit trail in a terminal or an editor: line
# and paragraph separators, bidi embeddings, overrides, isolates and marks
# (a user id with U+202E would print backwards): U+2028, U+2029, U+200E,
# U+200F, U+202A-U+202E, U+2066-U+2069 and U+061C, as UTF-8. Escaped as
# \\uXXXX, which every JSON reader decodes to the same string.
_CONTROLS = re.compile(rb"\xe2\x80[\xa8\xa9\x8e\x8f\xaa-\xae]|\xe2\x81[\xa6-\xa9]|\xd8\x9c")


def _escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode("utf-8"))


def escape_controls(line: bytes) -> bytes:
    """A UTF-8 JSON line with line and bidi controls escaped."""
    if b"\xe2" not in line and b"\xd8" not in line:  # the usual case: nothing to look for
        return line
    return _CONTROLS.sub(_escape, line)


def raised_at(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc``: where an
    unexpected error came from, for a log line that must not carry its
    message (which may quote data)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}"


def _render_json(event: Any, **kw: Any) -> bytes:
    return escape_controls(orjson.dumps(event))


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in REDACTED_KEYS:
            event[key] = "<redacted>"
    return event


# The level, changeable at run time (SIGHUP): a filter processor reads it,
# so loggers cached on first use follow it too.
_level = [logging.INFO]


def set_log_level(level: str) -> None:
    _level[0] = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)


_METHOD_LEVELS = {**logging.getLevelNamesMapping(), "EXCEPTION": logging.ERROR, "MSG": logging.INFO}


# Records that anchor something outside the log (the audit trail's head),
# or mark the process's life: written whatever the level.
ALWAYS_LOGGED = frozenset({"audit_head", "kmsd_started", "kmsd_stopped"})


def _filter_level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _METHOD_LEVELS.get(method.upper(), logging.INFO) < _level[0] and event.get("event") not in ALWAYS_LOGGED:
        raise structlog.DropEvent
    return event


def processors(json_output: bool) -> list[Any]:
    # orjson: the request line is on every request's path, and rendering it
    # with the standard json module cost about a third of the line.
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_render_json)
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return [
        _filter_level,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        renderer,
    ]


def configure_logging(level: str = "info", *, json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stdout.isatty()
    set_log_level(level)
    structlog.configure(
        processors=processors(json_output),
        # Below DEBUG nothing is filtered here: _filter_level decides.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=(
            structlog.BytesLoggerFactory(sys.stdout.buffer) if json_output else structlog.PrintLoggerFactory(sys.stdout)
        ),
        cache_logger_on_first_use=True,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
