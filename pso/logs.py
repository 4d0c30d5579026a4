"""Logs an operator or a log collector reads: ISO 8601 times with their UTC offset, as text lines or
one JSON object per line (`--log-format json`, or PSO_LOG_FORMAT for every process of a run)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime

FORMAT_ENV = "PSO_LOG_FORMAT"
FORMATS = ("text", "json")


class IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(IsoFormatter):
    """One object per record: time, level, logger, message (and the traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(verbose: bool = False, quiet_libraries: bool = True, fmt: str | None = None) -> None:
    """Configure the root logger once per process; `fmt` (default $PSO_LOG_FORMAT, else text) is passed on
    to the processes this one starts through the environment."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    os.environ[FORMAT_ENV] = fmt
    handler = logging.StreamHandler()
    text = IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if fmt == "json" else text)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
    if quiet_libraries and not verbose:  # library chatter (load bars, fp32-module notes) drowns the operator's view
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
