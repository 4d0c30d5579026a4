"""`make compose-test`: build the CPU image and run the compose CPU profile for real, on a Docker engine.

What it proves, end to end, on the deployment files as users run them (compose.yaml +
deploy/compose.cpu.yaml, `--scale actor=2`):
  1. deploy/Dockerfile builds the `cpu` target through `docker compose build` with nothing pulled:
     the base is a local image (PYTHON_IMAGE) and every package comes from deploy/wheelhouse
     (WHEELS=wheelhouse; the wheels are cached outside the repository, copied in for the build only);
  2. the stack starts and every health check passes (redis, reward server, learner, both actors);
  3. the learner publishes several weight versions and both actors load them;
  4. the reward server answers on its published port (readiness, the token, a real score);
  5. the hardening holds: read-only root file systems, no capabilities, no-new-privileges, rotated
     logs, no anonymous volumes, each secret only in the containers that need it, none in an environment;
then it stops and removes the stack (containers, networks, volumes).

Where no Docker engine answers, it starts one when it can (root, and `dockerd` installable with apt),
and stops it again at the end; where it cannot, it says why and exits 0 (skipped), unless
PSO_COMPOSE_TEST=require. Base images are made locally, because registries other than the package
indexes may be unreachable: Debian bookworm by debootstrap (`pso-ci/debian:bookworm`: Python 3.11 and
its venv) and Redis on top of it (`pso-ci/redis:7`, deploy/ci/redis.Dockerfile). Both are kept for the
next run; `--clean` removes them and the built image.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FILES = ["-f", "compose.yaml", "-f", "deploy/compose.cpu.yaml"]
# the local bases this script makes; PSO_CI_PYTHON_IMAGE / PSO_CI_REDIS_IMAGE name others instead (a
# machine that can pull: python:3.11-slim-bookworm and the compose file's own redis image)
LOCAL_BASE_IMAGE = "pso-ci/debian:bookworm"
LOCAL_REDIS_IMAGE = "pso-ci/redis:7"
BASE_IMAGE = os.environ.get("PSO_CI_PYTHON_IMAGE") or LOCAL_BASE_IMAGE
REDIS_IMAGE = os.environ.get("PSO_CI_REDIS_IMAGE") or LOCAL_REDIS_IMAGE
ACTORS = 2
VERSIONS = 3  # weight versions the learner must publish, and each actor load at least VERSIONS - 1 of
DEADLINE_S = 900.0  # for the stack to reach them (about 2 minutes on 2 cores)
# the local base's Python (Debian 12's 3.11.2) needs packages the host's newer 3.11 does not
# (redis requires async-timeout below 3.11.3), so the wheelhouse gets them besides the resolved set
BASE_PYTHON_EXTRAS = ["async-timeout>=4.0.3"]


class Skip(Exception):
    """No Docker engine can be had here: the test is skipped, with the reason."""


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} compose-test: {message}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = False, timeout: float = 1800, **kw):
    """A command, its output streamed (or captured); a failure raises with the command named."""
    out = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout, **kw)
    if check and out.returncode != 0:
        detail = (out.stdout or "")[-3000:] + (out.stderr or "")[-3000:] if capture else ""
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {out.returncode}\n{detail}")
    return out


def wait_for(what: str, condition: Callable[[], bool], deadline_s: float, every_s: float = 3.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(every_s)


# --- the engine ----------------------------------------------------------------------------------


def docker_cli() -> str:
    # Debian's docker.io client first: it builds with BuildKit without the buildx plugin
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise Skip("no docker client: install Docker (as root, `apt-get install docker.io` does)")


def engine_answers(docker: str) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


class Engine:
    """The Docker engine: the one that answers, or a `dockerd` this run starts (and stops at the end)."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self) -> str:
        if shutil.which("docker") or Path("/usr/bin/docker").exists():
            docker = docker_cli()
            if engine_answers(docker):
                return docker
        if os.geteuid() != 0:
            raise Skip("no Docker engine answers, and starting one needs root")
        if not shutil.which("dockerd"):
            if not shutil.which("apt-get"):
                raise Skip("no Docker engine answers and there is no apt-get to install one")
            log("installing docker.io with apt-get")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            out = subprocess.run(
                ["apt-get", "install", "-y", "-q", "docker.io"], capture_output=True, text=True, env=env
            )
            if out.returncode != 0:
                raise Skip(f"apt-get install docker.io failed: {out.stderr.strip()[-500:]}")
        docker = docker_cli()
        self.log_path = Path(tempfile.mkstemp(prefix="pso-dockerd-", suffix=".log")[1])
        log(f"starting dockerd (log: {self.log_path})")
        # --iptables=false: leave the machine's firewall alone; names, networks and published ports on
        # 127.0.0.1 still work (docker-proxy)
        self.process = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip6tables=false"],
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        end = time.monotonic() + 90
        while not engine_answers(docker):
            if self.process.poll() is not None or time.monotonic() > end:
                tail = self.log_path.read_text()[-1500:]
                self.stop()
                raise Skip(f"dockerd did not start: {tail}")
            time.sleep(1)
        return docker

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        log("stopping the dockerd this run started")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- the images ----------------------------------------------------------------------------------


