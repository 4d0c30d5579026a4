"""What deployments lean on besides the services' main work: the actor's and learner's ops HTTP
server, the autoscaling signal, `pso health`, `pso preload`, the multi-rank learner launch, PSO_CONFIG
and config files that extend others."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from learner.scaling import ActorDemand
from pso import ops_http
from pso.cli import build_parser, main
from pso.config import ConfigError, load_config
from pso.config.schema import PSOConfig
from pso.hub import planned_downloads
from pso.ops_http import OpsServer

CONFIGS = Path(__file__).parents[1] / "configs"
HTTP_TIMEOUT_S = 60  # a local answer; generous, so that a busy machine cannot fail a request


class FakeClock:
    """Stands for the `time` module of pso.ops_http: the worker's silence is what the test sets, not what
    a busy machine makes of a sleep (a 0.5 s stall window fails a probe that is merely scheduled late)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(ops_http, "time", clock)
    return clock


@pytest.fixture
def ops(clock):
    registry = CollectorRegistry()
    Gauge("pso_test_value", "a value", registry=registry).set(7)
    server = OpsServer("test", 0, registry, stall_s=0.5, routes={"/v1/scaling": lambda: {"actors_wanted": 3.5}})
    yield server
    server.close()


def url(server: OpsServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def get(server: OpsServer, path: str) -> httpx.Response:
    return httpx.get(url(server, path), timeout=HTTP_TIMEOUT_S)


def test_ops_server_serves_health_metrics_and_json_routes(ops):
    health = get(ops, "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = get(ops, "/metrics")
    assert metrics.status_code == 200 and "pso_test_value 7.0" in metrics.text
    assert get(ops, "/v1/scaling").json() == {"actors_wanted": 3.5}
    missing = get(ops, "/admin")
    assert missing.status_code == 404 and "/healthz" in missing.json()["message"]


def test_ops_health_fails_once_the_worker_stalls_and_recovers_on_progress(ops, clock):
    clock.now += 0.7  # longer than stall_s (0.5 s) without a beat
    stalled = get(ops, "/healthz")
    assert stalled.status_code == 503 and stalled.json()["status"] == "stalled"
    assert stalled.json()["seconds_since_progress"] == 0.7
    ops.beat()
    assert get(ops, "/healthz").status_code == 200


def test_pso_health_exits_by_the_answer(ops):
    timeout = ["--timeout", str(HTTP_TIMEOUT_S)]
    assert main(["health", "--url", url(ops, "/healthz"), *timeout]) == 0
    assert main(["health", "--url", url(ops, "/missing"), *timeout]) == 1
    assert main(["health", "--url", "http://127.0.0.1:9/healthz", "--timeout", "1"]) == 1


def test_pso_health_may_pass_where_nothing_listens_but_never_on_a_bad_answer(ops, clock):
    """The learner's liveness probe: between two starts of the ranks nothing listens (pass); a stalled rank 0
    answers 503 (fail), whatever the flag."""
    lenient = ["health", "--not-listening-ok", "--timeout", str(HTTP_TIMEOUT_S)]
    with socket.socket() as s:  # a port that was free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main([*lenient, "--url", f"http://127.0.0.1:{closed}/healthz"]) == 0
    assert main(["health", "--timeout", "1", "--url", f"http://127.0.0.1:{closed}/healthz"]) == 1
    assert main([*lenient, "--url", url(ops, "/healthz")]) == 0
    clock.now += 0.7  # longer than stall_s (0.5 s) without a beat: 503
    assert main([*lenient, "--url", url(ops, "/healthz")]) == 1


def test_pso_health_reads_its_url_from_the_environment(ops, monkeypatch):
    monkeypatch.setenv("PSO_HEALTH_URL", url(ops, "/v1/scaling"))
    command = [sys.executable, "-m", "pso.cli", "health", "--timeout", str(HTTP_TIMEOUT_S)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "actors_wanted" in out.stdout


def feed(demand: ActorDemand, *, actors, per_actor, busy_share, capacity, learner_busy, waiting, updates=11):
    """Updates one second apart: `actors` actors producing `per_actor` records per second of producing,
    each producing `busy_share` of the time; the learner training `capacity` records per busy second,
    busy `learner_busy` of the time."""
    for i in range(updates):
        demand.observe(
            produced=round(actors * per_actor * busy_share * i),
            actor_busy_s=actors * busy_share * i,
            waiting=waiting,
            trained=round(capacity * learner_busy),
            busy_s=learner_busy,
            at=float(i),
        )


def test_a_starved_learner_asks_for_more_actors():
    demand = ActorDemand(target_backlog=32, horizon_s=60)
    # 2 actors, never paused, make 2 records/s each; the learner could train 10/s but is busy 40% of the time
    feed(demand, actors=2, per_actor=2, busy_share=1.0, capacity=10, learner_busy=0.4, waiting=0)
    assert demand.wanted() == pytest.approx((10 + 32 / 60) / 2)  # 5.27
    report = demand.report()
    assert report["per_actor_per_s"] == 2 and report["produced_per_s"] == 4 and report["capacity_per_s"] == 10


def test_actors_held_back_by_back_pressure_are_given_back():
    demand = ActorDemand(target_backlog=32, horizon_s=60)
    # 4 actors paused half the time (over their bound): 8 records/s, as fast as the learner trains;
    # 92 records wait, 60 over the target
    feed(demand, actors=4, per_actor=4, busy_share=0.5, capacity=8, learner_busy=1.0, waiting=92)
    assert demand.wanted() == pytest.approx((8 - 1) / 4)  # 1.75: two actors keep it fed


def test_learner_ranks_multiply_the_capacity_and_no_production_means_no_estimate():
    one, two = ActorDemand(0, 60, ranks=1), ActorDemand(0, 60, ranks=2)
    for d in (one, two):
        feed(d, actors=2, per_actor=2, busy_share=1.0, capacity=4, learner_busy=1.0, waiting=0)
    assert two.wanted() == pytest.approx(2 * one.wanted())
    idle = ActorDemand(32, 60)
    feed(idle, actors=2, per_actor=0, busy_share=1.0, capacity=4, learner_busy=1.0, waiting=0)
    assert idle.wanted() is None and idle.report()["actors_wanted"] is None


def test_the_gauges_are_absent_until_first_written(tmp_path):
    from learner.metrics import MetricsSink

    sink = MetricsSink(None)
    assert "pso_learner_actors_wanted" not in generate_latest(sink.registry).decode()
    row = {"updates": 1, "version": 1, "reward_mean": 0.5, "staleness": 0, "pairs_per_s": 1, "wait_s": 0, "pairs": 8,
           "stale": 0, "lost": 0, "stale_total": 0, "records_lost": 0}  # fmt: skip
    sink.write(row)
    text = generate_latest(sink.registry).decode()
    assert "pso_learner_version 1.0" in text and "pso_learner_actors_wanted" not in text
    sink.write(row | {"updates": 2, "version": 2, "actors_wanted": 3.5})
    assert "pso_learner_actors_wanted 3.5" in generate_latest(sink.registry).decode()


def test_a_backlog_target_the_actors_never_reach_is_a_config_error():
    with pytest.raises(ConfigError, match="target_backlog"):
        load_config(PSOConfig, env={}, overrides=["actor.max_backlog=16", "learner.target_backlog=16"])


def test_preload_plans_the_hub_downloads_of_a_preset(capsys):
    assert main(["preload", "-c", str(CONFIGS / "sdxl-dmd2.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "stabilityai/stable-diffusion-xl-base-1.0 (diffusers pipeline, variant fp16)",
        "tianweiy/DMD2: dmd2_sdxl_4step_lora_fp16.safetensors",
        "yuvalkirstain/PickScore_v1",
        "THUDM/ImageReward: ImageReward.pt, med_config.json",
        "bert-base-uncased",
    ):
        assert expected in out, out
    assert "open_clip_pytorch_model" not in out  # the LAION repo gives only its tokenizer and preprocessor


def test_preload_has_nothing_to_fetch_for_local_and_builtin_models(capsys):
    assert main(["preload", "-c", str(CONFIGS / "tiny.yaml")]) == 0
    assert "nothing to download" in capsys.readouterr().out
    cfg = load_config(PSOConfig, CONFIGS / "sd-turbo.yaml", overrides=[f"model.pretrained={CONFIGS}"], env={})
    assert "stabilityai/sd-turbo" not in {d.repo for d in planned_downloads(cfg)}


def test_preload_offline_fails_naming_the_repository(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pso.cli", "preload", "-c", str(CONFIGS / "sd-turbo.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert out.returncode == 1, out
    assert "stabilityai/sd-turbo" in out.stdout and "pso preload: error" in out.stderr, out


def test_learner_launch_flags_are_checked_before_anything_starts(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # a launch flag that cannot work is a configuration error, exit 2 (learner/launch.py), as a bad config is
    assert main(["learner", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2"]) == 2
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err
    assert main(["learner", "--nproc-per-node", "2", "--set", "optim.lr=lots"]) == 2  # the config, before torchrun
    assert "optim.lr" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    assert main(["learner", "--nproc-per-node", "2"]) == 2
    assert "not for a rank under torchrun" in capsys.readouterr().err


def test_pso_config_selects_the_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("PSO_CONFIG", str(CONFIGS / "sdxl-turbo.yaml"))
    args = build_parser().parse_args(["config"])
    assert args.config == CONFIGS / "sdxl-turbo.yaml"
    assert build_parser().parse_args(["config", "-c", "other.yaml"]).config == Path("other.yaml")


def test_config_files_extend_others_key_by_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "shared.yaml").write_text(
        "loss: {name: online-pso, beta: 20.0, clip_eps: 0.2}\nsampling: {group_size: 4}\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/shared.yaml\nloss: {beta: 30.0}\n")
    cfg = load_config(PSOConfig, child, env={})
    assert (cfg.loss.beta, cfg.loss.clip_eps, cfg.sampling.group_size) == (30.0, 0.2, 4)
    env_wins = load_config(PSOConfig, child, env={"PSO__LOSS__BETA": "40"})
    assert env_wins.loss.beta == 40.0


def test_a_section_of_another_kind_replaces_the_bases_whole(tmp_path):
    """`loss.name: customization` over an online-pso base: the base's clip_eps means nothing to it."""
    (tmp_path / "base.yaml").write_text("loss: {name: online-pso, clip_eps: 0.2}\nfinetune: {mode: lora, rank: 4}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nloss: {name: customization, beta: 3.0}\nfinetune: {rank: 8}\n")
    cfg = load_config(PSOConfig, child, env={})
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.sample_weight) == ("customization", 3.0, 0.5)
    assert (cfg.finetune.mode, cfg.finetune.rank) == ("lora", 8)  # the same kind still merges key by key


def test_config_extends_cycles_and_missing_bases_are_config_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="a cycle"):
        load_config(PSOConfig, tmp_path / "a.yaml", env={})
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(PSOConfig, tmp_path / "c.yaml", env={})
