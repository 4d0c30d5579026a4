"""`pso learner --nproc-per-node N [--nnodes M] [--max-restarts R]`: this node's learner ranks under torch's
elastic agent (torch.distributed.run's own, run in this process rather than exec'd), and an exit status a
supervisor can act on.

The exit status of `pso learner`, one rank or the launcher of several, is defined here and only here; the
Kubernetes failure rules (deploy/k8s/base/learner.yaml: the Job's podFailurePolicy, the JobSet's
failurePolicy) and docs/deploy.md follow it, and tests/test_deploy_learner.py holds them to it:

    0    DONE     learner.max_updates reached (offline: the data used up) on every rank of every node
    1    FAILED   a rank crashed (an exception, a lost peer, a collective past learner.collective_timeout_s),
                  or the ranks could not meet (the rendezvous failed or timed out)
    2    CONFIG   a configuration or command-line error, or a rank layout the deployment cannot serve:
                  retrying cannot help
    137  KILLED   a rank was killed by SIGKILL: the kernel's OOM killer, as a rule
    143  STOPPED  SIGTERM before the work was done (130 for SIGINT): every rank checkpointed first; run it
                  again to resume

With --max-restarts R a rank that fails (1, 137, any status but 0) makes the agent stop this node's other
ranks and start all of them again, up to R times, each time resuming from the newest checkpoint; the
agents of the other nodes see the new rendezvous round and restart their ranks too. The status above is
that of the last attempt: 2 when a rank of it exited 2, 137 when one was killed by SIGKILL, else the first
failed rank's own status (128 + the signal for other signals), passing over the ranks the agent stopped with
SIGTERM because another had failed.

Under torch.distributed.run itself a SIGTERM makes the launcher exit 1 and a rank's status is lost; that is
why the agent runs here, in `run_node`, with the status mapped.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("pso.learner")

DONE, FAILED, CONFIG, KILLED, STOPPED = 0, 1, 2, 128 + signal.SIGKILL, 128 + signal.SIGTERM
EXIT_STATUS = {DONE: "done", FAILED: "failed", CONFIG: "configuration error", KILLED: "killed", STOPPED: "stopped"}

# The launcher tells its ranks which node it is and its own pid (see check_rank).
NODE_RANK_ENV = "PSO_LEARNER_NODE_RANK"
LAUNCHER_PID_ENV = "PSO_LEARNER_LAUNCHER_PID"
RDZV_ID = "pso-learner"
# How long the nodes wait for each other at a rendezvous: pods start minutes apart (image pulls, GPU nodes
# provisioned on demand, model downloads); the startup probe allows 30 minutes.
JOIN_TIMEOUT_S = 1800


class LaunchError(ValueError):
    """A launch flag that cannot work: the command exits CONFIG."""


def needs_agent(nproc_per_node: int, nnodes: int, max_restarts: int) -> bool:
    """One rank that is never restarted runs in the `pso learner` process itself; anything else under the agent."""
    return nproc_per_node > 1 or nnodes > 1 or max_restarts > 0


def exit_status(failures: dict[int, int]) -> int:
    """The node's status from its failed ranks' exit codes (rank -> code; negative: killed by that signal)."""
    codes = [c for _, c in sorted(failures.items()) if c != 0]
    if not codes:
        return FAILED  # the agent failed them without an exit code of their own
    if CONFIG in codes:
        return CONFIG
    if any(c in (-signal.SIGKILL, KILLED) for c in codes):
        return KILLED  # a rank killed outright: its peers then fail too (lost peer), which is not the cause
    # the agent stops the survivors of a failure with SIGTERM: those are not the cause either
    causes = [c for c in codes if c not in (-signal.SIGTERM, STOPPED)] or codes
    return 128 - causes[0] if causes[0] < 0 else causes[0]


def agent_argv(args, rank_args: list[str], module: str = "pso.cli") -> list[str]:
    """torch.distributed.run's command line for this node: c10d rendezvous at node 0's address, which hosts it;
    each rank is `python -m <module> <rank_args>`."""
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise LaunchError("--nproc-per-node and --nnodes must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    if args.max_restarts < 0:
        raise LaunchError("--max-restarts must be 0 or more")
    host = "true" if args.node_rank == 0 else "false"
    return [
        f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={args.master_addr}:{args.master_port}", f"--rdzv-id={RDZV_ID}",
        f"--rdzv-conf=is_host={host},join_timeout={JOIN_TIMEOUT_S}",
        f"--max-restarts={args.max_restarts}", f"--shutdown-timeout={args.shutdown_timeout}",
        "-m", module, *rank_args,
    ]  # fmt: skip


def run_node(args, rank_args: list[str], module: str = "pso.cli") -> int:
    """Start this node's ranks (`python -m <module> <rank_args>`) under the elastic agent; return the exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    argv = agent_argv(args, rank_args, module)
    # the agent's account of failures and restarts (INFO) is the operator's view of a recovery
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.INFO)
    config, entrypoint, entry_args = torchrun.config_from_args(torchrun.parse_args(argv))
    # A new TCPStore for each round of the ranks: in the one store the agent would otherwise share with every
    # round, restarted ranks find their predecessors' keys, and were seen to hang forming their process group.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ[NODE_RANK_ENV] = str(args.node_rank)  # inherited by the ranks
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    log.info(
        "starting %d learner rank(s) on node %d of %d (rendezvous %s:%d, up to %d restart(s))",
        args.nproc_per_node, args.node_rank, args.nnodes, args.master_addr, args.master_port, args.max_restarts,
    )  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        launch_agent(config, entrypoint, list(entry_args))
    except SignalException as e:  # the agent has stopped the ranks (SIGTERM, then SIGKILL after the timeout)
        status = 128 + int(e.sigval)
        log.warning("stopped by %s: the ranks were asked to checkpoint and exit (status %d)", e.sigval.name, status)
        return status
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        status = exit_status(codes)
        log.error(
            "learner rank(s) failed %s after %d restart(s): exit %d (%s)",
            codes, args.max_restarts, status, EXIT_STATUS.get(status, "failed"),
        )  # fmt: skip
        return status
    except Exception as e:  # the rendezvous: a peer node gone, node 0 unreachable, a timeout
        log.error("the learner's ranks could not run: %s: %s", type(e).__name__, e)
        return FAILED
    return DONE


def check_rank() -> str | None:
    """In a rank that `run_node` started: why it cannot serve this deployment (None if it can). Also makes the
    rank stop (SIGTERM: it checkpoints with the others) if the launcher dies, even by SIGKILL, rather than train
    on unsupervised."""
    node = os.environ.get(NODE_RANK_ENV)
    if node is None:
        return None  # started by another launcher (`torchrun`, `deepspeed`)
    _stop_with_parent(int(os.environ.get(LAUNCHER_PID_ENV, "0")))
    group = int(os.environ.get("GROUP_RANK", "0"))
    if (group == 0) != (int(node) == 0):
        # rank 0 serves /healthz, /metrics and /v1/scaling, which the deployment looks for on node 0 (its
        # probes, the pso-learner-metrics Service); the c10d rendezvous orders nodes by their host names
        return (
            f"the rendezvous made node {node} the first node (group rank {group}): rank 0 must run on node 0, "
            "whose host name must sort first among the nodes' (give every node the same naming scheme)"
        )
    return None


def _stop_with_parent(launcher_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if launcher_pid and os.getppid() != launcher_pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)
