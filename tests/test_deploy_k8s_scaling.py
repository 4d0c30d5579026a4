"""Autoscaling, storage and images of the Kubernetes manifests (deploy/k8s), on a stock cluster.

The overlays as shipped, and the variants an operator makes by swapping a component or changing a setting
(rendered from a copy of deploy/k8s), are checked against KEDA's real ScaledObject schema (vendored in
tests/schemas/keda), against the code whose endpoints the autoscalers read, and against the prerequisites
that docs/deploy.md states."""

from __future__ import annotations

import ast
import copy
import functools
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from learner.metrics import GAUGES
from learner.scaling import ActorDemand
from reward_server.metrics import ServerMetrics
from tests.test_deploy_k8s import (
    K8S,
    K8S_VERSION,
    OVERLAYS,
    ROOT,
    VERSION,
    _config,
    _container_port,
    _find,
    _name,
    _pod_label_sets,
    _reward_server_get_paths,
    _schema_errors,
    _served,
    crd_errors,
    crd_schema,
    overlay_settings,
)

KEDA_SCHEMA = ROOT / "tests" / "schemas" / "keda" / "keda.sh_v1alpha1_scaledobject.json"
DOCS = ROOT / "docs" / "deploy.md"
PREREQUISITES = "## Prerequisites of a stock cluster (EKS, GKE, AKS)"
IMAGE = "pso-service"  # the image's name in the manifests, which each overlay's `images:` maps
COMPONENTS = K8S / "components"
KEDA_COMPONENT = "../../components/autoscaling-keda"
ADAPTER_COMPONENT = "../../components/autoscaling-prometheus-adapter"
LEARNER_ROUTE = "/v1/scaling"


# --- rendering: the shipped overlays, and an operator's variants of them -----------------------------------


def _kustomize(kubectl: str, folder: Path) -> tuple[dict, ...]:
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {folder} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@functools.cache
def render(kubectl: str, overlay: str, variant: tuple = ()) -> tuple[dict, ...]:
    """The overlay as shipped (variant empty), or changed as an operator would change it: `variant` is a
    tuple of (what, value) with what one of "components" (the list, relative to the overlay),
    "settings" (a dict merged into settings.yaml's data), "images" (a dict merged into the first entry)."""
    if not variant:
        return _kustomize(kubectl, K8S / "overlays" / overlay)
    work = Path(tempfile.mkdtemp(prefix="pso-k8s-"))
    shutil.copytree(K8S, work / "k8s")
    folder = work / "k8s" / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    settings = yaml.safe_load((folder / "settings.yaml").read_text())
    for what, value in variant:
        if what == "components":
            kustomization["components"] = list(value)
        elif what == "settings":
            settings["data"] |= dict(value)
        elif what == "images":
            kustomization["images"][0] |= dict(value)
        else:
            raise ValueError(what)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    (folder / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    try:
        return _kustomize(kubectl, folder)
    finally:
        shutil.rmtree(work)


def components(overlay: str) -> list[str]:
    return yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text()).get("components", [])


def swapped(overlay: str, old: str, new: list[str]) -> tuple:
    """The overlay's components with `old` replaced by `new` (the documented way to choose)."""
    listed = components(overlay)
    assert old in listed, f"overlay {overlay} does not include {old}"
    i = listed.index(old)
    return ("components", tuple(listed[:i] + new + listed[i + 1 :]))


def added(overlay: str, new: str) -> tuple:
    assert new not in components(overlay)
    return ("components", tuple([*components(overlay), new]))


@pytest.fixture(params=sorted(OVERLAYS), scope="module")
def shipped(request, kubectl) -> tuple[str, tuple[dict, ...]]:
    return request.param, render(kubectl, request.param)


def _namespace(objs) -> str:
    (namespace,) = {o["metadata"]["namespace"] for o in objs if "namespace" in o["metadata"]}
    return namespace


def pod_specs(objs):
    """(workload, pod template, how many pods at most: None where an autoscaler decides, the label sets of
    its pods) for every pod template, a JobSet's included (one Job per replica of each replicated Job)."""
    for w in objs:
        spec = w.get("spec", {})
        if w["kind"] == "JobSet":
            for job in spec["replicatedJobs"]:
                template = job["template"]["spec"]
                labels = dict(template["template"].get("metadata", {}).get("labels", {}))
                labels |= {
                    "jobset.sigs.k8s.io/jobset-name": w["metadata"]["name"],
                    "jobset.sigs.k8s.io/replicatedjob-name": job["name"],
                }
                label_sets = [labels | {"jobset.sigs.k8s.io/job-index": str(i)} for i in range(job.get("replicas", 1))]
                count = job.get("replicas", 1) * template.get("parallelism", 1)
                yield w, template["template"], count, label_sets
        elif "template" in spec:
            count = {"StatefulSet": spec.get("replicas", 1), "Job": spec.get("parallelism", 1)}.get(w["kind"])
            yield w, spec["template"], count, _pod_label_sets(w)


