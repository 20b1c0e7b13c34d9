"""One structlog configuration for the daemon: JSON lines when stdout is not
a terminal (journald), console rendering otherwise, and a redaction
processor just before the renderer so that no secret reaches a log line
even if a caller binds one by mistake."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

__all__ = ["REDACTED_KEYS", "configure_logging", "redact", "get_logger", "set_log_level"]

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
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
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
