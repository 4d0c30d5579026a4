"""Monitoring of the Kubernetes deployment: deploy/k8s/components/monitoring (Prometheus Operator monitors,
alerts, the Grafana dashboard as a ConfigMap), deploy/k8s/components/redis-exporter (the Redis exporter
sidecar) and deploy/grafana/pso.json, rendered with each overlay by `kubectl kustomize`:

- the Prometheus Operator objects validate against the vendored CRD schemas (tests/schemas/prometheus-operator),
  the other objects the components add or change against the Kubernetes schemas (kubernetes-validate, strict);
- the monitors select the pods (the learner: its metrics Service) and ports that serve /metrics;
- every alert and every dashboard query parses as PromQL (promql-parser) and names only metrics that the code
  exports (the real registries, read as /metrics shows them) or redis_exporter does (tests/schemas/redis-exporter),
  with labels they carry, and vector matches on labels both sides keep;
- the exporter runs restricted, with the password from the Secret, reachable by Prometheus on its port only.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import kubernetes_validate
import promql_parser as promql
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from reward_helpers import scene_batch

from actors.actor import ActorStats
from actors.metrics import ActorCollector
from learner.metrics import COUNTERS, GAUGES, MetricsSink
from pso.config.reward_server import RewardServerConfig
from pso.reward_norm import RewardNormalizer
from reward_server.app import CONTENT_TYPES, OPEN_PATHS, create_app
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MONITORING, EXPORTER = "components/monitoring", "components/redis-exporter"
OVERLAYS = ("cpu-tiny", "gpu")
K8S_VERSION = "1.33.0"  # as tests/test_deploy_k8s.py
SCHEMAS = ROOT / "tests" / "schemas"
DASHBOARD = ROOT / "deploy" / "grafana" / "pso.json"
GROUP = "monitoring.coreos.com"

# Labels Prometheus (the operator's scrape configuration) puts on every series of a target
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "container", "endpoint", "service"})
# Series Prometheus writes itself, per target
PROMETHEUS_SERIES = {"up": frozenset()}
# Values the reward server's `endpoint` label takes (reward_server/guard.py: known paths, else "other")
ENDPOINTS = {*OPEN_PATHS, *CONTENT_TYPES, "/v1/models", "other"}
STATUSES = {str(code) for code in range(100, 600)}
# Pod labels the Job and JobSet controllers add (a Service may select rank 0's pod by them)
CONTROLLER_LABELS = {
    "batch.kubernetes.io/job-completion-index",
    "jobset.sigs.k8s.io/job-index",
    "jobset.sigs.k8s.io/replicatedjob-name",
    "jobset.sigs.k8s.io/jobset-name",
    "jobset.sigs.k8s.io/job-key",
    "jobset.sigs.k8s.io/restart-attempt",
}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "30s", "$__range": "1h"}
# What the brief of the monitoring asked for, by alert
REQUIRED_ALERTS = {
    "PSOLearnerStarved",  # learner starved
    "PSOLearnerNoUpdates",
    "PSOActorsStalled",  # actors stalled
    "PSOActorRedisFull",
    "PSORewardServerSaturated",  # reward server saturated
    "PSORewardServerErrors",  # or failing
    "PSORedisMemoryNearLimit",  # Redis memory near its limit
}
# What the dashboard must show, by metric
DASHBOARD_METRICS = {
    "pso_learner_updates_total",  # learner updates/s
    "pso_learner_wait_seconds_total",  # waiting for experience
    "pso_learner_actors_wanted",  # actors wanted ...
    "up",  # ... vs running
    "pso_actor_records_total",  # actor records/s
    "pso_actor_reward_mean",  # and reward
    "pso_reward_pending_images",  # reward server pending images
    "pso_reward_request_seconds_bucket",  # latency
    "pso_reward_requests_total",  # error rate
    "redis_memory_used_bytes",  # Redis memory
    "redis_memory_max_bytes",  # vs max
}


# --- rendering -------------------------------------------------------------------------------------


def namespace_of(overlay: str) -> str:
    return yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]


def settings_of(overlay: str) -> dict[str, str]:
    return yaml.safe_load((K8S / "overlays" / overlay / "settings.yaml").read_text())["data"]


def render(kubectl: str, overlay: str, components: tuple[str, ...] = (), patches: tuple[dict, ...] = ()) -> list[dict]:
    """The overlay with the components, as a kustomization of an operator's own would include them (with the
    overlay's namespace, as deploy/k8s/README.md says)."""
    with tempfile.TemporaryDirectory(prefix="pso-monitoring-") as folder:
        relative = functools.partial(os.path.relpath, start=folder)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": namespace_of(overlay),
            "resources": [relative(K8S / "overlays" / overlay)],
            "components": [relative(K8S / c) for c in components],
            "patches": list(patches),
        }
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        out = subprocess.run([kubectl, "kustomize", folder], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize of {overlay} with {components} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@functools.cache
def rendered(kubectl: str, overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    return tuple(render(kubectl, overlay, components))


@pytest.fixture(params=OVERLAYS, scope="module")
def overlay(request, kubectl) -> tuple[str, tuple[dict, ...], tuple[dict, ...]]:
    """(name, the overlay alone, the overlay with both components)."""
    name = request.param
    return name, rendered(kubectl, name), rendered(kubectl, name, (MONITORING, EXPORTER))


def key(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objs, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def pod_templates(obj) -> list[dict]:
    """Every pod template inside a workload (Deployment, StatefulSet, JobSet: any depth)."""
    if isinstance(obj, list):
        return [t for item in obj for t in pod_templates(item)]
    if not isinstance(obj, dict):
        return []
    if isinstance(obj.get("spec"), dict) and "containers" in obj["spec"] and "metadata" in obj:
        return [obj]
    return [t for value in obj.values() for t in pod_templates(value)]


def env_of(container: dict) -> dict[str, str]:
    return {v["name"]: v.get("value", "") for v in container.get("env", [])}


# --- schemas ---------------------------------------------------------------------------------------


def strict(schema):
    """As the API server with kubectl's strict field validation: an object schema that lists properties rejects
    others, unless it allows them (additionalProperties, x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    path = SCHEMAS / "prometheus-operator" / f"{GROUP}_v1_{kind.lower()}.json"
    schema = json.loads(path.read_text())
    assert "x-kubernetes-validations" not in path.read_text(), f"{path.name}: CEL rules this test does not check"
    return strict(schema)


def schema_errors(obj: dict) -> list[str]:
    if obj["apiVersion"].startswith(f"{GROUP}/"):
        assert obj["apiVersion"] == f"{GROUP}/v1", obj["apiVersion"]
        errors = [
            f"{key(obj)}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj)
        ]
        name = obj["metadata"]["name"]
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 253:
            errors.append(f"{key(obj)}: not a DNS-1123 name")
        return errors
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{key(obj)}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_the_vendored_schemas_are_the_crds_of_one_release():
    sources = set()
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
        schema = json.loads((SCHEMAS / "prometheus-operator" / f"{GROUP}_v1_{kind.lower()}.json").read_text())
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec"}, kind
        source = schema["x-source"]
        sources.add((source["version"], source["commit"]))
        assert source["path"].endswith(f"{GROUP}_{kind.lower()}s.yaml") and source["licence"] == "Apache-2.0"
    ((version, commit),) = sources
    readme = (SCHEMAS / "prometheus-operator" / "README.md").read_text()
    assert version in readme and commit in readme and (SCHEMAS / "prometheus-operator" / "LICENSE").is_file()
    # the strict reading rejects what the API server would drop
    spec = {"selector": {}, "podMetricsEndpoints": [{"port": "http", "pathh": "/metrics"}]}
    bad = {"apiVersion": f"{GROUP}/v1", "kind": "PodMonitor", "metadata": {"name": "x"}, "spec": spec}
    assert any("pathh" in e for e in schema_errors(bad))


def test_the_components_add_their_objects_and_change_only_redis(overlay):
    name, plain, full = overlay
    before, after = {key(o): o for o in plain}, {key(o): o for o in full}
    added = sorted(after.keys() - before.keys())
    assert added == sorted(
        [
            "PodMonitor/pso-reward-server",
            "PodMonitor/pso-actor",
            "PodMonitor/pso-redis",
            "ServiceMonitor/pso-learner",
            "PrometheusRule/pso",
            "ConfigMap/pso-grafana-dashboard",
            "NetworkPolicy/pso-monitoring-reward-server",
            "NetworkPolicy/pso-monitoring-actor",
            "NetworkPolicy/pso-monitoring-learner",
            "NetworkPolicy/pso-prometheus-redis-exporter",
        ]
    )
    assert before.keys() <= after.keys()
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["StatefulSet/pso-redis"], changed
    namespace = namespace_of(name)
    for k in [*added, *changed]:
        obj = after[k]
        assert obj["metadata"].get("namespace") == namespace, f"{k} is not in the overlay's namespace"
        assert obj["metadata"]["labels"].get("app.kubernetes.io/part-of") == "pso", k
    errors = [e for k in [*added, *changed] for e in schema_errors(after[k])]
    assert not errors, "\n".join(errors)


def test_monitoring_alone_renders_and_validates(kubectl):
    objs = rendered(kubectl, "cpu-tiny", (MONITORING,))
    errors = [e for o in objs if o["apiVersion"].startswith(GROUP) for e in schema_errors(o)]
    assert not errors, "\n".join(errors)
    (redis,) = find(objs, "StatefulSet", "pso-redis")
    ports = {p.get("name") for t in pod_templates(redis) for c in t["spec"]["containers"] for p in c.get("ports", [])}
    assert "metrics" not in ports, "without the exporter, the pso-redis PodMonitor must find nothing to scrape"


# --- monitors --------------------------------------------------------------------------------------


def served_port(container: dict) -> int | None:
    """The port a container serves /metrics on, by the code's configuration in its environment."""
    env = env_of(container)
    if container.get("args", [None])[0] == "reward-server":
        return int(env.get("PSO__REWARD_SERVER__PORT") or RewardServerConfig().port)
    for variable in ("PSO__ACTOR__METRICS_PORT", "PSO__LEARNER__METRICS_PORT"):
        if variable in env:
            return int(env[variable])
    if "redis_exporter" in container["image"]:
        return int(env.get("REDIS_EXPORTER_WEB_LISTEN_ADDRESS", ":9121").rsplit(":", 1)[1])
    return None


def container_ports(pod: dict, port: str | int) -> list[tuple[dict, dict]]:
    """(container, its port) of the pod template's containers whose port has that name or number."""
    return [
        (c, p)
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
        if port in (p.get("name"), p["containerPort"])
    ]


def monitor_jobs(objs) -> dict[str, list[int]]:
    """job label -> the container ports each monitor scrapes under it; asserts the monitors find them."""
    jobs: dict[str, list[int]] = {}
    templates = [(w, t) for w in objs for t in pod_templates(w)]
    for monitor in find(objs, "PodMonitor"):
        selector, job_label = monitor["spec"]["selector"]["matchLabels"], monitor["spec"]["jobLabel"]
        pods = [t for _, t in templates if selector.items() <= t["metadata"].get("labels", {}).items()]
        assert pods, f"{key(monitor)} selects no pod template"
        for pod in pods:
            job = pod["metadata"]["labels"].get(job_label)
            assert job, f"{key(monitor)}: the pods have no label {job_label} (its jobLabel)"
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["path"] == "/metrics"
                serving = container_ports(pod, endpoint["port"])
                if monitor["metadata"]["name"] == "pso-redis" and not serving:
                    continue  # no exporter: nothing to scrape
                ((container, port),) = serving
                assert port["containerPort"] == served_port(container), f"{key(monitor)}: {container['name']}"
                jobs.setdefault(job, []).append(port["containerPort"])
    for monitor in find(objs, "ServiceMonitor"):
        selector, job_label = monitor["spec"]["selector"]["matchLabels"], monitor["spec"]["jobLabel"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            matches = [
                (s, p)
                for s in find(objs, "Service")
                if selector.items() <= s["metadata"].get("labels", {}).items()
                for p in s["spec"]["ports"]
                if p.get("name") == endpoint["port"]
            ]
            assert [s["metadata"]["name"] for s, _ in matches] == ["pso-learner-metrics"], matches
            ((service, port),) = matches
            # the labels the Job and JobSet controllers add to the pods are not in the templates
            own = {k: v for k, v in service["spec"]["selector"].items() if k not in CONTROLLER_LABELS}
            pods = [t for _, t in templates if own.items() <= t["metadata"].get("labels", {}).items()]
            assert pods, f"{key(service)} selects no pod template"
            for pod in pods:
                ((container, target),) = container_ports(pod, port["targetPort"])
                assert target["containerPort"] == served_port(container), key(service)
            jobs.setdefault(service["metadata"]["labels"][job_label], []).append(target["containerPort"])
    return jobs


def test_the_monitors_scrape_every_service_where_it_serves_metrics(overlay):
    _, _, full = overlay
    jobs = monitor_jobs(full)
    assert set(jobs) == {"pso-reward-server", "pso-actor", "pso-learner", "pso-redis"}, jobs
    assert all(len(set(ports)) == 1 for ports in jobs.values()), jobs
    for obj in full:
        if obj["apiVersion"].startswith(GROUP):
            assert obj["metadata"]["labels"].get("release") == "kube-prometheus-stack", key(obj)


# The patch deploy/k8s/README.md ("Monitoring") gives for another kube-prometheus-stack release name
RELEASE_PATCH = """\
patches:
  - target:
      group: monitoring.coreos.com
    patch: |
      - op: replace
        path: /metadata/labels/release
        value: my-prometheus
"""


def test_the_release_label_is_set_with_the_documented_patch(kubectl):
    readme = (K8S / "README.md").read_text()
    assert RELEASE_PATCH in readme, "deploy/k8s/README.md shows another patch for the release label"
    objs = render(kubectl, "cpu-tiny", (MONITORING, EXPORTER), tuple(yaml.safe_load(RELEASE_PATCH)["patches"]))
    labelled = {key(o): o["metadata"]["labels"].get("release") for o in objs if o["apiVersion"].startswith(GROUP)}
    assert len(labelled) == 5 and set(labelled.values()) == {"my-prometheus"}, labelled


# --- the Redis exporter ------------------------------------------------------------------------------


def test_the_redis_exporter_is_a_restricted_sidecar_with_the_secret_and_a_pinned_image(overlay):
    _, plain, full = overlay
    (before,) = find(plain, "StatefulSet", "pso-redis")
    (after,) = find(full, "StatefulSet", "pso-redis")
    pod = after["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"redis", "redis-exporter"}
    assert containers["redis"] == before["spec"]["template"]["spec"]["containers"][0], "Redis itself unchanged"
    exporter = containers["redis-exporter"]

    (version,) = re.fullmatch(r"oliver006/redis_exporter:v(\d+\.\d+\.\d+)", exporter["image"]).groups()
    assert (SCHEMAS / "redis-exporter" / f"metrics-v{version}.txt").is_file(), "metric names of another version"

    env = {v["name"]: v for v in exporter["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "pso-secrets", "key": "redis-password"}
    redis_port = next(p["containerPort"] for p in containers["redis"]["ports"] if p["name"] == "redis")
    assert env["REDIS_ADDR"]["value"] == f"redis://127.0.0.1:{redis_port}"
    (port,) = exporter["ports"]
    assert port == {"name": "metrics", "containerPort": served_port(exporter)} and port["containerPort"] == 9121
    notes = pod["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"], notes["prometheus.io/path"]) == (
        "true",
        str(port["containerPort"]),
        "/metrics",
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert exporter[probe]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert exporter["resources"]["requests"] and "memory" in exporter["resources"]["limits"]

    # the restricted Pod Security Standard, as every pso container
    pod_sc, sc = pod["spec"]["securityContext"], exporter["securityContext"]
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True and sc.get("runAsUser", 1) != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc.get("seccompProfile", pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}


def test_prometheus_may_reach_the_scraped_ports_and_nothing_else(overlay):
    """The components' NetworkPolicies admit the overlay's prometheusNamespace to each port a monitor scrapes, on
    the pods it scrapes there, and to nothing else (Redis' own port stays closed to it)."""
    name, plain, full = overlay
    prometheus = settings_of(name)["prometheusNamespace"]
    added = [p for p in find(full, "NetworkPolicy") if p not in find(plain, "NetworkPolicy")]
    admitted = set()
    for policy in added:
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": prometheus}}}]
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP", key(policy)
        admitted.add((policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], port["port"]))
    scraped = {(job, port) for job, ports in monitor_jobs(full).items() for port in ports}
    assert admitted == scraped, f"admitted {sorted(admitted)}, scraped {sorted(scraped)}"


# --- PromQL against what the code exports ---------------------------------------------------------------


def _families(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str] | None]:
    """Every series name a scrape of the pso services and the exporter can give, with its labels (None: not
    known); read from the real registries."""
    found: dict[str, set[str]] = {}
    # the learner, after an update (its gauges appear with their first value)
    sink = MetricsSink(None)
    row = {"updates": 1, "version": 1, "loss": 0.69, "margin": 0.0, "accuracy": 0.5, "reward_mean": 0.1}
    row |= {"staleness": 0.5, "pairs_per_s": 1.0, "wait_s": 0.5} | {k: 1.0 for k in GAUGES} | dict.fromkeys(COUNTERS, 1)
    sink.write(row)
    # the actor, with reward normalisation (its per-model gauges)
    registry, normalizer = CollectorRegistry(), RewardNormalizer({"tiny-large": 1.0})
    normalizer.total({"tiny-large": [0.1, 0.3]})
    registry.register(ActorCollector(SimpleNamespace(stats=ActorStats(), version=0, normalizer=normalizer)))
    for text in (generate_latest(sink.registry).decode(), generate_latest(registry).decode()):
        for name, labels in _families(text).items():
            found.setdefault(name, set()).update(labels)
    # the reward server, after scoring (every labelled series exists)
    with serve_in_background(create_app(RewardServerConfig())) as url:
        client = RewardClient(url)
        client.wait_ready(300)
        client.score(*scene_batch(2))
        for name, labels in _families(httpx.get(f"{url}/metrics").text).items():
            found.setdefault(name, set()).update(labels)
    assert {"pso_learner_updates_total", "pso_actor_redis_full_total", "pso_reward_pending_images"} <= found.keys()
    catalogue: dict[str, frozenset[str] | None] = {name: frozenset(labels) for name, labels in found.items()}
    (listing,) = (SCHEMAS / "redis-exporter").glob("metrics-v*.txt")
    for line in listing.read_text().splitlines():
        if line and not line.startswith("#"):
            name, labels = line.split()
            catalogue[name] = None if labels == "*" else frozenset(labels.split(",")) - {"-"}
    return catalogue | PROMETHEUS_SERIES


def _alternatives_match(pattern: str, values: set[str], regex: bool) -> bool:
    """Every alternative of a label matcher's value names at least one value the label really takes."""
    if not regex:
        return pattern in values
    return all(any(re.fullmatch(alt, v) for v in values) for alt in pattern.split("|"))


SCALAR = "scalar"


def promql_problems(expr: str, exported: dict, jobs: set[str]) -> list[str]:
    """Why `expr` would not do what it says against the series the services export, or []."""
    try:
        tree = promql.parse(expr)
    except ValueError as e:
        return [f"does not parse: {e}"]
    problems: list[str] = []
    values = {"job": jobs, "endpoint": ENDPOINTS, "status": STATUSES}

    def labels(node) -> frozenset[str] | str | None:
        """The labels the node's result series carry (None: not known; SCALAR: a number)."""
        kind = type(node).__name__
        if kind == "NumberLiteral":
            return SCALAR
        if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            return labels(node.expr)
        if kind == "MatrixSelector":
            return labels(node.vector_selector)
        if kind == "VectorSelector":
            if node.name not in exported:
                problems.append(f"{node.name}: no service exports it")
                return None
            known = exported[node.name]
            for matcher in node.matchers.matchers:
                if known is not None and matcher.name not in known | TARGET_LABELS:
                    problems.append(f"{node.name} has no label {matcher.name}")
                regex = str(matcher.op) in ("MatchOp.Re", "MatchOp.NotRe")
                if matcher.name in values and not _alternatives_match(matcher.value, values[matcher.name], regex):
                    problems.append(f"{node.name}{{{matcher.name}: {matcher.value!r}}} matches no value it takes")
            return None if known is None else known | TARGET_LABELS
        if kind == "Call":
            args = [labels(a) for a in node.args]
            vectors = [a for a in args if a is not SCALAR]
            if node.func.name in ("absent", "absent_over_time", "vector", "time", "scalar"):
                return frozenset() if node.func.name != "time" and node.func.name != "scalar" else SCALAR
            inner = vectors[0] if vectors else SCALAR
            return inner - {"le"} if node.func.name == "histogram_quantile" and inner not in (None, SCALAR) else inner
        if kind == "AggregateExpr":
            inner = labels(node.expr)
            modifier = node.modifier
            if modifier is None or inner is None:
                return frozenset() if modifier is None else None
            grouped = frozenset(modifier.labels)
            if modifier.type == promql.AggModifierType.By:
                missing = grouped - inner
                if missing:
                    problems.append(f"by {sorted(missing)}: not labels of {node.expr}")
                return grouped
            return inner - grouped
        if kind == "BinaryExpr":
            left, right = labels(node.lhs), labels(node.rhs)
            if SCALAR in (left, right):
                return right if left is SCALAR else left
            if left is None or right is None:
                return left if left is not None else right
            matching = node.modifier.matching if node.modifier is not None else None
            op = str(node.op)
            if matching is not None and matching.type == promql.LabelModifierType.Include:  # on (...)
                missing = (set(matching.labels) - left) | (set(matching.labels) - right)
                if missing:
                    problems.append(f"on {sorted(missing)}: not a label of both sides of {node}")
            else:
                ignored = set(matching.labels) if matching is not None else set()
                if op != "or" and left - ignored != right - ignored:
                    problems.append(f"the sides of {op} in {node} never match: {sorted(left)} vs {sorted(right)}")
            return left | right if op == "or" else left
        problems.append(f"unexpected {kind}: {node}")
        return None

    labels(tree)
    return problems


def test_the_checker_catches_what_it_is_for(exported):
    jobs = {"pso-actor"}
    assert promql_problems("sum(rate(pso_actor_records_total[5m])", exported, jobs)  # unbalanced
    assert promql_problems("rate(pso_actor_records[5m])", exported, jobs)  # the name without _total
    assert promql_problems('pso_reward_requests_total{code="500"}', exported, jobs)  # no such label
    assert promql_problems('pso_reward_requests_total{status=~"5xx"}', exported, jobs)  # no such value
    assert promql_problems('up{job="pso-actors"}', exported, jobs)
    assert promql_problems("sum by (pod) (pso_learner_backlog) / sum(pso_actor_version)", exported, jobs)
    assert promql_problems(
        "sum(pso_learner_backlog) and on (pod) sum by (namespace) (pso_actor_version)", exported, jobs
    )
    assert promql_problems("sum by (device) (pso_actor_version)", exported, jobs)
    assert not promql_problems("redis_memory_used_bytes / redis_memory_max_bytes > 0.9", exported, jobs)


def test_every_alert_is_complete_and_asks_prometheus_only_what_is_exported(kubectl, exported):
    objs = rendered(kubectl, "cpu-tiny", (MONITORING, EXPORTER))
    jobs = set(monitor_jobs(objs))
    (rule,) = find(objs, "PrometheusRule")
    problems, names = [], []
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            name = r.get("alert")
            assert name and "record" not in r, r
            names.append(name)
            if not re.fullmatch(r"\d+[smh]", str(r.get("for", ""))):
                problems.append(f"{name}: no `for`")
            if r.get("labels", {}).get("severity") not in ("critical", "warning"):
                problems.append(f"{name}: severity {r.get('labels', {}).get('severity')!r}")
            notes = r.get("annotations", {})
            for field in ("summary", "description", "runbook"):
                if not str(notes.get(field, "")).strip():
                    problems.append(f"{name}: no {field}")
            used = set(re.findall(r"\$labels\.(\w+)", json.dumps(notes)))
            if not used <= TARGET_LABELS:
                problems.append(f"{name}: annotations use labels {sorted(used - TARGET_LABELS)}")
            problems += [f"{name}: {p}" for p in promql_problems(r["expr"], exported, jobs)]
    assert not problems, "\n".join(problems)
    assert len(names) == len(set(names)), "alert names repeat"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    near = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "PSORedisMemoryNearLimit")
    printed = " ".join(str(promql.parse(near["expr"])).replace("{}", "").split())  # the parser's normal form
    assert printed.startswith("redis_memory_used_bytes / redis_memory_max_bytes > 0.9 and "), printed


# --- the Grafana dashboard ----------------------------------------------------------------------------


def _panels(panels: list[dict]) -> list[dict]:
    return [q for p in panels for q in [p, *_panels(p.get("panels", []))]]


def test_the_dashboard_queries_only_what_is_exported_and_shows_what_matters(kubectl, exported):
    dashboard = json.loads(DASHBOARD.read_text())
    objs = rendered(kubectl, "cpu-tiny", (MONITORING, EXPORTER))
    (shipped,) = find(objs, "ConfigMap", "pso-grafana-dashboard")
    assert shipped["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(shipped["data"]["pso.json"]) == dashboard, "the ConfigMap ships another dashboard"
    jobs = set(monitor_jobs(objs))

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    (metric, label) = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variables["namespace"]["query"]["query"]).groups()
    assert metric in exported and label in TARGET_LABELS | (exported[metric] or set())

    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    problems, names = [], set()
    for panel in (p for p in panels if p["type"] != "row"):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for variable in set(re.findall(r"\$\{?(\w+)\}?", expr)):
                if f"${variable}" not in GRAFANA_VARIABLES and variable not in variables:
                    problems.append(f"{panel['title']}: ${variable} is not a variable of the dashboard")
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            expr = re.sub(r"\$\{?namespace\}?", "pso", expr)
            problems += [f"{panel['title']}: {p}" for p in promql_problems(expr, exported, jobs)]
            promql.walk(promql.parse(expr), lambda n: names.add(n.name) if hasattr(n, "matchers") else None)
    assert not problems, "\n".join(problems)
    assert DASHBOARD_METRICS <= names, DASHBOARD_METRICS - names


def test_the_dashboard_in_deploy_grafana_is_the_components_file():
    component = K8S / MONITORING / "pso-dashboard.json"
    assert DASHBOARD.resolve() == component.resolve() or DASHBOARD.read_bytes() == component.read_bytes()
    kustomization = yaml.safe_load((K8S / MONITORING / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["pso.json=pso-dashboard.json"] and generator["options"]["disableNameSuffixHash"]
