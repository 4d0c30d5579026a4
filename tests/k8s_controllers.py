"""What the JobSet and Job controllers make of the learner's JobSet (deploy/k8s/base/learner.yaml), as a
model for the deployment tests:

- `jobset_children`: the Jobs the JobSet controller creates from a JobSet, named, labelled and annotated as
  it does them and their pod templates (JobSet v0.10, `pkg/controllers/jobset_controller.go`:
  constructJob, labelAndAnnotateObject), so that the tests check, and run, the learner's pods as they do a
  Deployment's;
- `jobset_admission_errors`: what the JobSet controller's validating webhook refuses that the CRD's schema
  lets through (`pkg/webhooks/jobset_webhook.go`: ValidateCreate);
- `PodEnd` and `incident`: what happens when a learner pod ends: the Job controller's podFailurePolicy
  and backoffLimit (Kubernetes 1.33, `pkg/controller/job`: matchPodFailurePolicy, with its failure
  messages word for word), then the JobSet controller's failurePolicy (`pkg/controllers/failure_policy.go`:
  the first rule whose reasons and message patterns match, RestartJobSet when none does, and maxRestarts).

Only what the learner's manifests use is modelled; anything else (FailIndex, backoffLimitPerIndex, a Job of
several pods) raises NotImplementedError, so that a manifest that starts using it must extend the model.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
# labels and annotations the JobSet controller puts on each child Job and its pod template
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
JOBSET_UID = "jobset.sigs.k8s.io/jobset-uid"
REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
REPLICAS = "jobset.sigs.k8s.io/replicatedjob-replicas"
GLOBAL_REPLICAS = "jobset.sigs.k8s.io/global-replicas"
JOB_INDEX = "jobset.sigs.k8s.io/job-index"
JOB_GLOBAL_INDEX = "jobset.sigs.k8s.io/job-global-index"
JOB_KEY = "jobset.sigs.k8s.io/job-key"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
COORDINATOR = "jobset.sigs.k8s.io/coordinator"
SAMPLE_UID = "00000000-0000-4000-8000-000000000000"

# The downward-API fields of a learner pod that tests without a pod need a value for: node 0 of one node.
FIELD_SAMPLES = {
    f"metadata.annotations['{JOB_INDEX}']": "0",
    f"metadata.annotations['{REPLICAS}']": "1",
    f"metadata.annotations['{COORDINATOR}']": "pso-learner-node-0-0.pso-learner",
}

# Job failure reasons a JobSet failure policy rule may name (the webhook refuses others)
JOB_FAILURE_REASONS = ("BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                       "PodFailurePolicy")  # fmt: skip
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --- the objects the JobSet controller makes ---------------------------------------------------------------


def jobsets(objs) -> list[dict]:
    return [o for o in objs if o.get("apiVersion") == JOBSET_API and o.get("kind") == "JobSet"]


def _jobset_marks(js: dict, rjob: dict, index: int, restarts: int) -> dict[str, str]:
    name, namespace = js["metadata"]["name"], js["metadata"].get("namespace", "default")
    replicas = [r.get("replicas", 1) for r in js["spec"]["replicatedJobs"]]
    before = sum(replicas[: js["spec"]["replicatedJobs"].index(rjob)])
    job_name = f"{name}-{rjob['name']}-{index}"
    marks = {
        JOBSET_NAME: name,
        JOBSET_UID: SAMPLE_UID,
        REPLICATED_JOB: rjob["name"],
        RESTART_ATTEMPT: str(restarts),
        REPLICAS: str(rjob.get("replicas", 1)),
        GLOBAL_REPLICAS: str(sum(replicas)),
        JOB_INDEX: str(index),
        JOB_KEY: hashlib.sha1(f"{namespace}/{job_name}".encode()).hexdigest(),
        JOB_GLOBAL_INDEX: str(before + index),
    }
    coordinator = js["spec"].get("coordinator")
    if coordinator is not None:  # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>
        subdomain = js["spec"].get("network", {}).get("subdomain") or name
        marks[COORDINATOR] = (
            f"{name}-{coordinator['replicatedJob']}-{coordinator.get('jobIndex', 0)}-"
            f"{coordinator.get('podIndex', 0)}.{subdomain}"
        )
    return marks


def jobset_children(objs, restarts: int = 0) -> list[dict]:
    """The Jobs the JobSet controller creates for every JobSet in `objs` (after `restarts` restarts)."""
    jobs = []
    for js in jobsets(objs):
        network = js["spec"].get("network", {})
        subdomain = network.get("subdomain") or js["metadata"]["name"]
        for rjob in js["spec"]["replicatedJobs"]:
            for index in range(rjob.get("replicas", 1)):
                marks = _jobset_marks(js, rjob, index, restarts)
                template = copy.deepcopy(rjob["template"])
                spec = template["spec"]
                spec.setdefault("completionMode", "Indexed")  # the webhook's defaults
                pod = spec["template"]
                pod.setdefault("metadata", {})
                for part in (template.setdefault("metadata", {}), pod["metadata"]):
                    part["labels"] = {**part.get("labels", {}), **marks}
                    part["annotations"] = {**part.get("annotations", {}), **marks}
                pod["spec"].setdefault("restartPolicy", "OnFailure")
                if network.get("enableDNSHostnames", True):
                    pod["spec"]["subdomain"] = subdomain
                metadata = {**template["metadata"], "name": f"{js['metadata']['name']}-{rjob['name']}-{index}"}
                if "namespace" in js["metadata"]:
                    metadata["namespace"] = js["metadata"]["namespace"]
                jobs.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec})
    return jobs


def jobset_admission_errors(js: dict) -> list[str]:
    """What the JobSet webhook (v0.10) refuses on create, beyond the CRD's schema."""
    errors = []
    name, spec = js["metadata"]["name"], js["spec"]
    subdomain = spec.get("network", {}).get("subdomain")
    if subdomain is not None and (len(subdomain) > 63 or not DNS1035.match(subdomain)):
        errors.append(f"network.subdomain {subdomain!r} is not a DNS-1035 label")
    rjob_names = [r["name"] for r in spec["replicatedJobs"]]
    for rjob in spec["replicatedJobs"]:
        replicas = rjob.get("replicas", 1)
        job = f"{name}-{rjob['name']}-{replicas - 1}"
        if len(job) > 63 or not DNS1035.match(job):
            errors.append(f"replicatedJob {rjob['name']}: Job name {job!r} is not a DNS-1035 label")
        job_spec = rjob["template"]["spec"]
        if job_spec.get("completionMode", "Indexed") == "Indexed" and "completions" in job_spec:
            pod = f"{job}-{job_spec['completions'] - 1}-abcde"
            if len(pod) > 63 or not DNS1035.match(pod):
                errors.append(f"replicatedJob {rjob['name']}: pod name {pod!r} is not a DNS-1035 label")
    rules = spec.get("failurePolicy", {}).get("rules", [])
    names = [r.get("name", "") for r in rules]
    for rule in rules:
        if not 1 <= len(rule.get("name", "")) <= 128 or not RULE_NAME.match(rule.get("name", "")):
            errors.append(f"failure policy rule name {rule.get('name')!r} is not valid")
        errors += [f"rule {rule['name']}: unknown replicatedJob {t}" for t in rule.get("targetReplicatedJobs", [])
                   if t not in rjob_names]  # fmt: skip
        errors += [f"rule {rule['name']}: unknown Job failure reason {r}" for r in rule.get("onJobFailureReasons", [])
                   if r not in JOB_FAILURE_REASONS]  # fmt: skip
        for pattern in rule.get("onJobFailureMessagePatterns", []):
            try:
                re.compile(pattern)
            except re.error as e:
                errors.append(f"rule {rule['name']}: pattern {pattern!r}: {e}")
    errors += [f"failure policy rule names repeat: {n}" for n in sorted(set(names)) if names.count(n) > 1]
    coordinator = spec.get("coordinator")
    if coordinator is not None:
        (rjob,) = [r for r in spec["replicatedJobs"] if r["name"] == coordinator["replicatedJob"]] or [None]
        job_spec = rjob["template"]["spec"] if rjob else {}
        if rjob is None:
            errors.append(f"coordinator replicatedJob {coordinator['replicatedJob']} does not exist")
        elif not 0 <= coordinator.get("jobIndex", 0) < rjob.get("replicas", 1):
            errors.append(f"coordinator job index {coordinator.get('jobIndex', 0)} is invalid")
        elif job_spec.get("completionMode") != "Indexed" or "completions" not in job_spec:
            errors.append("the coordinator's Job must be Indexed, with completions set")
        elif not 0 <= coordinator.get("podIndex", 0) < job_spec["completions"]:
            errors.append(f"coordinator pod index {coordinator.get('podIndex', 0)} is invalid")
    return errors