def has_image(docker: str, name: str) -> bool:
    return subprocess.run([docker, "image", "inspect", name], capture_output=True).returncode == 0


def debian_mirror() -> str:
    if os.environ.get("PSO_CI_DEBIAN_MIRROR"):
        return os.environ["PSO_CI_DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        found = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE)
        if found:
            return found[1]
    return "http://deb.debian.org/debian"


def make_base_image(docker: str) -> None:
    """Debian bookworm with Python 3.11 and venv, by debootstrap from the package mirror, imported."""
    if BASE_IMAGE != LOCAL_BASE_IMAGE or has_image(docker, BASE_IMAGE):
        return
    if not shutil.which("debootstrap"):
        log("installing debootstrap with apt-get")
        run(["apt-get", "install", "-y", "-q", "debootstrap"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    with tempfile.TemporaryDirectory(prefix="pso-rootfs-") as rootfs:
        log(f"debootstrap of Debian bookworm from {debian_mirror()} (about a minute)")
        packages = "python3,python3-venv,ca-certificates"
        run(
            ["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", rootfs, debian_mirror()],
            capture=True,
        )
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run([docker, "import", "-", BASE_IMAGE], stdin=tar.stdout, capture=True)
        tar.wait()


def make_redis_image(docker: str) -> None:
    if REDIS_IMAGE != LOCAL_REDIS_IMAGE or has_image(docker, REDIS_IMAGE):
        return
    log(f"building {REDIS_IMAGE} (Debian's redis-server)")
    cmd = [docker, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", REDIS_IMAGE]
    run([*cmd, "-f", str(DEPLOY / "ci" / "redis.Dockerfile"), str(DEPLOY / "ci")], capture=True)


def fill_wheel_cache() -> Path:
    """Every package the image installs, as wheels, from this machine's pip indexes, in a cache outside the
    repository (the build copies them into deploy/wheelhouse; WHEELS=wheelhouse: nothing is fetched). Filled
    again only when what it is made from changes: rebuilt wheels differ byte for byte and would void the
    image's layer cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pso" / "compose-test-wheels"
    torch = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text())[1]
    inputs = [(ROOT / name).read_bytes() for name in ("constraints.txt", "pyproject.toml")]
    stamp = hashlib.sha256(b"\0".join([torch.encode(), *inputs, repr(BASE_PYTHON_EXTRAS).encode()])).hexdigest()
    stamp_file = cache / ".filled-from"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return cache
    log(f"filling {cache} (torch {torch}, constraints.txt, the project's dependencies)")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    requirements = [f"torch=={torch}", f"{ROOT}[tensorboard,wandb]", "setuptools>=68"]
    run([*pip, "wheel", "-q", "-w", str(cache), "-c", str(ROOT / "constraints.txt"), *requirements], capture=True)
    run([*pip, "download", "-q", "--only-binary=:all:", "-d", str(cache), *BASE_PYTHON_EXTRAS], capture=True)
    for own in cache.glob("pso_service-*.whl"):  # the image installs the project from its sources
        own.unlink()
    stamp_file.write_text(stamp)
    return cache


@contextlib.contextmanager
def wheelhouse(cache: Path):
    """The cached wheels in deploy/wheelhouse for the build, and out again after it: wheels left there would
    be sent with every later build's context."""
    folder = DEPLOY / "wheelhouse"
    copied = [Path(shutil.copy2(wheel, folder)) for wheel in sorted(cache.glob("*.whl"))]
    try:
        yield
    finally:
        for wheel in copied:
            wheel.unlink(missing_ok=True)


# --- the stack -----------------------------------------------------------------------------------


def compose_binary() -> list[str]:
    found = Path(sys.executable).parent / "docker-compose"
    if found.exists():
        return [str(found)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return [docker_cli(), "compose"]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_compose_version(compose: list[str]) -> str:
    """The binary must be at least the version deploy/docker-compose.yml states it needs."""
    needed = re.search(r"Needs Docker Compose >= (\d+\.\d+\.\d+)", (DEPLOY / "docker-compose.yml").read_text())[1]
    have = run([*compose, "version", "--short"], capture=True).stdout.strip()
    if version_tuple(have) < version_tuple(needed):
        raise RuntimeError(f"Docker Compose {have} is older than the {needed} deploy/docker-compose.yml needs")
    return have


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, compose: list[str], docker: str, workdir: Path):
        self.docker = docker
        self.project = f"pso-ci-{secrets.token_hex(3)}"
        self.port = free_port()
        secrets_dir = workdir / "secrets"
        run([str(DEPLOY / "make-secrets.sh")], env=dict(os.environ, PSO_SECRETS_DIR=str(secrets_dir)), capture=True)
        self.token = (secrets_dir / "reward-token").read_text()
        env_file = workdir / "compose.env"
        env_file.write_text(
            f"PSO_SECRETS_DIR={secrets_dir}\nPSO_REDIS_IMAGE={REDIS_IMAGE}\n"
            f"REDIS_MAXMEMORY=256mb\nPSO_REWARD_PORT={self.port}\n"
        )
        self.compose = [*compose, "-p", self.project, "--env-file", str(env_file), *FILES]
        # the build reads PYTHON_IMAGE and WHEELS from the environment (deploy/docker-compose.yml's build args)
        self.env = dict(os.environ, PYTHON_IMAGE=BASE_IMAGE, WHEELS="wheelhouse", DOCKER_BUILDKIT="1")

    def __call__(self, *args: str, capture: bool = True, check: bool = True, timeout: float = 1800):
        return run([*self.compose, *args], cwd=ROOT, env=self.env, capture=capture, check=check, timeout=timeout)

    def containers(self) -> list[dict]:
        out = self("ps", "-a", "--format", "json").stdout.strip()
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def logs(self, *services: str) -> str:
        return self("logs", "--no-color", *services).stdout

    def inspect(self, name: str) -> dict:
        return json.loads(run([self.docker, "inspect", name], capture=True).stdout)[0]


def messages(text: str) -> list[tuple[str, str]]:
    """(container, message) of every JSON log line in `compose logs` output."""
    found = []
    for line in text.splitlines():
        prefix, sep, rest = line.partition("| ")
        if not sep or not rest.startswith("{"):
            continue
        try:
            found.append((prefix.strip(), json.loads(rest)["message"]))
        except (ValueError, KeyError):
            continue
    return found


def progress(stack: Stack) -> tuple[int, dict[str, int]]:
    """The newest weight version the learner published, and the newest each actor loaded."""
    published, loaded = 0, {}
    for container, message in messages(stack.logs("learner", "actor")):
        if m := re.fullmatch(r"published weights version (\d+)", message):
            published = max(published, int(m[1]))
        elif m := re.search(r"weights (\d+) -> (\d+)$", message):
            loaded[container] = max(loaded.get(container, 0), int(m[2]))
    return published, loaded


def healthy(stack: Stack) -> bool:
    states = {c["Service"] + "/" + c["Name"]: (c["State"], c.get("Health", "")) for c in stack.containers()}
    services = {key.split("/")[0] for key in states}
    if services != {"redis", "preload", "reward-server", "learner", "actor"}:
        return False
    for key, (state, health) in states.items():
        if key.startswith("preload/"):
            if state != "exited":
                return False
        elif health != "healthy":
            return False
    return sum(key.startswith("actor/") for key in states) == ACTORS


def check_reward_server(stack: Stack) -> None:
    import httpx
    import torch

    from reward_server.client import RewardClient

    url = f"http://127.0.0.1:{stack.port}"
    ready = httpx.get(f"{url}/readyz", timeout=30).json()
    assert ready["ready"] is True, ready
    status = httpx.get(f"{url}/v1/models", timeout=30).status_code
    assert status == 401, f"/v1/models without the token answered {status}, not 401"
    with RewardClient(url, token=stack.token) as client:
        names = [m["name"] for m in client.models()]
        images = torch.rand(2, 3, 32, 32)  # the tiny world's size
        scores = client.score(images, ["a red circle on a white background", "a blue square on a yellow background"])
    log(f"reward server on 127.0.0.1:{stack.port}: models {names}, 2 images scored, totals {scores.total}")


def check_hardening(stack: Stack) -> None:
    """What `docker inspect` shows of each running container against what the compose files promise."""
    needs = {"redis": {"redis-password"}, "reward-server": {"reward-token", "hf-token"}}
    needs |= {"learner": {"redis-password", "hf-token"}, "actor": {"redis-password", "reward-token", "hf-token"}}
    for c in stack.containers():
        if c["Service"] == "preload":
            continue
        info = stack.inspect(c["Name"])
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] is True, c["Name"]
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd"), c["Name"]
        assert "no-new-privileges:true" in (host.get("SecurityOpt") or []), c["Name"]
        assert host["LogConfig"]["Config"].get("max-size") == "20m", c["Name"]
        for mount in info["Mounts"]:  # a named volume is <project>_<name>; an anonymous one is 64 hex digits
            if mount["Type"] == "volume":
                assert mount["Name"].startswith(f"{stack.project}_"), (c["Name"], mount["Name"])
        mounted = {Path(m["Destination"]).name for m in info["Mounts"] if m["Destination"].startswith("/run/secrets/")}
        assert mounted == needs[c["Service"]], (c["Name"], mounted)
        env = dict(e.split("=", 1) for e in info["Config"]["Env"])
        for name in ("REDIS_PASSWORD", "PSO_REWARD_TOKEN", "HF_TOKEN"):
            assert not env.get(name), f"{c['Name']}: ${name} holds a value"
    log("hardening: read-only roots, no capabilities, no-new-privileges, rotated logs, named volumes, scoped secrets")


def run_stack(compose: list[str], docker: str, version: str, wheels: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="pso-compose-test-") as tmp:
        stack = Stack(compose, docker, Path(tmp))
        started = time.monotonic()
        try:
            log(f"building pso-service:{version}-cpu from {BASE_IMAGE} and deploy/wheelhouse (docker compose build)")
            with wheelhouse(wheels):
                stack("build", "reward-server", capture=False)
            log(f"built in {time.monotonic() - started:.0f} s; starting project {stack.project} with {ACTORS} actors")
            up = time.monotonic()
            stack("up", "-d", "--no-build", "--scale", f"actor={ACTORS}", capture=False, timeout=900)

            def reached() -> bool:
                published, loaded = progress(stack)
                return published >= VERSIONS and len(loaded) == ACTORS and min(loaded.values()) >= VERSIONS - 1

            wait_for(f"{VERSIONS} weight versions, loaded by {ACTORS} actors", reached, DEADLINE_S)
            wait_for("every health check", lambda: healthy(stack), DEADLINE_S)
            published, loaded = progress(stack)
            log(f"after {time.monotonic() - up:.0f} s: learner published version {published}, actors loaded {loaded}")
            check_reward_server(stack)
            check_hardening(stack)
        except BaseException:
            print(stack("logs", "--no-color", "--tail", "60", check=False).stdout, file=sys.stderr)
            raise
        finally:
            log(f"removing project {stack.project} (containers, networks, volumes)")
            stack("down", "--volumes", "--remove-orphans", "--timeout", "60", check=False)
            leftovers = run(
                [docker, "ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}"], capture=True
            )
            assert not leftovers.stdout.strip(), f"containers left behind: {leftovers.stdout}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="also remove the base images and the built image")
    args = parser.parse_args()
    required = os.environ.get("PSO_COMPOSE_TEST") == "require"
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
    started, engine = time.monotonic(), Engine()
    try:
        docker = engine.start()
        compose = compose_binary()
        engine_version = run([docker, "version", "--format", "{{.Server.Version}}"], capture=True).stdout.strip()
        log(f"Docker Compose {check_compose_version(compose)} on engine {engine_version}")
        make_base_image(docker)
        make_redis_image(docker)
        run_stack(compose, docker, version, fill_wheel_cache())
        if args.clean:
            run([docker, "image", "rm", f"pso-service:{version}-cpu", LOCAL_REDIS_IMAGE, LOCAL_BASE_IMAGE], check=False)
    except Skip as why:
        log(f"SKIPPED: {why}")
        return 1 if required else 0
    finally:
        engine.stop()
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
