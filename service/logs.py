"""Structured logging: one JSON object per line (``ts``, ``level``, ``logger``, ``message`` and, for access
logs, the request's fields: request id, method, path, status, duration). Configured by the CLI through
uvicorn's ``log_config`` so that every worker process uses it."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def log_config(level: str = "info", json_logs: bool = True) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict for the service, uvicorn and every other logger (the root's
    handler: python-multipart, asyncio, ... write JSON lines too). uvicorn's own access log is off: the
    service writes its own, with request ids."""
    formatter = (
        {"()": JsonFormatter} if json_logs else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "refinedet": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        # Everything else (python-multipart, asyncio, libraries) in the same format, never bare lines.
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
