"""Property-based fuzzing of the reward server from its own OpenAPI schema: no input gets a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from pso.config.reward_server import LimitsConfig, RewardServerConfig, TinySpec
from reward_server.app import create_app
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

EXAMPLES_PER_OPERATION = 100


@pytest.fixture(scope="module")
def url():
    config = RewardServerConfig(
        models=[TinySpec(reward="large"), TinySpec(reward="crispness")], limits=LimitsConfig(max_images=8)
    )
    with serve_in_background(create_app(config)) as base:
        RewardClient(base).wait_ready(120)
        yield base


def _fuzz(operation, url: str, statuses: set[int]):
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=operation.as_strategy())
    def fuzz(case):
        response = case.call(base_url=url, timeout=30)
        statuses.add(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"

    fuzz()


@pytest.mark.slow
def test_every_operation_is_fuzzed_without_a_server_error(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = {op.ok().label: op.ok() for op in schema.get_all_operations()}
    assert {"POST /v1/score", "POST /v1/compare", "POST /v1/score/safetensors", "GET /v1/models"} <= set(operations)
    seen: dict[str, set[int]] = {}
    for label, operation in operations.items():
        _fuzz(operation, url, seen.setdefault(label, set()))
    print(seen)
    assert any(4 <= s // 100 for s in seen["POST /v1/score"]), seen  # it did send bad input
