"""The learner's failure handling on Kubernetes, from the exit status of `pso learner` to the JobSet's failure
policy (learner/launch.py, deploy/k8s/base/learner.yaml; deploy/k8s/README.md, "The learner: nodes, failures
and restarts"):

- the launcher: this node's ranks under torch's real elastic agent, here with stand-in ranks
  (tests/fake_learner_rank.py): a failed rank restarts the node's ranks, and the exit status tells a crash
  (1), a configuration error (2), a rank killed by SIGKILL (137) and a SIGTERM (143) apart; a rank whose
  launcher dies stops;
- the manifests: the rendered JobSet against JobSet's CRD schema and its webhook's rules, Kueue's
  LocalQueue with the optional component, the wiring of node rank, node count, rendezvous host and rank 0's
  Service and probes, and what each way a learner pod can end leads to under the Job controller's
  podFailurePolicy and the JobSet controller's failurePolicy (modelled in tests/k8s_controllers.py);
- the emulation of the cpu-tiny overlay (the processes of tests/test_deploy_stack.py, a learner of two
  ranks): a rank SIGKILLed mid-run is restarted with its peer by the agent, and they resume from the newest
  checkpoint; then the pod is evicted (SIGTERM, exit 143), the emulated controllers start it again, and it
  resumes from the checkpoint it wrote on the way out and finishes (exit 0).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import yaml
from k8s_controllers import (
    JOB_INDEX,
    REPLICAS,
    PodEnd,
    incident,
    jobset_admission_errors,
    jobset_children,
    jobsets,
)
from test_deploy_k8s import _schema_errors
from test_deploy_stack import (
    PUSHED,
    REDIS_PORT,
    ROOT,
    TIMEOUT,
    Local,
    Stack,
    check_redis,
    http_check,
    k8s_specs,
    kustomize,
    make_shims,
    redis_password,
)

from learner import launch
from pso.cli import build_parser, main
from pso.report import read_metrics
from pso.transport.keys import Keys

OVERLAYS = ("cpu-tiny", "gpu")
K8S = ROOT / "deploy" / "k8s"
VAR = re.compile(r"\$\((\w+)\)")
RESUMED = re.compile(r"^resumed at update (\d+), version \d+")
TEXT_LOG = re.compile(r"^(\d{4}-\d\d-\d\dT\S+) [A-Z]+ \S+: (.*)$")
DISRUPTION = ("DisruptionTarget",)


def render(overlay: str) -> list[dict]:
    return kustomize(f"deploy/k8s/overlays/{overlay}")


def learner_of(objs: list[dict]) -> tuple[dict, dict, dict]:
    """(the JobSet, its first Job as the controller makes it, that Job's learner container)."""
    (js,) = jobsets(objs)
    job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"].get(JOB_INDEX) == "0")
    (container,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "learner"]
    return js, job, container


def pod_env(container: dict, annotations: dict[str, str]) -> dict[str, str]:
    """The container's env entries (not envFrom) as the kubelet sets them, the downward API from `annotations`."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = VAR.sub(lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
            assert key, f"{var['name']}: only annotations are expected, got {path}"
            env[var["name"]] = annotations[key[1]]
    return env


def args_of(container: dict, env: dict[str, str]) -> list[str]:
    return [VAR.sub(lambda m: env.get(m[1], m[0]), a) for a in container["args"]]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} not in {args}"
    return args[args.index(name) + 1]


# --- the launcher ---------------------------------------------------------------------------------------------


def test_exit_status_names_the_cause_of_a_failed_node():
    s = launch.exit_status
    assert (launch.DONE, launch.FAILED, launch.CONFIG, launch.KILLED, launch.STOPPED) == (0, 1, 2, 137, 143)
    assert s({0: 1}) == s({1: 1, 0: -signal.SIGTERM}) == s({0: -signal.SIGTERM, 1: 1}) == launch.FAILED
    assert s({1: -signal.SIGKILL, 0: 1}) == s({0: 1, 1: 137}) == launch.KILLED  # its peer's lost-peer error is not it
    assert s({0: -signal.SIGKILL, 1: 2}) == launch.CONFIG
    assert s({0: -signal.SIGTERM, 1: -signal.SIGTERM}) == launch.STOPPED  # someone stopped the ranks, not the agent
    assert s({0: -signal.SIGSEGV}) == 128 + signal.SIGSEGV
    assert s({0: 7, 1: 1}) == 7
    assert s({}) == launch.FAILED


def test_launch_flags_and_the_rank_layout_are_configuration_errors(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert main(["learner", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2"]) == launch.CONFIG
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err
    assert main(["learner", "--nproc-per-node", "2", "--max-restarts", "-1"]) == launch.CONFIG
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    assert main(["learner", "--max-restarts", "2"]) == launch.CONFIG
    assert "not for a rank under torchrun" in capsys.readouterr().err
    # a rank the launcher started checks that rank 0 runs on node 0, where the deployment looks for it
    monkeypatch.setenv(launch.NODE_RANK_ENV, "1")
    monkeypatch.setenv(launch.LAUNCHER_PID_ENV, str(os.getppid()))
    monkeypatch.setenv("GROUP_RANK", "0")
    with monkeypatch.context() as m:
        m.setattr(launch, "_stop_with_parent", lambda pid: None)  # not for the test process itself
        assert "made node 1 the first node" in launch.check_rank()
        m.setenv("GROUP_RANK", "1")
        assert launch.check_rank() is None
        m.setenv(launch.NODE_RANK_ENV, "0")
        assert "group rank 1" in launch.check_rank()
        m.setenv("GROUP_RANK", "0")
        assert launch.check_rank() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_stops_when_its_launcher_dies(tmp_path):
    """A rank whose launcher is SIGKILLed (not a container's PID 1 on a bare host) gets SIGTERM and so checkpoints
    and exits, rather than train on unsupervised beside the ranks of a launcher started again."""
    marker = tmp_path / "rank-stopped"
    rank = (
        "import os, signal, sys, time; from learner import launch; "
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('TERM'), sys.exit(143))); "
        "assert launch.check_rank() is None; print('up', flush=True); time.sleep(60)"
    )
    launcher = (
        "import os, subprocess, sys, time; "
        f"env = {{**os.environ, {launch.NODE_RANK_ENV!r}: '0', {launch.LAUNCHER_PID_ENV!r}: str(os.getpid()), "
        "'GROUP_RANK': '0'}; "
        f"subprocess.Popen([sys.executable, '-c', {rank!r}], env=env); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.kill()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the rank went on after its launcher died"
            time.sleep(0.05)
        assert marker.read_text() == "TERM"
    finally:
        proc.kill()
        proc.wait()


def test_the_agent_runs_a_c10d_rendezvous_hosted_by_node_zero():
    args = SimpleNamespace(nproc_per_node=8, nnodes=3, node_rank=0, master_addr="m", master_port=29500,
                           max_restarts=3, shutdown_timeout=110)  # fmt: skip
    argv = launch.agent_argv(args, ["learner", "--resume"])
    assert "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=m:29500" in argv and "--max-restarts=3" in argv
    assert f"--rdzv-conf=is_host=true,join_timeout={launch.JOIN_TIMEOUT_S}" in argv
    assert argv[-4:] == ["-m", "pso.cli", "learner", "--resume"]
    args.node_rank = 2
    assert "--rdzv-conf=is_host=false,join_timeout=1800" in launch.agent_argv(args, [])
    from torch.distributed import run as torchrun

    parsed = torchrun.parse_args(launch.agent_argv(args, ["learner"]))
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.max_restarts) == ("3", "8", 3)


class FakeNode:
    """`run_node` in a child process (the agent installs signal handlers), its ranks tests/fake_learner_rank.py."""

    def __init__(self, tmp: Path, max_restarts: int, **ranks: str):
        from pso.redis_server import free_port

        self.dir = tmp
        tmp.mkdir(parents=True)
        args = dict(nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                    max_restarts=max_restarts, shutdown_timeout=5)  # fmt: skip
        code = (
            "import logging, sys; from types import SimpleNamespace; from learner.launch import run_node; "
            "logging.basicConfig(level=logging.INFO); "
            f"sys.exit(run_node(SimpleNamespace(**{args!r}), [], module='fake_learner_rank'))"
        )
        env = {**os.environ, "FAKE_RANK_DIR": str(tmp), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        env |= {f"FAKE_RANK_{r[-1]}": v for r, v in ranks.items()}
        self.log = tmp / "launcher.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=out, stderr=out)

    def pid(self, attempt: int, rank: int) -> int:
        path = self.dir / f"{attempt}-{rank}.pid"
        deadline = time.monotonic() + 60
        while not path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"rank {rank} of attempt {attempt} never started"
            time.sleep(0.05)
        return int(path.read_text())

    def wait(self) -> int:
        try:
            return self.proc.wait(60)
        finally:
            print(self.log.read_text())

    def started(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.pid")}

    def stopped(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.term")}


@pytest.mark.slow
def test_the_launcher_restarts_the_nodes_ranks_and_exits_with_the_cause(tmp_path):
    nodes = {  # side by side: each spends most of its time importing torch
        # a crashing rank: the agent stops its peer (SIGTERM) and starts both again, once; then the node fails
        "crash": FakeNode(tmp_path / "crash", 1, rank1="exit 1"),
        # a rank killed (the OOM killer's SIGKILL), no restarts left: 137, however its peer then ended
        "killed": FakeNode(tmp_path / "killed", 0),
        # a configuration error in a rank
        "config": FakeNode(tmp_path / "config", 0, rank1="exit 2"),
        # SIGTERM to the launcher (the kubelet stopping the pod): every rank is asked to checkpoint, then 143
        "term": FakeNode(tmp_path / "term", 3),
        # every rank done
        "done": FakeNode(tmp_path / "done", 3, rank0="exit 0", rank1="exit 0"),
    }
    os.kill(nodes["killed"].pid(0, 1), signal.SIGKILL)
    term = nodes["term"]
    term.pid(0, 0), term.pid(0, 1)
    term.proc.send_signal(signal.SIGTERM)
    codes = {name: node.wait() for name, node in nodes.items()}
    assert codes == {
        "crash": launch.FAILED,
        "killed": launch.KILLED,
        "config": launch.CONFIG,
        "term": launch.STOPPED,
        "done": launch.DONE,
    }
    crash = nodes["crash"]
    assert crash.started() == {"0-0", "0-1", "1-0", "1-1"} and crash.stopped() == {"0-0", "1-0"}
    assert term.started() == term.stopped() == {"0-0", "0-1"}
    assert nodes["done"].started() == {"0-0", "0-1"} and not nodes["done"].stopped()


# --- the manifests --------------------------------------------------------------------------------------------


@pytest.fixture(params=OVERLAYS, scope="module")
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def with_kueue(tmp: Path, overlay: str) -> list[dict]:
    """The overlay with components/kueue added, as an overlay that lists it in its components renders."""
    namespace = next(o for o in render(overlay) if o["kind"] == "Namespace")["metadata"]["name"]
    rel = os.path.relpath(K8S, tmp)
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": namespace,
                "resources": [f"{rel}/overlays/{overlay}"],
                "components": [f"{rel}/components/kueue"],
            }
        )
    )
    return kustomize(tmp)


def test_the_jobset_passes_the_schema_and_the_webhook(rendered, tmp_path):
    name, objs = rendered
    (js,) = jobsets(objs)
    assert not _schema_errors([js]), _schema_errors([js])
    assert not jobset_admission_errors(js), jobset_admission_errors(js)
    # with Kueue's gang admission: the JobSet carries the queue, which the component creates
    queued = with_kueue(tmp_path, name)
    errors = _schema_errors(queued)
    assert not errors, "\n".join(errors)
    ((queue,), (js,)) = [o for o in queued if o["kind"] == "LocalQueue"], jobsets(queued)
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue["metadata"]["name"]
    assert queue["metadata"]["namespace"] == js["metadata"]["namespace"]
    assert queue["spec"]["clusterQueue"]


def test_each_node_knows_its_rank_the_node_count_and_node_zero(rendered):
    name, objs = rendered
    js, job, c = learner_of(objs)
    (rjob,) = js["spec"]["replicatedJobs"]
    spec = rjob["template"]["spec"]
    # one pod per Job, never retried alone; the ranks need restartPolicy Never for podFailurePolicy
    shape = (spec["completions"], spec["parallelism"], spec["completionMode"], spec["backoffLimit"])
    assert shape == (1, 1, "Indexed", 0), shape
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    policy = js["spec"]["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] >= 1
    parser = build_parser()
    for nodes in (1, 2, 11):  # 11: node 10's name sorts before node 2's, node 0's before every other
        scaled = copy.deepcopy(js)
        scaled["spec"]["replicatedJobs"][0]["replicas"] = nodes
        pods = []
        for child in jobset_children([scaled]):
            pod = child["spec"]["template"]
            (container,) = [x for x in pod["spec"]["containers"] if x["name"] == "learner"]
            env = pod_env(container, pod["metadata"]["annotations"])
            args = args_of(container, env)
            with contextlib.redirect_stderr(io.StringIO()):
                parsed = parser.parse_args(args)
            assert parsed.nnodes == nodes == int(pod["metadata"]["annotations"][REPLICAS])
            assert parsed.node_rank == int(pod["metadata"]["annotations"][JOB_INDEX])
            assert parsed.resume and parsed.max_restarts >= 1 and parsed.nproc_per_node >= 1
            # the host name the Job controller gives an Indexed Job's pod, under the JobSet's subdomain
            pods.append((f"{child['metadata']['name']}-0", pod["spec"]["subdomain"], parsed))
        host0, subdomain, _ = pods[0]
        assert {p.master_addr for _, _, p in pods} == {f"{host0}.{subdomain}"}
        namespace = js["metadata"]["namespace"]
        fqdns = [f"{h}.{s}.{namespace}.svc.cluster.local" for h, s, _ in pods]
        assert sorted(fqdns)[0] == fqdns[0], "c10d orders the nodes by name: node 0 must sort first"
    # the rendezvous port is node 0's, behind the headless Service that is the JobSet's subdomain
    (headless,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == subdomain]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    port = int(flag(args, "--master-port"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["rendezvous"] == port and {p["port"] for p in headless["spec"]["ports"]} == {port}
    # rank 0's ops port, through the Service that selects node 0's pod only
    (metrics,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "pso-learner-metrics"]
    selector = metrics["spec"]["selector"].items()
    chosen = [j for j in jobset_children([scaled]) if selector <= j["spec"]["template"]["metadata"]["labels"].items()]
    assert [j["metadata"]["labels"][JOB_INDEX] for j in chosen] == ["0"], name
    assert {p["targetPort"] for p in metrics["spec"]["ports"]} == {"metrics"}
    ops = next(v["value"] for v in c["env"] if v["name"] == "PSO__LEARNER__METRICS_PORT")
    assert ports["metrics"] == int(ops)
    # the ranks have time to checkpoint on SIGTERM before the kubelet's SIGKILL
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > parsed.shutdown_timeout + 5, (grace, parsed.shutdown_timeout)


def test_learner_probes_ask_node_zero_only(rendered):
    """The exec probes, run with sh as the kubelet runs them, against a real ops server: node 0 passes while
    its rank 0 makes progress and fails once it stalls; the other nodes (no server) pass."""
    from prometheus_client import CollectorRegistry

    from pso.ops_http import OpsServer

    _, objs = rendered
    _, _, c = learner_of(objs)
    probes = {k: c[k]["exec"]["command"] for k in ("startupProbe", "livenessProbe")}
    server = OpsServer("learner", 0, CollectorRegistry(), stall_s=3600.0, host="127.0.0.1")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # where `pso` is

    def run(command: list[str], node: str) -> int:
        env = os.environ | {"PSO_NODE_RANK": node, "PSO__LEARNER__METRICS_PORT": str(server.port), "PATH": path}
        return subprocess.run(command, env=env, capture_output=True, timeout=300).returncode

    try:
        for kind, command in probes.items():
            assert run(command, "0") == 0, f"{kind} fails on a healthy node 0"
        server.stall_s = 0.001
        time.sleep(0.01)
        for kind, command in probes.items():
            assert run(command, "0") != 0, f"{kind} passes on a stalled node 0"
            assert run(command, "1") == 0, f"{kind} fails on node 1, which serves nothing"
    finally:
        server.close()
    assert any(v["name"] == "PSO_NODE_RANK" for v in c["env"])


def test_each_failure_gets_its_own_treatment(rendered):
    """What the Job and JobSet controllers do with each way a learner pod can end (deploy/k8s/README.md)."""
    _, objs = rendered
    js = jobsets(objs)[0]
    most = js["spec"]["failurePolicy"]["maxRestarts"]
    table = {
        # pod end -> (JobSet action, rule, counted towards maxRestarts)
        PodEnd(launch.DONE): ("Completed", None, False),
        PodEnd(launch.FAILED): ("RestartJobSet", "Crash", True),
        PodEnd(134): ("RestartJobSet", "Crash", True),  # a rank's own SIGABRT
        PodEnd(launch.KILLED): ("RestartJobSet", "OutOfMemory", True),
        PodEnd(launch.CONFIG): ("Failed", "ConfigurationError", False),
        PodEnd(launch.STOPPED, DISRUPTION): ("RestartJobSetAndIgnoreMaxRestarts", "Disruption", False),
        PodEnd(launch.KILLED, DISRUPTION): ("RestartJobSetAndIgnoreMaxRestarts", "Disruption", False),  # grace over
        PodEnd(launch.STOPPED): ("RestartJobSet", "Crash", True),  # stopped without a disruption: a liveness kill
    }
    for end, expected in table.items():
        for node in (0, 1):
            scaled = copy.deepcopy(js)
            scaled["spec"]["replicatedJobs"][0]["replicas"] = 2
            got = incident(scaled, end, node=node)
            assert (got.jobset if end.exit_code else "Completed", got.rule, got.counted) == expected, (end, got)
    # a node's Job fails at its first failure, for the JobSet to decide: no pod is replaced alone
    assert incident(js, PodEnd(launch.FAILED)).job == "Failed"
    # counted restarts run out; disruptions never do
    assert incident(js, PodEnd(launch.FAILED), counted=most - 1).jobset == "RestartJobSet"
    assert incident(js, PodEnd(launch.FAILED), counted=most).jobset == "Failed"
    assert incident(js, PodEnd(launch.KILLED), counted=most).jobset == "Failed"
    assert incident(js, PodEnd(launch.STOPPED, DISRUPTION), counted=most).jobset == "RestartJobSetAndIgnoreMaxRestarts"
    # the exit codes the rules name are the launcher's
    codes = {v for r in js["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
             for v in r.get("onExitCodes", {}).get("values", [])}  # fmt: skip
    assert codes == {launch.CONFIG, launch.KILLED}


def test_the_docs_state_the_exit_codes_and_the_prerequisites():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    readme = (K8S / "README.md").read_text()
    source = json.loads((ROOT / "tests/schemas/jobset/jobset.x-k8s.io_v1alpha2_jobset.json").read_text())["x-source"]
    assert f"JobSet controller {source['version']} or later" in doc
    for code in (launch.DONE, launch.FAILED, launch.CONFIG, launch.KILLED, launch.STOPPED):
        assert re.search(rf"^\| `?{code}`? \|", doc, re.M), f"docs/deploy.md: no row for exit status {code}"
    assert "JobSet" in readme and "components/kueue" in readme


# --- the emulation: a killed rank, an evicted pod ---------------------------------------------------------------


def rank_pids(launcher: int) -> dict[int, int]:
    """local rank -> pid of the launcher's rank processes."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == launcher and b"LOCAL_RANK" in env:
            found[int(env[b"LOCAL_RANK"])] = int(proc.name)
    return found


def log_records(text: str) -> list[tuple[float, str]]:
    """(time, message) of each log record, in either format of PSO_LOG_FORMAT (text or JSON lines)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records.append((datetime.fromisoformat(record["time"]).timestamp(), record.get("message", "")))
        elif m := TEXT_LOG.match(line):
            records.append((datetime.fromisoformat(m[1]).timestamp(), m[2]))
    return records


def resumes(log: str) -> dict[int, float]:
    """update -> when a rank first logged resuming there."""
    out: dict[int, float] = {}
    for at, message in log_records(log):
        if m := RESUMED.match(message):
            out.setdefault(int(m[1]), at)
    return out


def newest_checkpoint(folder: Path) -> int:
    latest = folder / "latest"
    return int(latest.read_text().strip().removeprefix("global_step")) if latest.is_file() else 0


@pytest.mark.slow
def test_a_killed_rank_and_an_evicted_learner_resume_from_their_checkpoint(tmp_path):
    total, every = 10, 2
    objs = render("cpu-tiny")
    js, job, container = learner_of(objs)
    # two ranks on the node, as an overlay sets PSO_GPUS_PER_NODE (cpu-tiny runs one)
    (ranks,) = [v for v in container["env"] if v["name"] == "PSO_GPUS_PER_NODE"]
    ranks["value"] = "2"
    secret = {"redis-password": secrets.token_hex(16), "reward-token": secrets.token_hex(16)}  # no hf-token
    specs, hosts = k8s_specs(objs, secret, tmp_path, make_shims(tmp_path / "shims"))
    assert {s.service for s in specs} == {"pso-redis", "pso-reward-server", "pso-learner", "pso-actor"}
    (learner,) = [s for s in specs if s.service == "pso-learner"]
    (redis_spec,) = [s for s in specs if s.service == "pso-redis"]
    actors = [s for s in specs if s.service == "pso-actor"]
    assert flag(learner.argv, "--nproc-per-node") == "2" and int(flag(learner.argv, "--max-restarts")) >= 1
    # the learner's ops endpoint through its Service: the one Prometheus scrapes (annotated), and KEDA's URL
    (service,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "pso-learner-metrics"]
    notes = service["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    scrape = f"http://pso-learner-metrics:{notes['prometheus.io/port']}{notes['prometheus.io/path']}"
    scaling: list[dict] = []
    learner.checks.append(http_check("scrape (Service pso-learner-metrics)", Local(hosts, {}).value(scrape)))
    keda_url = Local(hosts, {}).value("http://pso-learner-metrics.pso-tiny.svc:9400/v1/scaling")
    learner.checks.append(http_check("scaling", keda_url, "actors_wanted", scaling))
    learner.env |= {"PSO__LEARNER__MAX_UPDATES": str(total), "PSO__LEARNER__CHECKPOINT_EVERY": str(every)}
    for s in specs:
        if s.argv[1:2] == ["actor"]:  # as in run_deployment: once the learner is seen healthy
            s.after = {**s.after, learner.service: "service_healthy"}
    checkpoints = Path(learner.env["PSO__LEARNER__CHECKPOINT_DIR"])
    metrics = Path(learner.env["PSO__LEARNER__METRICS_FILE"])
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    def updates() -> int:
        rows = read_metrics(metrics) if metrics.exists() else []
        return rows[-1]["updates"] if rows else 0

    stack = Stack(tmp_path, specs)
    started = time.monotonic()
    try:
        stack.up(TIMEOUT)
        stack.wait_healthy(TIMEOUT)
        print(f"every probe passed after {time.monotonic() - started:.1f} s; /v1/scaling: {scaling[0]}")
        redis_data = check_redis(redis_spec)  # the ConfigMap's redis.conf, as a real Redis loaded it
        # 1. a rank dies (SIGKILL: what the OOM killer sends) after a checkpoint
        stack.poll(lambda: newest_checkpoint(checkpoints) >= every and updates() > every, TIMEOUT, "a checkpoint")
        pod = stack.children[learner.name]
        before = rank_pids(pod.proc.pid)
        assert sorted(before) == [0, 1], before
        os.kill(before[1], signal.SIGKILL)
        killed = newest_checkpoint(checkpoints)  # no rank can checkpoint without the other: this is the newest
        print(f"killed rank 1 after {time.monotonic() - started:.0f} s; newest checkpoint: update {killed}")
        stack.poll(lambda: killed in resumes(stack.log(learner.name)), TIMEOUT, "the ranks to resume")
        after = rank_pids(pod.proc.pid)
        assert sorted(after) == [0, 1] and not set(after.values()) & set(before.values()), (before, after)
        assert pod.exit_code is None, "the pod ended instead of restarting its ranks"
        text = stack.log(learner.name)
        assert re.search(r"exitcode: -9\) local_rank: 1", text) and "will restart worker group" in text, text[-3000:]
        # 2. the pod is evicted: SIGTERM to its main process, the ranks checkpoint, the launcher exits 143
        stack.poll(lambda: updates() >= killed + 2, TIMEOUT, "updates after the restart")
        pod.proc.send_signal(signal.SIGTERM)
        code = pod.proc.wait(grace)
        stopped = updates()
        print(f"evicted after {time.monotonic() - started:.0f} s: exit {code} at update {stopped}")
        assert code == launch.STOPPED
        assert f"stopped at update {stopped}; checkpointed" in stack.log(learner.name)
        assert newest_checkpoint(checkpoints) == stopped < total
        # the Job and JobSet controllers: a disruption, restart everything, not counted; the new pod starts
        # once the old one is gone (BlockingRecreate), as here
        outcome = incident(js, PodEnd(code, DISRUPTION))
        assert (outcome.jobset, outcome.counted) == ("RestartJobSetAndIgnoreMaxRestarts", False), outcome
        pod.stop()
        for check in learner.checks:
            check.passed, check.last = False, "not run yet"
        stack._start(learner)
        assert stack.wait_exit(learner.name, TIMEOUT) == launch.DONE
        assert incident(js, PodEnd(launch.DONE)).jobset == "Completed"
        print(f"done after {time.monotonic() - started:.0f} s")
        client = redis.Redis(host="127.0.0.1", port=redis_spec.ports[REDIS_PORT], password=redis_password(redis_spec))
        counters = client.hgetall(Keys(learner.env["PSO__REDIS__RUN"]).counters)
        stack.stop(*[a.name for a in actors])
    finally:
        stack.stop()
        print(stack.logs())

    text = stack.log(learner.name)
    resumed = resumes(text)
    assert set(resumed) == {killed, stopped}, resumed  # the first start found no checkpoint
    assert f"learner done: {total} updates" in text
    rows = read_metrics(metrics)  # rank 0's, one per update, from all three runs of it
    # each run of the ranks went on from its checkpoint, not from 0: the first update after each resume
    for update, at in resumed.items():
        later = [r["updates"] for r in rows if r["time"] >= at]
        assert later[0] == update + 1, (update, later)
    assert rows[0]["updates"] == 1 and rows[-1]["updates"] == total
    assert rows[-1]["actors_wanted"] > 0, rows[-1]
    assert newest_checkpoint(checkpoints) == total
    for a in actors:
        assert sum(int(n) for n in PUSHED.findall(stack.log(a.name))) > 0, f"{a.name} pushed nothing"
        # SIGTERM (a scale-down, a rollout): the batch in hand is finished and the actor exits cleanly
        assert stack.stopped[a.name] == 0, f"{a.name} exited with {stack.stopped[a.name]} on SIGTERM"
    assert int(counters[b"produced"]) >= int(counters[b"trained"]) > 0, counters
    assert list(redis_data.glob("appendonly*")), f"no append-only file on the Redis volume {redis_data}"
