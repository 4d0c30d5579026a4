"""A stand-in for a learner rank under the learner's launcher (learner/launch.py), for tests/test_deploy_learner.py:
the real elastic agent supervises it, started in a fraction of the time a real rank takes to load its model.

It records its start as FAKE_RANK_DIR/<restart count>-<local rank>.pid (its pid) and a SIGTERM as ...term (then
exits 143, as a learner rank that checkpointed does), and does what FAKE_RANK_<local rank> says: `exit N` (once
every rank of the node has started), else wait to be signalled."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    out = Path(os.environ["FAKE_RANK_DIR"])
    rank = os.environ["LOCAL_RANK"]
    name = f"{os.environ['TORCHELASTIC_RESTART_COUNT']}-{rank}"

    def stop(signum, frame):
        (out / f"{name}.term").write_text(signal.Signals(signum).name)
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    tmp = out / f".{name}.pid"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"{name}.pid")
    action = os.environ.get(f"FAKE_RANK_{rank}", "wait")
    deadline = time.monotonic() + 120
    if action.startswith("exit "):  # once every rank of the node is up, as a rank fails mid-run
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        peers = [out / f"{attempt}-{r}.pid" for r in range(int(os.environ["LOCAL_WORLD_SIZE"]))]
        while not all(p.exists() for p in peers) and time.monotonic() < deadline:
            time.sleep(0.02)
        return int(action.split()[1])
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 3  # never signalled: the test failed to end it


if __name__ == "__main__":
    sys.exit(main())
