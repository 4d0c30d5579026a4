"""Every service's Prometheus metrics follow the naming conventions, as /metrics shows them: a `pso_`
prefix, counters ending in `_total` and nothing else doing so, units spelled out (`_seconds`, never
`_s` or `_ms`)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from reward_helpers import scene_batch

from actors.actor import ActorStats
from actors.metrics import ActorCollector
from learner.metrics import MetricsSink
from pso.config.reward_server import RewardServerConfig
from pso.reward_norm import RewardNormalizer
from reward_server.app import create_app
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

# a row as the learner writes one (learner/learner.py), running totals included
ROW = {
    "updates": 12, "version": 12, "loss": 0.69, "margin": 0.01, "accuracy": 0.5, "grad_norm": 1.0, "lr": 1e-5,
    "steps": 1.0, "reward_mean": 0.1, "staleness": 1.5, "pairs_per_s": 4.0, "wait_s": 2.5, "pairs": 8, "stale": 1,
    "lost": 0, "stale_total": 5, "stale_share": 0.1, "records_lost": 3, "time": 1.7e9, "backlog": 8,
    "actors_wanted": 2.5,
}  # fmt: skip


def naming_problems(text: str) -> list[str]:
    """What breaks the conventions in a /metrics text, one line per metric family (its `# TYPE` line)."""
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert families, text
    problems = []
    for name, kind in families:
        if not name.startswith("pso_"):
            problems.append(f"{name}: no pso_ prefix")
        if (kind == "counter") != name.endswith("_total"):
            problems.append(f"{name}: a {kind}")
        if re.search(r"_m?s$", name.removesuffix("_total")):
            problems.append(f"{name}: an abbreviated unit")
    return problems


def test_the_learners_metrics_follow_the_conventions():
    sink = MetricsSink(None)
    sink.write(ROW)
    assert naming_problems(generate_latest(sink.registry).decode()) == []


def test_the_learners_counters_add_what_each_update_added_from_0_in_every_process():
    sink = MetricsSink(None)
    sink.write(ROW)  # the first update of a learner resumed at update 11: the totals so far are not counted again
    sink.write(ROW | {"updates": 13, "wait_s": 1.0, "stale": 2, "stale_total": 7, "lost": 4, "records_lost": 7})
    value = sink.registry.get_sample_value
    assert value("pso_learner_updates_total") == 2 and value("pso_learner_wait_seconds_total") == 3.5
    assert value("pso_learner_pairs_trained_total") == 16 and value("pso_learner_stale_records_total") == 3
    assert value("pso_learner_records_lost_total") == 4 and value("pso_learner_version") == 12


def test_the_actors_metrics_follow_the_conventions():
    registry = CollectorRegistry()
    stats = ActorStats(batches=2, records=16, pairs=16, images=64, reward_sum=8.0, backpressure_s=1.5, judgements=24)
    normalizer = RewardNormalizer({"tiny-large": 1.0})
    normalizer.total({"tiny-large": [0.1, 0.3]})
    registry.register(ActorCollector(SimpleNamespace(stats=stats, version=3, normalizer=normalizer)))
    text = generate_latest(registry).decode()
    assert naming_problems(text) == []
    assert "pso_actor_backpressure_seconds_total 1.5" in text and "pso_actor_reward_mean 0.125" in text
    assert "pso_actor_judgements_total 24.0" in text
    assert 'pso_actor_model_score_mean{model="tiny-large"} 0.2' in text


def test_the_reward_servers_metrics_follow_the_conventions():
    with serve_in_background(create_app(RewardServerConfig())) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        client.score(*scene_batch(2))  # every labelled metric gets a series
        text = httpx.get(f"{url}/metrics").text
    assert naming_problems(text) == []
    for name in ("requests_total", "request_seconds_count", "images_scored_total", "batch_images_count",
                 "batch_requests_count", "forward_seconds_count", "pending_images", "body_bytes", "ready"):  # fmt: skip
        assert re.search(rf"^pso_reward_{name}(\{{.*\}})? ", text, re.M), name
