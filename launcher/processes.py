"""Child processes with their own log files, stopped together (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("pso.up")


class Child:
    """`python -m <module> <args>` in its own process group, its output in `log_path`."""

    def __init__(self, name: str, module: str, args: list[str], log_path: Path, env: dict[str, str]):
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the children in order
        )
        log.info("started %s (pid %d), log %s", name, self.proc.pid, log_path)

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the process group; SIGKILL what is left after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def wait_until(predicate, timeout: float, interval: float = 0.2, children: list[Child] = ()) -> bool:
    """Poll `predicate` until true (True), `timeout` (False), or a child dies (RuntimeError with its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        for c in children:
            if c.exit_code is not None:
                raise RuntimeError(f"{c.name} exited with status {c.exit_code}:\n{c.tail()}")
        time.sleep(interval)
    return False
