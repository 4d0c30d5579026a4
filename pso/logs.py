"""Logs an operator or a log collector reads: ISO 8601 times with their UTC offset, as text lines or
one JSON object per line (`--log-format json`, or PSO_LOG_FORMAT for every process of a run).

Every line a pso process logs goes through the one handler `setup_logging` installs, so every line
carries the date, in either format:
- libraries that give their loggers console handlers of their own (torch, DeepSpeed, transformers,
  diffusers, huggingface_hub), whose lines would carry no date or another format, have those handlers
  dropped, whenever they add them, and their records go to the root handler instead;
- Python warnings, and exceptions nothing caught (in any thread), are logged as records too.
The learner's elastic agent (torch.distributed.run's, run inside `pso learner --nproc-per-node N`: its lines
say which rank failed and how) logs through torch's loggers, and so the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
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


def _console(handler: logging.Handler) -> bool:
    """A handler that writes to the process's stdout or stderr (not a file, not a null handler)."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


class RootBoundLogger(logging.Logger):
    """A logger whose console handlers are dropped as they are added: where a library would print its records
    itself (in its own format, often without a date), they propagate to the root's handler instead. A logger
    that never had a console handler behaves as any other."""

    _console_dropped = False

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        if _console(hdlr):
            self._console_dropped = True
            return
        super().addHandler(hdlr)

    @property
    def propagate(self) -> bool:
        return self._console_dropped or self.__dict__.get("_propagate", True)

    @propagate.setter
    def propagate(self, value: bool) -> None:
        self.__dict__["_propagate"] = value


def _bind_to_root() -> None:
    """Loggers made from now on are RootBoundLoggers; those that exist already become ones."""
    logging.setLoggerClass(RootBoundLogger)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or isinstance(logger, RootBoundLogger):
            continue  # a placeholder, or done
        if type(logger) is not logging.Logger:
            continue  # a library's own Logger class: left as it is
        propagate = logger.__dict__.pop("propagate", True)
        logger.__class__ = RootBoundLogger
        logger.propagate = propagate
        for handler in [h for h in logger.handlers if _console(h)]:
            logger.removeHandler(handler)
            logger._console_dropped = True


def _log_uncaught(kind: type[BaseException], value: BaseException, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("pso").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as threading's own hook: a thread that exits is no error
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("pso").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )


def setup_logging(verbose: bool = False, quiet_libraries: bool = True, fmt: str | None = None) -> None:
    """Configure the root logger once per process; `fmt` (default $PSO_LOG_FORMAT, else text) is passed on
    to the processes this one starts through the environment."""
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    os.environ[FORMAT_ENV] = fmt
    _bind_to_root()
    handler = logging.StreamHandler()
    text = IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if fmt == "json" else text)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # "<file>:<line>: <Warning>: ..." as a record of the logger py.warnings
    sys.excepthook, threading.excepthook = _log_uncaught, _log_uncaught_in_thread
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request
    if quiet_libraries and not verbose:  # library chatter (load bars, fp32-module notes) drowns the operator's view
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
