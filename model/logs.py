"""One log format for every process of a start: structured JSON lines (``ts``, ``level``, ``logger``,
``message`` and, for access logs, the request's fields: request id, method, path, status, duration) or plain
lines. ``refinedet serve`` configures it (uvicorn's ``log_config``, so every worker uses it) and exports
``REFINEDET_LOG_FORMAT`` so that the commands it runs as subprocesses (``refinedet export cpu`` at a first
start) write the same format (``configure_from_env``)."""

from __future__ import annotations

import json
import logging
import logging.config
import os
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


LOG_FORMAT_ENV = "REFINEDET_LOG_FORMAT"  # json | plain


def configure(level: str = "info", json_logs: bool = True) -> None:
    """This process's logging in the service's format; also exported for the subprocesses it starts."""
    logging.config.dictConfig(log_config(level, json_logs=json_logs))
    os.environ[LOG_FORMAT_ENV] = "json" if json_logs else "plain"


def configure_from_env(level: str = "info") -> None:
    """A subprocess's logging in the format of the command that started it (plain when run by hand)."""
    logging.config.dictConfig(log_config(level, json_logs=os.environ.get(LOG_FORMAT_ENV) == "json"))