def containers(objs):
    """(workload, container) for every container and init container of every pod template."""
    for w, template, _, _ in pod_specs(objs):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield w, c


def pso_containers(objs):
    """(workload, container, pso subcommand) for the containers of the pso image."""
    for w, c in containers(objs):
        if c["image"].split("/")[-1].startswith(IMAGE):
            yield w, c, c["args"][0]


# --- KEDA's schema -------------------------------------------------------------------------------------------


def keda_source() -> dict:
    return json.loads(KEDA_SCHEMA.read_text())["x-source"]


def test_the_vendored_keda_schema_says_where_it_comes_from():
    source = keda_source()
    assert source["path"] == "config/crd/bases/keda.sh_scaledobjects.yaml"
    assert re.fullmatch(r"v2\.\d+\.\d+", source["version"]) and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert (source["apiVersion"], source["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert source["license"].startswith("Apache-2.0")
    licence = (KEDA_SCHEMA.parent / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    readme = (KEDA_SCHEMA.parent / "README.md").read_text()
    assert source["version"] in readme and source["commit"] in readme
    assert crd_schema("keda.sh/v1alpha1", "ScaledObject") is not None, "tests/test_deploy_k8s.py does not find it"


def _scaled_object(objs, name: str) -> dict:
    (so,) = _find(objs, "ScaledObject", name) or [None]
    assert so is not None, f"no ScaledObject {name}"
    return so


def test_the_schema_check_rejects_what_the_api_server_would(kubectl):
    """Unknown fields, wrong types, enum values and the CEL rule all fail: the check is not vacuous."""
    so = _scaled_object(render(kubectl, "gpu"), "pso-actor")
    schema = crd_schema("keda.sh/v1alpha1", "ScaledObject")
    assert not crd_errors(so, schema)
    broken = {
        "unknown spec field": lambda s: s["spec"].update(replicas=2),
        "unknown trigger field": lambda s: s["spec"]["triggers"][0].update(valueLocation="actors_wanted"),
        "unknown fallback field": lambda s: s["spec"]["fallback"].update(mode="static"),
        "metadata not a string": lambda s: s["spec"]["triggers"][0]["metadata"].update(targetValue=1),
        "count not an integer": lambda s: s["spec"].update(minReplicaCount="1"),
        "enum": lambda s: s["spec"]["fallback"].update(behavior="holdReplicas"),
        "CEL min <= max": lambda s: s["spec"].update(minReplicaCount=5, maxReplicaCount=4),
        "CEL default max 100": lambda s: (s["spec"].pop("maxReplicaCount"), s["spec"].update(minReplicaCount=101)),
        "metadata not an ObjectMeta": lambda s: s["metadata"]["labels"].update(replicas=2),
    }
    for what, change in broken.items():
        bad = copy.deepcopy(so)
        change(bad)
        assert crd_errors(bad, schema), f"{what}: accepted"


# --- actors: the learner's /v1/scaling, read by KEDA ----------------------------------------------------------


def _url_target(objs, url: str):
    """The Service a ScaledObject's URL names (as <service>.<namespace>.svc), the URL, and the containers
    behind that port: [(workload, container, container port, its pods' label sets)]."""
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.port, url
    host = parts.hostname.split(".")
    assert len(host) == 3 and host[2] == "svc", f"{url}: the KEDA operator needs <service>.<namespace>.svc"
    service, namespace = host[0], host[1]
    assert namespace == _namespace(objs), f"{url}: namespace {namespace}, the objects are in {_namespace(objs)}"
    (svc,) = _find(objs, "Service", service) or [None]
    assert svc is not None, f"{url}: no Service {service}"
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == parts.port] or [None]
    assert port is not None, f"{url}: Service {service} has no port {parts.port}"
    selector = svc["spec"]["selector"]
    behind = []
    for w, template, _, label_sets in pod_specs(objs):
        if any(selector.items() <= labels.items() for labels in label_sets):
            for c in template["spec"]["containers"]:
                number = _container_port(c, port.get("targetPort", port["port"]))
                if number is not None:
                    behind.append((w, c, number, label_sets))
    assert behind, f"{url}: Service {service} port {parts.port} reaches no container"
    return svc, parts, behind


def _trigger(so: dict, name: str) -> dict:
    (trigger,) = [t for t in so["spec"]["triggers"] if t.get("name") == name] or [None]
    assert trigger is not None, f"{_name(so)}: no trigger {name}"
    return trigger


def _learner_route_is_the_demand_report() -> bool:
    """learner/learner.py serves ActorDemand.report at LEARNER_ROUTE on rank 0's ops server."""
    tree = ast.parse((ROOT / "learner" / "learner.py").read_text())
    served = [
        ast.unparse(value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == LEARNER_ROUTE
    ]
    demand = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and [ast.unparse(t) for t in node.targets] == ["self.demand"]
        and ast.unparse(node.value).startswith("ActorDemand(")
    ]
    return served == ["self.demand.report"] and len(demand) == 1


def _reports() -> tuple[dict, dict]:
    """ActorDemand.report() before it can estimate, and after a window of production and training."""
    demand = ActorDemand(target_backlog=64, horizon_s=60.0)
    before = demand.report()
    demand.observe(produced=0, actor_busy_s=0.0, waiting=0, trained=0, busy_s=0.0, at=0.0)
    demand.observe(produced=100, actor_busy_s=50.0, waiting=16, trained=80, busy_s=10.0, at=10.0)
    return before, demand.report()


def test_the_actors_follow_the_learners_scaling_route(shipped):
    name, objs = shipped
    so = _scaled_object(objs, "pso-actor")
    ref = so["spec"]["scaleTargetRef"]
    actors = [w for w, _, command in pso_containers(objs) if command == "actor"]
    assert [_name(w) for w in actors] == ["Deployment/pso-actor"]
    assert (ref.get("apiVersion"), ref.get("kind"), ref["name"]) == ("apps/v1", "Deployment", "pso-actor")
    hpas = [
        _name(h) for h in _find(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == ref["name"]
    ]
    assert not hpas, f"KEDA makes its own HPA for {ref['name']}; these fight it: {hpas}"
    assert _learner_route_is_the_demand_report(), "learner/learner.py no longer serves ActorDemand.report there"
    before, after = _reports()
    for trigger in so["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "metrics-api" and meta["format"] == "json"
        _, url, behind = _url_target(objs, meta["url"])
        assert url.path == LEARNER_ROUTE and url.query == ""
        for w, c, number, _ in behind:  # the Service reaches the learner's ops port, which serves the route
            port, paths = _served(objs, c, "learner")
            assert c["args"][0] == "learner" and number == port and LEARNER_ROUTE in paths, _name(w)
        # a plain key of the report (a GJSON path without dots, wildcards or modifiers)
        assert re.fullmatch(r"[a-z_]+", meta["valueLocation"]) and meta["valueLocation"] in after
    # `wanted` is the estimate: null until measured, then a number; `learner` is always a number
    assert _trigger(so, "wanted")["metadata"]["valueLocation"] == "actors_wanted"
    assert before["actors_wanted"] is None and isinstance(after["actors_wanted"], float)
    presence = _trigger(so, "learner")["metadata"]["valueLocation"]
    assert all(isinstance(r[presence], int | float) and r[presence] >= 0 for r in (before, after))
    assert "actors_wanted" in GAUGES  # the same number as pso_learner_actors_wanted (the adapter path)


# A small evaluator of the expr-lang expressions KEDA's scalingModifiers.formula takes (github.com/expr-lang/expr
# v1.17: operator precedence of parser/operator/operator.go), enough to check what the formula does.
_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\d+)|([A-Za-z_]\w*)|(\?\?|==|!=|<=|>=|&&|\|\||[-+*/<>?:()!]))")
_BINARY = {"??": 500, "*": 60, "/": 60, "+": 30, "-": 30, "<": 20, ">": 20, "<=": 20, ">=": 20, "==": 20, "!=": 20}
_BINARY |= {"&&": 15, "and": 15, "||": 10, "or": 10}


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        assert m, f"formula: cannot read {text[pos:]!r}"
        out.append(m.group(m.lastindex))
        pos = m.end()
    return out


def evaluate(formula: str, values: dict[str, float | None]):
    """The formula's value for trigger values (None: a trigger failing past fallback.failureThreshold, which
    KEDA's fallback behavior scalingModifiers passes as nil). Raises where expr would fail at run time."""
    tokens = _tokens(formula)

    def peek():
        return tokens[0] if tokens else None

    def take(expected=None):
        token = tokens.pop(0)
        assert expected is None or token == expected, f"formula: expected {expected}, got {token}"
        return token

    def binary(op, a, b):
        if op == "??":
            return a if a is not None else b
        if a is None or b is None:
            raise TypeError(f"invalid operation: {a} {op} {b}")
        return {
            "*": lambda: a * b,
            "/": lambda: a / b,
            "+": lambda: a + b,
            "-": lambda: a - b,
            "<": lambda: a < b,
            ">": lambda: a > b,
            "<=": lambda: a <= b,
            ">=": lambda: a >= b,
            "==": lambda: a == b,
            "!=": lambda: a != b,
            "&&": lambda: a and b,
            "and": lambda: a and b,
            "||": lambda: a or b,
            "or": lambda: a or b,
        }[op]()

    def primary():
        token = take()
        if token == "(":
            value = expression(0)
            take(")")
            return value
        if token == "-":
            value = expression(90)
            if value is None:
                raise TypeError("invalid operation: -nil")
            return -value
        if token in ("!", "not"):
            return not expression(50)
        if token == "nil":
            return None
        if token in ("true", "false"):
            return token == "true"
        if re.fullmatch(r"\d+\.\d*|\d+", token):
            return float(token) if "." in token else int(token)
        assert token in values, f"formula names {token!r}, which is no trigger"
        return values[token]

    def expression(precedence: int):
        value = primary()
        while peek() in _BINARY and _BINARY[peek()] >= precedence:
            op = take()
            value = binary(op, value, expression(_BINARY[op] + 1))
        if precedence == 0 and peek() == "?":
            take("?")
            yes = expression(0)
            take(":")
            no = expression(0)
            value = yes if value else no
        return value

    value = expression(0)
    assert not tokens, f"formula: left over {tokens}"
    return value


def test_the_formula_evaluator_reads_expr_as_expr_does():
    assert evaluate("a ?? b ?? 8", {"a": None, "b": None}) == 8  # KEDA's own example
    assert evaluate("a ?? b ?? 8", {"a": None, "b": 3.0}) == 3.0
    assert evaluate("1 + 2 * 3 > 6 ? 1 : 0", {}) == 1
    assert evaluate("(x ?? -1) < 0 ? 0 : x", {"x": None}) == 0
    assert evaluate("-x ?? 2", {"x": 3.0}) == -3.0  # unary minus binds looser than ??, as in expr
    with pytest.raises(TypeError):
        evaluate("x < 0", {"x": None})


def keda_replicas(so: dict, values: dict[str, float | None]) -> int:
    """Where KEDA takes the target once the reads have settled: inactive (composite <= activationTarget)
    it scales to idleReplicaCount after the cooldown; active, its HPA keeps ceil(composite / target)
    within [max(minReplicaCount, 1), maxReplicaCount]."""
    spec, modifiers = so["spec"], so["spec"]["advanced"]["scalingModifiers"]
    value = evaluate(modifiers["formula"], values)
    if value is None:  # KEDA then uses fallback.replicas
        value = spec["fallback"]["replicas"] * float(modifiers["target"])
    if not float(value) > float(modifiers.get("activationTarget", 0)):
        return spec.get("idleReplicaCount", spec.get("minReplicaCount", 0))
    wanted = math.ceil(float(value) / float(modifiers["target"]))
    return min(max(wanted, spec.get("minReplicaCount", 0), 1), spec.get("maxReplicaCount", 100))


def test_actors_scale_with_the_learner_and_give_their_gpus_back_once_it_is_gone(shipped):
    name, objs = shipped
    so = _scaled_object(objs, "pso-actor")
    spec = so["spec"]
    lo, hi = spec["minReplicaCount"], spec["maxReplicaCount"]
    settings = overlay_settings(name)
    assert (lo, hi) == (int(settings["actorsMin"]), int(settings["actorsMax"])), "settings.yaml's bounds"
    triggers = [t["name"] for t in spec["triggers"]]
    assert len(set(triggers)) == len(triggers) == 2
    names = {t for t in _tokens(spec["advanced"]["scalingModifiers"]["formula"]) if re.fullmatch(r"[A-Za-z_]\w*", t)}
    assert names - {"nil", "true", "false"} == set(triggers), "the formula reads each trigger and nothing else"
    assert spec["fallback"]["behavior"] == "scalingModifiers", "a failing trigger reaches the formula as nil"
    # KEDA's admission webhook runs the formula with every trigger at -1
    assert evaluate(spec["advanced"]["scalingModifiers"]["formula"], dict.fromkeys(triggers, -1.0)) is not None
    cases = {  # (wanted, learner) -> actors
        "learner gone, finished or not up": ((None, None), 0),
        "learner up, no estimate yet": ((None, 0.0), lo),
        "estimate below one actor": ((0.2, 10.0), lo),
        "estimate of 0 (a long backlog)": ((0.0, 500.0), lo),
        "estimate": ((hi - 0.5, 3.0), hi),
        "estimate above the maximum": ((hi * 10.0, 0.0), hi),
        "KEDA's placeholder for a failing read": ((-1.0, 5.0), lo),
    }
    for case, ((wanted, learner), expected) in cases.items():
        got = keda_replicas(so, {"wanted": wanted, "learner": learner})
        assert got == expected, f"{case}: {got} actors, expected {expected}"
    assert spec["idleReplicaCount"] == 0 < lo <= hi, "idle (learner gone): no actor keeps a GPU"
    # while a read fails fewer than failureThreshold times KEDA holds the count only with fallback.replicas > 0
    assert spec["fallback"]["replicas"] > 0
    # first apply: the actors may load their model while the learner starts, within its startup budget
    ((_, learner),) = [(w, c) for w, c, command in pso_containers(objs) if command == "learner"]
    startup = learner["startupProbe"]
    assert spec["initialCooldownPeriod"] >= startup["periodSeconds"] * startup["failureThreshold"]
    # a learner pod replaced after a crash is back within the cooldown, after the failed reads
    assert spec["cooldownPeriod"] > spec["fallback"]["failureThreshold"] * spec["pollingInterval"]


# --- reward servers: their own /metrics, read by KEDA ---------------------------------------------------------


def test_the_reward_servers_scale_on_their_queue_read_from_their_own_metrics(shipped):
    name, objs = shipped
    so = _scaled_object(objs, "pso-reward-server")
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    servers = [w for w, _, command in pso_containers(objs) if command == "reward-server"]
    assert [_name(w) for w in servers] == [f"{ref['kind']}/{ref['name']}"] == ["Deployment/pso-reward-server"]
    settings = overlay_settings(name)
    assert spec["minReplicaCount"] == int(settings["rewardServersMin"]) >= 1, "the actors always need one"
    assert spec["maxReplicaCount"] == int(settings["rewardServersMax"])
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "metrics-api" and trigger.get("metricType", "AverageValue") == "AverageValue"
    _, url, behind = _url_target(objs, meta["url"])
    assert url.path in _reward_server_get_paths() and url.path == "/metrics", "served, and open without the token"
    for w, c, number, _ in behind:
        port, _ = _served(objs, c, "reward-server")
        assert c["args"][0] == "reward-server" and number == port, _name(w)
        # KEDA lists the Service's EndpointSlices and keeps the port equal to the URL's: the pods' port
        assert url.port == number, f"{meta['url']}: the endpoints serve on {number}"
        # the Prometheus text format gives KEDA the first series of the gauge, which has one per device
        assert len(_config(objs, c).reward_server.devices) == 1, f"{_name(w)}: one device per pod, or a sum"
    assert meta["format"] == "prometheus" and meta["aggregateFromKubeServiceEndpoints"] == "true"
    metrics = {m.name: m.type for m in ServerMetrics().registry.collect()}
    assert metrics.get(meta["valueLocation"]) == "gauge"
    # the sum over the pods against a per-pod target: ceil(sum / 64) replicas, as the Pods-metric HPA did
    assert meta["aggregationType"] == "sum" and float(meta["targetValue"]) == 64
    assert spec["fallback"]["behavior"] == "currentReplicas", "no pod answering (or none scored yet): hold"
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert not [h for h in _find(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == ref["name"]]


def test_keda_may_reach_what_it_reads_and_nothing_else(shipped):
    name, objs = shipped
    keda = overlay_settings(name)["kedaNamespace"]
    policies = _find(objs, "NetworkPolicy")
    for so in _find(objs, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            _, _, behind = _url_target(objs, trigger["metadata"]["url"])
            for w, _, number, label_sets in behind:
                labels = label_sets[0]
                admitted = [
                    policy
                    for policy in policies
                    if policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                    for rule in policy["spec"].get("ingress", [])
                    if any(p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": keda}
                           for p in rule.get("from", []))
                    and any(p.get("port") == number for p in rule.get("ports", []))
                ]  # fmt: skip
                assert admitted, f"no NetworkPolicy admits namespace {keda} to {_name(w)} port {number}"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if any(p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == keda
                   for p in rule.get("from", [])):  # fmt: skip
                assert policy["metadata"]["name"].startswith("pso-keda-"), _name(policy)
                assert len(rule["ports"]) == 1, f"{_name(policy)} opens more than the port KEDA reads"


def test_the_settings_reach_the_objects(kubectl):
    """Another namespace for KEDA and other bounds, set in settings.yaml only, land where they belong."""
    objs = render(kubectl, "gpu", (("settings", (("kedaNamespace", "autoscalers"), ("actorsMax", "3"))),))
    assert _scaled_object(objs, "pso-actor")["spec"]["maxReplicaCount"] == 3
    keda = [p for p in _find(objs, "NetworkPolicy") if p["metadata"]["name"].startswith("pso-keda-")]
    assert keda and all(
        peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "autoscalers"}
        for p in keda
        for rule in p["spec"]["ingress"]
        for peer in rule["from"]
    )
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))


def test_no_autoscaler_needs_metrics_server(shipped, kubectl):
    """No ScaledObject trigger or HPA metric reads CPU or memory (the resource metrics API that metrics-server
    serves), in the shipped overlays or with the prometheus-adapter component: EKS needs no metrics-server."""
    name, objs = shipped
    adapter = render(kubectl, name, (swapped(name, KEDA_COMPONENT, [ADAPTER_COMPONENT]),))
    for variant in (objs, adapter):
        kinds = {t["type"] for so in _find(variant, "ScaledObject") for t in so["spec"]["triggers"]}
        kinds |= {m["type"] for h in _find(variant, "HorizontalPodAutoscaler") for m in h["spec"]["metrics"]}
        assert kinds and not kinds & {"cpu", "memory", "Resource", "ContainerResource"}, kinds


# --- the prometheus-adapter alternative ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_prometheus_adapter_alternative_replaces_the_scaled_objects(kubectl, overlay):
    variant = (
        swapped(overlay, KEDA_COMPONENT, [ADAPTER_COMPONENT]),
        ("settings", (("prometheusNamespace", "observability"), ("actorsMin", "3"))),
    )
    objs = render(kubectl, overlay, variant)
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))
    assert not _find(objs, "ScaledObject")
    assert not [p for p in _find(objs, "NetworkPolicy") if p["metadata"]["name"].startswith("pso-keda-")]
    (rules_cm,) = _find(objs, "ConfigMap", "pso-prometheus-adapter-rules")
    rules = yaml.safe_load(rules_cm["data"]["config.yaml"])
    served = {
        "Pods": {r["name"]["as"] for r in rules.get("rules", [])},
        "External": {r["name"]["as"] for r in rules.get("externalRules", [])},
    }
    hpas = {h["metadata"]["name"]: h for h in _find(objs, "HorizontalPodAutoscaler")}
    assert hpas.keys() == {"pso-reward-server", "pso-actor"}
    for hpa in hpas.values():
        ref, spec = hpa["spec"]["scaleTargetRef"], hpa["spec"]
        (target,) = _find(objs, ref["kind"], ref["name"]) or [None]
        assert target is not None and ref["kind"] == "Deployment", f"{_name(hpa)}: no Deployment {ref['name']}"
        assert "replicas" not in target["spec"], f"{_name(target)}: its HPA owns replicas; do not set them"
        assert 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]
        for metric in spec["metrics"]:
            kind = metric["type"]
            metric_name = metric[kind.lower()]["metric"]["name"]
            assert metric_name in served.get(kind, set()), f"{_name(hpa)}: {kind} metric {metric_name} has no rule"
    settings = overlay_settings(overlay)
    assert hpas["pso-actor"]["spec"]["minReplicas"] == 3
    assert hpas["pso-actor"]["spec"]["maxReplicas"] == int(settings["actorsMax"])
    assert hpas["pso-reward-server"]["spec"]["maxReplicas"] == int(settings["rewardServersMax"])
    (reward,) = hpas["pso-reward-server"]["spec"]["metrics"]
    assert reward["pods"]["metric"]["name"] == "pso_reward_pending_images"
    assert "pso_reward_pending_images" in {m.name for m in ServerMetrics().registry.collect()}
    (actor,) = hpas["pso-actor"]["spec"]["metrics"]
    assert actor["external"]["metric"]["name"] == "pso_learner_actors_wanted"
    assert "actors_wanted" in GAUGES  # the learner serves it as pso_learner_actors_wanted once measured
    assert actor["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpas["pso-reward-server"]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    # Prometheus, in the namespace the settings name, may scrape what the rules read
    scraped = {
        (policy["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name"), port["port"])
        for policy in _find(objs, "NetworkPolicy")
        for rule in policy["spec"].get("ingress", [])
        if {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}} in rule["from"]
        for port in rule.get("ports", [])
    }
    metrics_ports = {
        (w["metadata"]["name"], _served(objs, c, command)[0])
        for w, c, command in pso_containers(objs)
        if command in ("reward-server", "actor", "learner")
    }
    assert metrics_ports <= scraped, f"not admitted: {metrics_ports - scraped}"


