"""Every line a pso process writes to its log carries a date, in both formats (PSO_LOG_FORMAT=text|json): the
reward server's (Granian's own lines and its access log, in each worker), the learner's elastic agent
(torch.distributed.run's, run by learner/launch.py) and its ranks, with the lines of the libraries that bring
console handlers of their own (torch, DeepSpeed, transformers), Python warnings and uncaught exceptions."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from pso.net import free_port

ROOT = Path(__file__).resolve().parents[1]
# pso.logs.IsoFormatter: local time with its UTC offset, to the millisecond
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
TEXT_HEAD = re.compile(rf"^({ISO}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): ?(.*)$")
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
ENV |= {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def records(output: str, fmt: str) -> list[dict]:
    """The log records in a process's output, each as {time, level, logger, text}; fails on any line that is
    not part of a dated record (json: every line is one object; text: a record's first line starts with its
    date, and only a multi-line message or a traceback continues it on undated lines)."""
    out: list[dict] = []
    for number, line in enumerate(output.splitlines(), 1):
        if fmt == "json":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"line {number} is not a JSON record: {line!r}\n{output[-4000:]}")
            assert re.fullmatch(ISO, obj.get("time", "")), f"line {number} has no ISO 8601 time: {line!r}"
            text = obj["message"] + ("\n" + obj["exception"] if "exception" in obj else "")
            out.append({"level": obj["level"], "logger": obj["logger"], "text": text})
        elif head := TEXT_HEAD.match(line):
            out.append({"level": head[2], "logger": head[3], "text": head[4]})
        else:
            assert out, f"line {number}, before any dated record, has no date: {line!r}\n{output[-4000:]}"
            out[-1]["text"] += "\n" + line
    return out


def logged(found: list[dict], logger: str, fragment: str, level: str | None = None) -> dict:
    """The record of `logger` whose text holds `fragment`."""
    for r in found:
        if r["logger"] == logger and fragment in r["text"] and level in (None, r["level"]):
            return r
    shown = "\n".join(f"{r['level']} {r['logger']}: {r['text'][:160]!r}" for r in found)
    pytest.fail(f"no {level or ''} record of {logger} with {fragment!r} among:\n{shown}")


# one format per process (each run costs seconds): the routing of the lines is the same in both, and json, what
# the deployments log, is the stricter check (every line a record); text by a learner, which `pso up` runs in it
@pytest.mark.parametrize("fmt", ["json"])
def test_every_line_of_the_reward_server_and_its_workers_is_dated(fmt, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "pso.cli", "reward-server", "--port", str(port), "--workers", "2", "--access-log"]
    env = ENV | {"PSO_LOG_FORMAT": fmt, "PSO_CONFIG": str(ROOT / "configs" / "tiny.yaml")}
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 300
            while (tmp_path / "err").read_text().count("ready: ") < 2:  # both workers loaded their models
                assert server.poll() is None, (tmp_path / "err").read_text()[-4000:]
                assert time.monotonic() < deadline, "the reward server did not get ready"
                time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            assert httpx.get(f"http://127.0.0.1:{port}/no-such-path", timeout=5).status_code == 404
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    found = records((tmp_path / "err").read_text() + (tmp_path / "out").read_text(), fmt)
    logged(found, "_granian", "Listening at")  # Granian's main process
    logged(found, "_granian", "Shutting down")
    assert sum("ready:" in r["text"] for r in found if r["logger"] == "pso.reward_server") == 2  # each worker
    access = logged(found, "granian.access", '"GET /readyz HTTP/1.1" 200')  # the access log, from a worker
    assert access["text"].startswith("127.0.0.1 - "), access  # dated once, by the record, not again by Granian
    logged(found, "granian.access", '"GET /no-such-path HTTP/1.1" 404')


RANK = """
    import logging, os, threading, warnings
    from pso.logs import setup_logging

    setup_logging(quiet_libraries=False)  # what `pso learner` does in each rank
    from deepspeed.utils import logger as deepspeed_logger  # a console handler of its own, stdout
    from transformers.utils import logging as transformers_logging  # one of its own, stderr

    rank = os.environ["RANK"]
    logging.getLogger("pso.learner").info("rank %s up", rank)
    deepspeed_logger.warning("deepspeed says hello from rank %s", rank)
    transformers_logging.get_logger("transformers.models").error("transformers says hello from rank %s", rank)
    logging.getLogger("torch.distributed").warning("torch says hello from rank %s", rank)
    warnings.warn(f"a python warning in rank {rank}")
    worker = threading.Thread(target=lambda: 1 / 0, name="doomed")
    worker.start()
    worker.join()
    if rank == "1":
        raise RuntimeError("boom in rank 1")
"""

# `pso learner --nproc-per-node 2`: the logging set up, then this node's agent (learner/launch.py), whose
# ranks here run the module above instead of `pso.cli learner`
AGENT = """
    import sys
    from types import SimpleNamespace
    from pso.logs import setup_logging

    setup_logging(quiet_libraries=False)
    from learner.launch import run_node

    args = SimpleNamespace(nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port={port},
                           max_restarts=0, shutdown_timeout=30)
    sys.exit(run_node(args, [], module="pso_log_rank"))
"""


@pytest.mark.parametrize("fmt", ["text"])
def test_every_line_of_the_learners_agent_and_its_ranks_is_dated(fmt, tmp_path):
    (tmp_path / "pso_log_rank.py").write_text(textwrap.dedent(RANK))
    agent = textwrap.dedent(AGENT).replace("{port}", str(free_port()))
    # OMP_NUM_THREADS unset: the agent warns that it sets it
    env = ENV | {"PSO_LOG_FORMAT": fmt, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run(
        [sys.executable, "-c", agent], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 1, f"rank 1 failed, so the node fails\n{run.stderr[-4000:]}"
    found = records(run.stderr + run.stdout, fmt)
    logged(found, "torch.distributed.run", "Setting OMP_NUM_THREADS", "WARNING")  # the agent's own lines
    logged(found, "torch.distributed.elastic.multiprocessing.api", "failed (exitcode: 1) local_rank: 1", "ERROR")
    logged(found, "pso.learner", "learner rank(s) failed", "ERROR")  # learner/launch.py's account
    for rank in ("0", "1"):
        logged(found, "pso.learner", f"rank {rank} up", "INFO")
        logged(found, "DeepSpeed", f"deepspeed says hello from rank {rank}", "WARNING")
        logged(found, "transformers.models", f"transformers says hello from rank {rank}", "ERROR")
        logged(found, "torch.distributed", f"torch says hello from rank {rank}", "WARNING")
        logged(found, "py.warnings", f"a python warning in rank {rank}", "WARNING")
    assert sum("ZeroDivisionError" in r["text"] for r in found if r["logger"] == "pso" and "doomed" in r["text"]) == 2
    boom = logged(found, "pso", "RuntimeError: boom in rank 1", "CRITICAL")  # uncaught: one record, traceback in
    assert "Traceback" in boom["text"]
    # each record once: the libraries' own console handlers were dropped, not kept beside the root's
    assert sum("deepspeed says hello from rank 0" in r["text"] for r in found) == 1
