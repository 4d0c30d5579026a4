"""The Kubernetes manifests (deploy/k8s): each overlay is rendered with `kubectl kustomize`, every object
is validated against the pinned Kubernetes schemas (strict: unknown fields are errors), and the names,
command lines, settings, probes, secrets and selectors are cross-checked against the code."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import subprocess
import typing
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_controllers import FIELD_SAMPLES, jobset_children
from pydantic import BaseModel

from pso.cli import build_parser
from pso.config import load_config
from pso.config.reward_server import RewardServerConfig
from pso.config.schema import PSOConfig
from pso.config.services import RedisConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# the image's tags are <version>-gpu and <version>-cpu, the version of pyproject.toml (docs/deploy.md)
VERSION = re.search(r'(?ms)^\[project\]$.*?^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())[1]

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
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(VAR) in args and env values
SHELL_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
LOCAL_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[^\s\"']*)")


# --- rendering -------------------------------------------------------------------------------------


@functools.cache
def _render(kubectl: str, folder: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s/{folder} failed:\n{out.stderr}"
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    # and the Jobs the JobSet controller makes of the learner's JobSet, checked as every workload is
    return tuple(docs + jobset_children(docs))


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
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = FIELD_SAMPLES.get(path, "0" if INDEX_ANNOTATION in path else "field")
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


# Custom resources are checked against their CRD's openAPIV3Schema, vendored under tests/schemas (any
# subfolder) as <group>_<version>_<kind in lower case>.json, with its source noted beside it.
SCHEMAS = ROOT / "tests" / "schemas"
# The CEL rules (x-kubernetes-validations) of the vendored schemas, as Python: a schema with a rule
# that is not here fails the check, rather than leaving the rule unchecked. Transition rules (those that
# read oldSelf) run on updates only, so never on a manifest being created.
CEL_RULES: dict[str, typing.Callable[[typing.Any], bool]] = {
    # keda.sh ScaledObject .spec
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": (
        lambda spec: "minReplicaCount" not in spec or spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)
    ),
    # jobset.x-k8s.io JobSet .spec
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && "
    "self.replicatedJobs.exists(x, has(x.dependsOn)))": (
        lambda spec: (
            not (
                spec.get("startupPolicy", {}).get("startupPolicyOrder") == "InOrder"
                and any("dependsOn" in job for job in spec["replicatedJobs"])
            )
        )
    ),
}


def _strict(schema):
    """As the API server with kubectl's strict field validation: an object schema that lists properties
    rejects others, unless it allows them (additionalProperties, x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict | None:
    """The vendored, strict openAPIV3Schema of a custom resource, or None if none is vendored."""
    group, _, version = api_version.rpartition("/")
    found = sorted(SCHEMAS.rglob(f"{group}_{version}_{kind.lower()}.json"))
    return _strict(json.loads(found[0].read_text())) if found else None


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if re.search(r"\boldSelf\b", rule["rule"]):
            continue  # a transition rule
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            errors.append(f"{path}: CEL rule not known to the tests (add it to CEL_RULES): {rule['rule']}")
            continue
        try:
            passed = check(value)
        except (TypeError, KeyError, AttributeError):  # the schema check reports the ill-typed value
            continue
        if not passed:
            errors.append(f"{path}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                errors += _cel_errors(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        errors += [e for i, item in enumerate(value) for e in _cel_errors(schema["items"], item, f"{path}[{i}]")]
    return errors


def crd_errors(obj: dict, schema: dict) -> list[str]:
    """A custom resource against its CRD's schema, its CEL rules, and metadata as a Kubernetes ObjectMeta."""
    errors = [
        f"{_name(obj)}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]
    errors += [f"{_name(obj)}: {e}" for e in _cel_errors(schema, obj, "")]
    try:  # ObjectMeta, checked in a shell the bundled schemas know
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, K8S_VERSION, strict=True
        )
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{_name(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def _schema_errors(objs, version: str = K8S_VERSION) -> list[str]:
    """Every object against Kubernetes `version`'s schemas (strict), a custom resource against its CRD's."""
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{_name(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            schema = crd_schema(obj["apiVersion"], obj["kind"])
            if schema is None:
                errors.append(f"{_name(obj)}: {e.message} (a custom resource needs its CRD's schema in tests/schemas)")
            else:
                errors += crd_errors(obj, schema)
    return errors


def test_every_object_validates_against_the_kubernetes_schema(overlay):
    name, objs = overlay
    assert objs, f"overlay {name} rendered nothing"
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))


def test_the_base_builds_and_validates(kubectl):
    objs = _render(kubectl, "base")
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))
    # no NetworkPolicy of the base admits another namespace by name: the components that bring a scraper
    # or an autoscaler admit theirs, from settings.yaml
    for policy in _find(objs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                assert peer.get("namespaceSelector", {}) == {}, f"{_name(policy)} names a namespace: {peer}"


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


def test_each_scaled_deployment_has_one_autoscaler(overlay):
    """The overlays scale with KEDA (components/autoscaling-keda; tests/test_deploy_k8s_scaling.py checks it
    and the prometheus-adapter alternative): one ScaledObject or HPA per Deployment, never both, since KEDA
    makes its own HPA for a ScaledObject; the Deployment leaves replicas to it."""
    _, objs = overlay
    scaled: dict[tuple[str, str], list[str]] = {}
    for autoscaler in _find(objs, "HorizontalPodAutoscaler") + _find(objs, "ScaledObject"):
        ref = autoscaler["spec"]["scaleTargetRef"]
        scaled.setdefault((ref.get("kind", "Deployment"), ref["name"]), []).append(_name(autoscaler))
    assert {("Deployment", "pso-reward-server"), ("Deployment", "pso-actor")} <= scaled.keys()
    for (kind, name), by in scaled.items():
        assert len(by) == 1, f"{kind}/{name} has several autoscalers: {by}"
        (target,) = _find(objs, kind, name) or [None]
        assert target is not None and kind == "Deployment", f"{by[0]}: no Deployment {name}"
        assert "replicas" not in target["spec"], f"{_name(target)}: its autoscaler owns replicas; do not set them"
    assert _find(objs, "PodDisruptionBudget", "pso-actor")


def _selects(policy: dict, labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def overlay_settings(name: str) -> dict[str, str]:
    """The overlay's settings.yaml (the local ConfigMap pso-settings, which the components read)."""
    return yaml.safe_load((K8S / "overlays" / name / "settings.yaml").read_text())["data"]


def test_network_policies_fence_redis_and_the_reward_server(overlay):
    name, objs = overlay
    # Prometheus' namespace, and KEDA's (it reads the reward servers' /metrics), as settings.yaml names them
    scrapers = {overlay_settings(name)[k] for k in ("kedaNamespace", "prometheusNamespace")}
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
                        or (len(ns) == 1 and ns.get("kubernetes.io/metadata.name") in scrapers)
                    ), f"{_name(policy)} admits {peer} to {workload}"
    learner = [p for p in policies if p not in deny and _selects(p, pods["pso-learner-node-0"])]  # a JobSet's Job
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
        assert images == {f"pso-service:{VERSION}-gpu"}
        assert all(gpus.get(s) for s in GPU_SERVICES), f"nvidia.com/gpu limits missing: {gpus}"
        assert int(gpus["learner"]) == int(learner_env["PSO_GPUS_PER_NODE"]), "one learner process per GPU"
        tolerated = [w for w, c, cmd in _pso_containers(objs) if cmd in GPU_SERVICES]
        assert all(
            any(t.get("key") == "nvidia.com/gpu" for t in w["spec"]["template"]["spec"].get("tolerations", []))
            for w in tolerated
        )
    else:
        assert images == {f"pso-service:{VERSION}-cpu"}
        assert not any(gpus.values()), f"GPUs requested in {name}: {gpus}"
        assert learner_env["PSO_GPUS_PER_NODE"] == "1"


def test_overlay_storage_and_jobs(overlay):
    """Both overlays default to ReadWriteOnce volumes, which every cluster's default class gives: one learner
    pod on pso-checkpoints (and pso-hf-cache, its own model cache, in the gpu overlay), no shared model cache
    and no preload Job (tests/test_deploy_k8s_scaling.py renders the other layouts)."""
    name, objs = overlay
    (checkpoints,) = _find(objs, "PersistentVolumeClaim", "pso-checkpoints")
    assert checkpoints["spec"]["accessModes"] == ["ReadWriteOnce"]
    ((learner, _),) = [(w, c) for w, c, command in _pso_containers(objs) if command == "learner"]
    assert learner["spec"]["parallelism"] == learner["spec"]["completions"] == 1, "a ReadWriteOnce claim: one pod"
    for cache in _find(objs, "PersistentVolumeClaim", "pso-hf-cache"):
        assert name == "gpu" and cache["spec"]["accessModes"] == ["ReadWriteOnce"]
        users = {
            _name(w)
            for w in _workloads(objs)
            for v in w["spec"]["template"]["spec"].get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == "pso-hf-cache"
        }
        assert users == {_name(learner)}, f"pso-hf-cache is ReadWriteOnce, the learner's only: {users}"
    assert not _find(objs, "Job", "pso-preload")
    preload = [(w, c) for w, c, command in _pso_containers(objs) if command == "preload"]
    if name == "gpu":  # each reward-server and actor pod fills its own model cache before its service starts
        deployments = {_name(w) for w in _find(objs, "Deployment")}
        assert deployments == {_name(w) for w, c in preload if c in w["spec"]["template"]["spec"]["initContainers"]}
    else:
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