def test_keda_and_the_adapter_are_never_both_used(kubectl):
    variant = (added("gpu", ADAPTER_COMPONENT),)
    objs = render(kubectl, "gpu", variant)
    scaled = [h["spec"]["scaleTargetRef"]["name"] for h in _find(objs, "HorizontalPodAutoscaler")]
    scaled += [s["spec"]["scaleTargetRef"]["name"] for s in _find(objs, "ScaledObject")]
    assert len(scaled) > len(set(scaled)), "both components side by side should show as a conflict"
    for overlay in OVERLAYS:
        listed = components(overlay)
        assert (KEDA_COMPONENT in listed) != (ADAPTER_COMPONENT in listed), f"{overlay}: exactly one autoscaling"


# --- storage ---------------------------------------------------------------------------------------------------


def claims(objs) -> dict[str, dict]:
    """Every claim the objects make: PVCs, StatefulSet volumeClaimTemplates, generic ephemeral volumes."""
    out = {f"PersistentVolumeClaim/{c['metadata']['name']}": c["spec"] for c in _find(objs, "PersistentVolumeClaim")}
    for w in objs:
        for template in w.get("spec", {}).get("volumeClaimTemplates", []):
            out[f"{_name(w)} volumeClaimTemplate {template['metadata']['name']}"] = template["spec"]
    for w, template, _, _ in pod_specs(objs):
        for volume in template["spec"].get("volumes", []):
            if "ephemeral" in volume:
                out[f"{_name(w)} ephemeral {volume['name']}"] = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    return out


