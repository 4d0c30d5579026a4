"""Run the reward server: `pso reward-server` ends up here."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from pso.config.reward_server import RewardServerConfig

log = logging.getLogger("pso.reward_server")
_CONFIG_ENV = "PSO_REWARD_SERVER_CONFIG_JSON"  # hands the resolved config to worker processes


def serve(config: RewardServerConfig, access_log: bool = False) -> int:
    """Serve until stopped; 1 if the models failed to load, else 0."""
    if config.workers > 1:  # each worker process imports `app_from_env` and loads its own models
        os.environ[_CONFIG_ENV] = config.model_dump_json()
        uvicorn.run(
            "reward_server.main:app_from_env",
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers,
            access_log=access_log,
            log_config=None,
        )
        return 0
    from reward_server.app import create_app

    failures: list[str] = []
    server: uvicorn.Server

    def stop(error: str) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(config, on_load_failure=stop)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, access_log=access_log, log_config=None)
    )
    server.run()
    return 1 if failures else 0


def app_from_env():
    """The app in a worker process that uvicorn started (logging configured anew: nothing is inherited)."""
    from pso.cli import setup_logging
    from reward_server.app import create_app

    setup_logging(verbose=False)
    return create_app(RewardServerConfig.model_validate_json(os.environ[_CONFIG_ENV]))


@contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn on a thread of this process (port 0: a free one); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the reward server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
