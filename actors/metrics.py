"""The actor's Prometheus metrics, read from its running stats at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTERS = {  # ActorStats field -> help; exported as pso_actor_<field>_total
    "batches": "batches sampled, scored and pushed",
    "records": "experience records pushed",
    "pairs": "preference pairs pushed",
    "images": "images sampled and scored",
    "backpressure_s": "seconds paused because the experience backlog was over its bound",
    "reward_wait_s": "seconds spent waiting for the reward server (scoring included)",
}


class ActorCollector(Collector):
    def __init__(self, actor):
        self.actor = actor

    def collect(self):
        stats = self.actor.stats
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"pso_actor_{name}", doc, value=getattr(stats, name))
        yield GaugeMetricFamily("pso_actor_version", "weight version the actor samples with", value=self.actor.version)
        mean = stats.reward_sum / stats.images if stats.images else float("nan")
        yield GaugeMetricFamily("pso_actor_reward_mean", "mean weighted reward of every image scored", value=mean)