def mounts_of(objs) -> dict[str, list[tuple[dict, int | None]]]:
    """claim name -> the workloads whose pods mount it, with their pod counts (None: autoscaled)."""
    out: dict[str, list] = {}
    for w, template, count, _ in pod_specs(objs):
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                out.setdefault(volume["persistentVolumeClaim"]["claimName"], []).append((w, count))
    return out


def _assert_read_write_once_claims_are_not_shared(objs):
    for name, users in mounts_of(objs).items():
        (claim,) = _find(objs, "PersistentVolumeClaim", name)
        if claim["spec"]["accessModes"] == ["ReadWriteOnce"]:
            pods = [count for _, count in users]
            assert len(users) == 1 and pods == [1], f"{name} is ReadWriteOnce but mounted by {users}"


def _assert_each_pod_fills_its_own_cache(objs):
    for w, template, _, _ in pod_specs(objs):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if "ephemeral" not in volumes.get("hf-cache", {}):
            continue
        (init,) = [c for c in pod.get("initContainers", []) if c.get("args", [None])[0] == "preload"] or [None]
        assert init is not None, f"{_name(w)}: a per-pod cache without the preload init container"
        assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["hf-cache"] == next(
            m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "hf-cache"
        )
        assert init["image"] == pod["containers"][0]["image"] and init["envFrom"] == pod["containers"][0]["envFrom"]


