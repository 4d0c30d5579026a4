"""The actor's Prometheus metrics, read from its running stats at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTERS = {  # ActorStats field -> (name, help); exported as <name>_total
    "batches": ("pso_actor_batches", "batches sampled, scored and pushed"),
    "records": ("pso_actor_records", "experience records pushed"),
    "pairs": ("pso_actor_pairs", "preference pairs pushed"),
    "images": ("pso_actor_images", "images sampled and scored"),
    "backpressure_s": (
        "pso_actor_backpressure_seconds",
        "seconds paused because the experience backlog was over its bound",
    ),
    "judgements": ("pso_actor_judgements", "pairwise judgements asked of the judge (actor.judge)"),
    "judged_ties": ("pso_actor_judged_ties", "pairs the judge called a tie in either order"),
    "judged_inconsistent": (
        "pso_actor_judged_inconsistent",
        "pairs the judge decided by position: the same side preferred in both orders",
    ),
    "reward_wait_s": (
        "pso_actor_reward_wait_seconds",
        "seconds spent waiting for the reward server (scoring included)",
    ),
    "redis_full": (
        "pso_actor_redis_full",
        "writes Redis refused because it was out of memory (maxmemory reached), each retried with backoff",
    ),
}


class ActorCollector(Collector):
    def __init__(self, actor):
        self.actor = actor

    def collect(self):
        stats = self.actor.stats
        for field, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(stats, field))
        yield GaugeMetricFamily("pso_actor_version", "weight version the actor samples with", value=self.actor.version)
        mean = stats.reward_sum / stats.images if stats.images else float("nan")
        yield GaugeMetricFamily("pso_actor_reward_mean", "mean weighted reward of every image scored", value=mean)
        if self.actor.normalizer is not None:  # actor.reward_normalization: running
            state = self.actor.normalizer.state()
            for key, doc in (("mean", "running mean"), ("std", "running standard deviation")):
                doc = f"{doc} of each model's scores (reward normalisation)"
                family = GaugeMetricFamily(f"pso_actor_model_score_{key}", doc, labels=["model"])
                for model, moments in state.items():
                    family.add_metric([model], moments[key])
                yield family