# --- what a pod's end leads to ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodEnd:
    """How a learner pod ended: its container's exit code, and the pod conditions that were True (the
    eviction API, preemption, a node drain or shutdown and the taint manager add DisruptionTarget)."""

    exit_code: int
    conditions: tuple[str, ...] = ()
    container: str = "learner"


@dataclass(frozen=True)
class Incident:
    """What the controllers do: the Job's outcome, and the JobSet's."""

    job: str  # "Complete", "Replaced" (a new pod, the Job goes on) or "Failed"
    job_reason: str | None  # the Job's Failed condition
    job_message: str | None
    jobset: str  # "Running", "Completed", "Failed", or the failure policy's restart action
    rule: str | None  # the failure policy rule that matched (None: the default action, or no failure)
    counted: bool  # whether the restart counts towards maxRestarts


def _unsupported(job_spec: dict) -> None:
    if "backoffLimitPerIndex" in job_spec or "maxFailedIndexes" in job_spec:
        raise NotImplementedError("backoffLimitPerIndex is not modelled")
    if job_spec.get("completions", 1) != 1 or job_spec.get("parallelism", 1) != 1:
        raise NotImplementedError("a Job of several pods is not modelled")


def pod_failure(job: dict, pod: str, end: PodEnd) -> tuple[str, str | None]:
    """The Job controller's action for a failed pod (FailJob, Ignore, Count), and the Job's failure message
    when the action is FailJob: the first podFailurePolicy rule that matches, else Count."""
    namespace = job["metadata"].get("namespace", "default")
    for index, rule in enumerate(job["spec"].get("podFailurePolicy", {}).get("rules", [])):
        action = rule["action"]
        if action not in ("FailJob", "Ignore", "Count"):
            raise NotImplementedError(f"podFailurePolicy action {action}")
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if req.get("containerName") not in (None, end.container) or end.exit_code == 0:
                continue
            if (end.exit_code in req["values"]) == (req["operator"] == "In"):
                return action, (
                    f"Container {end.container} for pod {namespace}/{pod} failed with exit code {end.exit_code} "
                    f"matching {action} rule at index {index}"
                )
        else:
            for pattern in rule["onPodConditions"]:
                if pattern["type"] in end.conditions and pattern.get("status", "True") == "True":
                    return action, (
                        f"Pod {namespace}/{pod} has condition {pattern['type']} matching {action} rule at index {index}"
                    )
    return "Count", None