def test_the_shipped_storage_needs_no_read_write_many_class(shipped):
    """Both overlays run on a cluster whose only class gives ReadWriteOnce (every cloud's default)."""
    _, objs = shipped
    for where, claim in claims(objs).items():
        assert claim["accessModes"] == ["ReadWriteOnce"], f"{where}: {claim['accessModes']}"
        assert "storageClassName" not in claim, f"{where}: the cluster's default class unless storage-class is used"
    _assert_read_write_once_claims_are_not_shared(objs)
    _assert_each_pod_fills_its_own_cache(objs)
    assert not _find(objs, "Job", "pso-preload"), "a preload Job needs a shared cache"


def test_the_storage_class_setting_reaches_every_block_claim(kubectl):
    for overlay in OVERLAYS:
        objs = render(
            kubectl,
            overlay,
            (added(overlay, "../../components/storage-class"), ("settings", (("storageClassName", "fast-block"),))),
        )
        assert not _schema_errors(objs), "\n".join(_schema_errors(objs))
        found = claims(objs)
        assert any("ephemeral" in where for where in found) == (overlay == "gpu")
        for where, claim in found.items():
            assert claim.get("storageClassName") == "fast-block", f"{overlay}: {where}"
            assert claim["accessModes"] == ["ReadWriteOnce"], f"{overlay}: {where}"


