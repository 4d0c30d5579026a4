"""Run the reward server: `pso reward-server` ends up here.

The HTTP server is Granian (hyper's HTTP/1.1 underneath) rather than uvicorn, because it bounds
request headers itself: headers over `limits.max_header_bytes` get a 431 and the connection
closed, and a connection without a complete request header after `limits.header_timeout_s` is
dropped (idle keep-alive connections too), all in Rust before any Python runs. uvicorn reads
headers without a time limit (a client trickling them holds its connection and file descriptor
for ever) and, with httptools, without a size limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings

from pso.config.reward_server import LimitsConfig, RewardServerConfig

log = logging.getLogger("pso.reward_server")
_CONFIG_ENV = "PSO_REWARD_SERVER_CONFIG_JSON"  # hands the resolved config to the worker processes
# where the workers' metrics meet (reward_server/metrics.py, whose import here would import prometheus_client)
_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Granian's own loggers propagate to the root logger that `pso` configured (dated lines, one format)
_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"_granian": {"propagate": True}, "granian.access": {"propagate": True}},
}
# Granian's access line without its own time stamp (the record's time is the line's date, as on every other line)
_ACCESS_FORMAT = '%(addr)s - "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).3f'


def http_settings(limits: LimitsConfig) -> dict:
    """The Granian settings every way of serving shares: HTTP/1.1 with bounded headers."""
    return {
        "interface": Interfaces.ASGI,
        "http": HTTPModes.http1,
        "websockets": False,
        "http1_settings": HTTP1Settings(
            header_read_timeout=round(limits.header_timeout_s * 1000), max_buffer_size=limits.max_header_bytes
        ),
    }


def serve(config: RewardServerConfig, access_log: bool = False) -> int:
    """Serve until stopped (SIGINT or SIGTERM: the requests in progress are answered first); 1 if the
    models failed to load, else 0. Every worker process loads its own models (`app_from_env`)."""
    with _metrics_dir():  # first: the imports below import prometheus_client
        from granian import Granian

        from reward_server.guard import bearer_token

        bearer_token(config)  # a blank token is refused here, before any worker starts
        _raise_open_file_limit()
        os.environ[_CONFIG_ENV] = config.model_dump_json()
        server = Granian(
            "reward_server.main:app_from_env",
            factory=True,
            address=config.host,
            port=config.port,
            workers=config.workers,
            log_access=access_log,
            log_access_format=_ACCESS_FORMAT,
            log_dictconfig=_LOGGING,
            **http_settings(config.limits),
        )
        try:
            server.serve()
        except SystemExit as e:  # Granian ends this way when a worker died (its models failed to load)
            return e.code if isinstance(e.code, int) else 1
    return 0


@contextmanager
def _metrics_dir() -> Iterator[None]:
    """A fresh folder for this server's workers to write their metrics to, removed at the end: inside the
    operator's $PROMETHEUS_MULTIPROC_DIR when set (other processes may write there, and files of an earlier
    server whose worker pids come back would be read as live), else in the temporary folder.
    prometheus_client reads the variable when it is first imported, in this process or in a worker it
    forks: so it is set before that."""
    parent = os.environ.get(_METRICS_ENV)
    if parent:
        os.makedirs(parent, exist_ok=True)
    os.environ[_METRICS_ENV] = tempfile.mkdtemp(prefix="pso-reward-metrics-", dir=parent or None)
    try:
        yield
    finally:
        shutil.rmtree(os.environ[_METRICS_ENV], ignore_errors=True)
        if parent:
            os.environ[_METRICS_ENV] = parent
        else:
            del os.environ[_METRICS_ENV]


def app_from_env():
    """The app in a worker process Granian started. A worker whose models fail to load exits with status 1,
    and Granian then stops the server with status 1."""
    from pso.logs import setup_logging
    from reward_server.app import create_app

    setup_logging(verbose=False)
    return create_app(RewardServerConfig.model_validate_json(os.environ[_CONFIG_ENV]), on_load_failure=_exit_worker)


def _exit_worker(error: str) -> None:
    from reward_server.metrics import mark_worker_gone

    mark_worker_gone()
    logging.shutdown()  # flush what was logged about the failure
    os._exit(1)


def _raise_open_file_limit() -> None:
    """Every connection takes a file descriptor: allow as many as the system lets this process have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d", soft)


@contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app `create_app` made on a thread of this process, with Granian's embedded server and the
    HTTP settings `serve` uses (port 0: a free one); yields its base URL once it accepts connections."""
    from granian.server.embed import Server

    from pso.net import free_port

    port = port or free_port()
    server = Server(app, address=host, port=port, log_dictconfig=_LOGGING, **http_settings(app.limits))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True, name="reward-server")
    thread.start()
    deadline = time.monotonic() + 300  # generous: a busy machine starts slowly
    while not _accepts(host, port):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the reward server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join(120)
        if not thread.is_alive():
            loop.close()


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