def jobset_failure(js: dict, job: dict, reason: str, message: str, counted: int) -> tuple[str, str | None, bool]:
    """The JobSet controller's action for a failed child Job, after `counted` restarts that count towards
    maxRestarts: (action or "Failed", the matching rule's name, whether the restart counts)."""
    policy = js["spec"].get("failurePolicy")
    if policy is None:
        return "Failed", None, False
    for rule in policy.get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(p, message) for p in patterns):  # Go's regexp.MatchString: unanchored
            continue
        targets = rule.get("targetReplicatedJobs")
        if targets and job["metadata"]["labels"][REPLICATED_JOB] not in targets:
            continue
        action, name = rule["action"], rule["name"]
        break
    else:
        action, name = "RestartJobSet", None
    if action == "FailJobSet":
        return "Failed", name, False
    if action == "RestartJobSet":
        if counted >= policy.get("maxRestarts", 0):
            return "Failed", name, False  # ReachedMaxRestarts
        return action, name, True
    if action == "RestartJobSetAndIgnoreMaxRestarts":
        return action, name, False
    raise NotImplementedError(f"JobSet failure policy action {action}")


def incident(js: dict, end: PodEnd, counted: int = 0, node: int = 0) -> Incident:
    """What the Job and JobSet controllers do when node `node`'s learner pod ends as `end`, the JobSet having
    restarted `counted` times towards maxRestarts (the others' pods still running)."""
    job = jobset_children([js], restarts=counted)[node]
    _unsupported(job["spec"])
    pod = f"{job['metadata']['name']}-0-x7k2p"
    if end.exit_code == 0:  # succeeded (podFailurePolicy is for failed pods only): this node's Job is complete
        return Incident("Complete", None, None, "Completed" if len(jobset_children([js])) == 1 else "Running",
                        None, False)  # fmt: skip
    action, message = pod_failure(job, pod, end)
    if action == "Ignore":
        return Incident("Replaced", None, None, "Running", None, False)
    if action == "FailJob":
        reason = "PodFailurePolicy"
    elif job["spec"].get("backoffLimit", 6) < 1:  # this pod was the first counted failure
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    else:
        return Incident("Replaced", None, None, "Running", None, False)
    decision, rule, counts = jobset_failure(js, job, reason, message, counted)
    return Incident("Failed", reason, message, decision, rule, counts)