def test_the_read_write_many_layout_shares_the_claims_across_nodes(kubectl):
    rwx = swapped("gpu", "../../components/storage-rwo", ["../../components/storage-rwx"])
    variant = (
        ("components", (*rwx[1], "../../components/storage-class")),
        ("settings", (("storageClassName", "fast-block"), ("sharedStorageClassName", "shared-files"))),
    )
    objs = render(kubectl, "gpu", variant)
    assert not _schema_errors(objs), "\n".join(_schema_errors(objs))
    found = claims(objs)
    for name in ("pso-checkpoints", "pso-hf-cache"):
        claim = found.pop(f"PersistentVolumeClaim/{name}")
        assert claim["accessModes"] == ["ReadWriteMany"] and claim["storageClassName"] == "shared-files", name
    assert found and all(c["storageClassName"] == "fast-block" for c in found.values()), found  # Redis
    assert all(c["accessModes"] == ["ReadWriteOnce"] for c in found.values())
    assert not any("ephemeral" in where for where in found), "no per-pod caches: one shared cache"
    # every service shares the cache, which the preload Job fills once
    users = {w["metadata"]["name"] for w, _ in mounts_of(objs)["pso-hf-cache"]}
    assert {"pso-reward-server", "pso-actor", "pso-preload"} <= users
    assert {"pso-preload", "pso-checkpoints"} <= {o["metadata"]["name"] for o in objs}


