"""Request ids and the server's log format.

Every request carries an id (the caller's ``X-Request-ID`` when it is a sane one, else a new one) that a
logging filter adds to each record logged while the request runs, so an error can be traced from the id a
user quotes to its log lines. ``DELTAREG_LOG_FORMAT=json`` writes one JSON object a line (time, level,
logger, message, request_id, and the extra fields of a record); ``text`` (the default) one readable line.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# Anything else a caller sends is replaced: an id goes into logs and headers verbatim, so no spaces,
# quotes or control characters, and no unbounded length.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
NO_REQUEST = "-"  # request_id of records logged outside any request (startup, periodic gc)

current_request_id: ContextVar[str | None] = ContextVar("deltareg_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s"
JSON_RENAMES = {"levelname": "level", "name": "logger"}


def request_id_from(header: str | None) -> str:
    """The caller's id if it is 1-128 of ``[A-Za-z0-9._-]``, else a new random one."""
    if header is not None and _VALID_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (of the request being served, or "-") to every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or NO_REQUEST
        return True


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        # "time": ISO 8601 in UTC. uvicorn's color_message (the message with terminal colours) is noise.
        return JsonFormatter(
            JSON_FIELDS,
            rename_fields=JSON_RENAMES,
            timestamp="time",
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
    return logging.Formatter(TEXT_FORMAT)


def logging_config(log_format: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the server process, uvicorn's loggers included.

    Everything goes to stderr through one handler with the request-id filter. uvicorn's own access log
    is off (it shows raw paths and query strings): the registry logs one access line per request itself,
    on the ``deltareg.access`` logger (see middleware.py).
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": formatter, "log_format": log_format}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["default"], "level": "INFO"},
        "loggers": {
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            # Alembic announces its context at INFO on every schema check: noise beside the one-line
            # errors `deltareg serve` prints (its warnings and errors still show).
            "alembic": {"level": "WARNING"},
        },
    }