# --- images ----------------------------------------------------------------------------------------------------


def _images_entry(folder: Path) -> dict:
    (entry,) = yaml.safe_load((folder / "kustomization.yaml").read_text())["images"]
    return entry


def test_every_pso_container_runs_the_overlays_image(shipped, kubectl):
    name, objs = shipped
    entry = _images_entry(K8S / "overlays" / name)
    assert entry["name"] == IMAGE == _images_entry(K8S / "base")["newName"], "the overlay's entry maps the base's"
    variant = "gpu" if name == "gpu" else "cpu"
    assert entry["newTag"] == f"{VERSION}-{variant}", f"{name}: tag <version>-{variant}, version of pyproject.toml"
    expected = f"{entry['newName']}:{entry['newTag']}" + (f"@{entry['digest']}" if "digest" in entry else "")
    images = {(_name(w), c["name"]): c["image"] for w, c, _ in pso_containers(objs)}
    assert images and set(images.values()) == {expected}, images
    manifests = [p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"]
    named = {m for p in manifests for m in re.findall(r"^\s*image:\s*(\S+)", p.read_text(), re.M)}
    assert IMAGE in named and not {n for n in named if n.startswith(IMAGE) and n != IMAGE}, "untagged in base"
    base = {c["image"] for _, c, _ in pso_containers(render_base(kubectl))}
    assert base == {f"{IMAGE}:{VERSION}-cpu"}


def render_base(kubectl: str) -> tuple[dict, ...]:
    return _kustomize(kubectl, K8S / "base")


def test_one_entry_sets_registry_and_digest_for_every_container(kubectl):
    digest = "sha256:" + "ab" * 32
    variant = (("images", (("newName", "registry.example.com/ml/pso-service"), ("digest", digest))),)
    objs = render(kubectl, "gpu", variant)
    images = {c["image"] for _, c in containers(objs) if "pso-service" in c["image"]}
    # the container runtime pulls by the digest; the tag stays readable beside it
    assert images == {f"registry.example.com/ml/pso-service:{VERSION}-gpu@{digest}"}
    assert any(c["name"] == "preload" for _, c in containers(objs)), "init containers included"


# --- docs/deploy.md: the prerequisites, each checked --------------------------------------------------------


def prerequisites() -> str:
    text = DOCS.read_text()
    assert PREREQUISITES in text, f"docs/deploy.md has no section {PREREQUISITES!r}"
    section = text.split(PREREQUISITES, 1)[1]
    return section.split("\n## ", 1)[0]


# Kubernetes features the manifests use and the minor in which each became GA (kubernetes.io feature gates).
FEATURES = {
    "generic ephemeral volumes": (
        "1.23",
        lambda objs: any("ephemeral" in v for _, t, _, _ in pod_specs(objs) for v in t["spec"].get("volumes", [])),
    ),
    "autoscaling/v2 HorizontalPodAutoscaler": ("1.23", lambda objs: bool(_find(objs, "HorizontalPodAutoscaler"))),
    "Job pod failure policy": ("1.31", lambda objs: "podFailurePolicy" in json.dumps(objs)),
    "Indexed Job pods labelled with their index": (
        "1.28",
        lambda objs: '"completionMode": "Indexed"' in json.dumps(objs),
    ),
    "CRD validation rules (x-kubernetes-validations: KEDA's ScaledObject CRD)": (
        "1.29",
        lambda objs: bool(_find(objs, "ScaledObject")),
    ),
}


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_the_prerequisites_state_the_versions_the_tests_check(kubectl):
    section = prerequisites()
    keda = keda_source()["version"].lstrip("v")
    stated = re.search(r"KEDA\D*(2\.\d+)(?:\.\d+)?\s*or later", section)
    assert stated, "the section states no KEDA version (`KEDA 2.N or later`)"
    assert _minor(stated[1]) <= _minor(keda), f"KEDA {stated[1]} stated, the schema is {keda}'s"
    # the features the manifests use need KEDA >= 2.20: the scalingModifiers fallback behavior, and
    # metrics-api's aggregateFromKubeServiceEndpoints selecting the Service's own EndpointSlices (#7641)
    assert _minor(stated[1]) >= (2, 20)
    minimum = re.search(r"Kubernetes (1\.\d+) or later", section)
    assert minimum, "the section states no minimum Kubernetes version (`Kubernetes 1.N or later`)"
    assert _minor(minimum[1]) == _minor(K8S_VERSION), "the tests validate against the stated minimum"
    used = {}
    for overlay in OVERLAYS:
        objs = render(kubectl, overlay)
        used |= {f: ga for f, (ga, uses) in FEATURES.items() if uses(objs)}
    assert used, "no feature detected"
    too_new = {f: ga for f, ga in used.items() if _minor(ga) > _minor(minimum[1])}
    assert not too_new, f"GA after the stated minimum {minimum[1]}: {too_new}"
    # KEDA 2.20 is tested on Kubernetes 1.33 to 1.35 (keda.sh, "Kubernetes Compatibility")
    assert _minor(minimum[1]) >= (1, 33) or _minor(stated[1]) < (2, 20)
    for needed in ("metrics-server", "NVIDIA", "gp3", "pd-balanced", "managed-csi", "EFS", "Filestore", "Azure Files"):
        assert needed in section, f"the prerequisites do not mention {needed}"
    # every test the section cites exists
    cited = re.findall(r"`(tests/test_[\w]+\.py)::(test_\w+)`", section)
    assert cited, "the section cites no test"
    for path, test in cited:
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), f"{path}::{test} does not exist"


def test_the_api_versions_exist_from_the_minimum_to_the_newest_bundled_kubernetes(shipped):
    """Built-in objects validate against the stated minimum (test_deploy_k8s) and the newest schemas bundled,
    so no API they use has been removed since."""
    _, objs = shipped
    newest = max(kubernetes_validate.utils.all_versions(), key=lambda v: tuple(map(int, v.split("."))))
    errors = _schema_errors(objs, newest)
    assert not errors, f"against Kubernetes {newest}:\n" + "\n".join(errors)
