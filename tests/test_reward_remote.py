"""`kind: http`: remote scorers behind the reward server, another PSO reward server and a vision-language
judge behind an OpenAI-compatible chat API. The chat API is a test double of that third-party service (a
real HTTP server on a free port), judging the tiny world's images with the tiny `large` reward."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reward_helpers import error_of, png_b64, scene_batch

from pso.config.reward_server import HttpSpec, LimitsConfig, RewardServerConfig, TinyJudgeSpec, TinySpec
from pso.tiny.rewards import large
from pso.tiny.world import Scene, draw
from reward_server.app import create_app
from reward_server.backends import build_backend
from reward_server.backends.http import judgement
from reward_server.client import RewardClient
from reward_server.errors import ApiError
from reward_server.main import serve_in_background

TOKEN = "judge-secret"


def rating(image: np.ndarray, prompt: str) -> float:
    """The fake judge's rating: the tiny `large` reward mapped onto 1..10, one decimal."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return round(1 + 9 * min(float(large(x, [prompt])[0]) / 0.45, 1.0), 1)


class ChatAPI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions as an OpenAI-compatible server answers it; the model id picks a behaviour."""

    calls: Counter = Counter()

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"error": {"message": "invalid api key", "code": "invalid_api_key"}})
        model = body["model"]
        ChatAPI.calls[model] += 1
        text, *urls = body["messages"][0]["content"]
        prompt = text["text"].split("prompt: '")[1].split("'.")[0]
        pngs = [base64.b64decode(url["image_url"]["url"].split(",", 1)[1]) for url in urls]
        ratings = [rating(np.array(Image.open(io.BytesIO(png)).convert("RGB")), prompt) for png in pngs]
        if len(ratings) == 2:  # a pairwise question: 1 (first), 2 (second) or 0 (a tie)
            answer = "1" if ratings[0] > ratings[1] else "2" if ratings[0] < ratings[1] else "0"
            answer = "3" if model == "confused" else answer
        else:
            answer = f"Score: {ratings[0]}"
        message: dict = {"role": "assistant", "content": answer}
        if model == "flaky" and ChatAPI.calls[model] % 2 == 1:
            return self._send(503, {"error": {"message": "overloaded"}})
        if model == "refuser":
            message = {"role": "assistant", "content": None, "refusal": "I can't help with rating this image."}
        elif model == "chatty":
            message["content"] = "What a lovely picture!"
        elif model == "generous":
            message["content"] = "42"
        self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


@contextmanager
def chat_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    with chat_api() as url:
        yield url


def judge(url: str, model: str, **kw) -> HttpSpec:
    return HttpSpec(
        **{"url": url, "api": "openai-chat", "remote_model": model, "token_env": "PSO_TEST_JUDGE_TOKEN"} | kw
    )


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("PSO_TEST_JUDGE_TOKEN", TOKEN)


def test_a_vision_language_judge_scores_each_image_by_its_rubric(judge_url, token):
    backend = build_backend(judge(judge_url, "judge", max_concurrency=3))
    images, prompts = scene_batch(7, seed=2)
    scores = backend.score(list(images), prompts)
    assert scores.tolist() == pytest.approx([rating(im.numpy(), p) for im, p in zip(images, prompts)], abs=1e-6)
    info = backend.info
    assert (info.kind, info.version, info.scale) == ("http", "judge@openai-chat", "the judge's rating, 1 to 10")


@pytest.mark.parametrize(
    "model, code, words",
    [
        ("refuser", "judge_refused", 'is a refusal: "I can\'t help with rating this image."'),
        ("chatty", "judge_unparseable", "'What a lovely picture!', holds no score from 1 to 10"),
        ("generous", "judge_unparseable", "'42', holds no score from 1 to 10"),
    ],
)
def test_a_judge_answer_without_a_score_fails_the_request_naming_the_image(judge_url, token, model, code, words):
    config = RewardServerConfig(models=[judge(judge_url, model)])
    images, prompts = scene_batch(2, seed=4)
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        r = httpx.post(f"{url}/v1/score", json={"prompts": prompts, "images": [png_b64(i) for i in images]})
    assert r.status_code == 502 and error_of(r) == code, r.text
    message = r.json()["error"]["message"]
    assert words in message and "the image of prompt 'a " in message  # which image, by its prompt


def test_the_judge_is_retried_through_overload_and_needs_its_token(judge_url, token, monkeypatch):
    images, prompts = scene_batch(2, seed=5)
    flaky = build_backend(judge(judge_url, "flaky", retries=2, max_concurrency=1))
    assert flaky.score(list(images), prompts).tolist() == pytest.approx(
        [rating(im.numpy(), p) for im, p in zip(images, prompts)]
    )
    monkeypatch.setenv("PSO_TEST_JUDGE_TOKEN", "wrong")
    config = RewardServerConfig(models=[judge(judge_url, "judge")])
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        r = httpx.post(f"{url}/v1/score", json={"prompts": prompts[:1], "images": [png_b64(images[0])]})
    assert r.status_code == 502 and error_of(r) == "upstream_error" and "HTTP 401" in r.text
    assert "invalid api key" not in r.text  # the remote's own words (a key's tail, a host) stay in the log
    monkeypatch.delenv("PSO_TEST_JUDGE_TOKEN")
    with pytest.raises(ValueError, match="token_env names PSO_TEST_JUDGE_TOKEN, which is unset or blank"):
        build_backend(judge(judge_url, "judge"))


def test_an_unreachable_remote_is_a_503_and_the_server_goes_on_serving(token):
    from pso.net import free_port

    dead = HttpSpec(url=f"http://127.0.0.1:{free_port()}/v1", api="openai-chat", remote_model="judge", retries=1)
    config = RewardServerConfig(models=[TinySpec(), dead])
    images, prompts = scene_batch(2, seed=6)
    body = {"prompts": prompts, "images": [png_b64(i) for i in images]}
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        r = httpx.post(f"{url}/v1/score", json={**body, "models": ["judge"]})
        assert r.status_code == 503 and error_of(r) == "upstream_unavailable" and r.headers["Retry-After"] == "5"
        assert str(dead.url) not in r.text  # where the remote runs stays in the log
        ok = httpx.post(f"{url}/v1/score", json={**body, "models": ["tiny-large"]})
        assert ok.status_code == 200


def test_another_reward_server_is_served_through_kind_http():
    """A front server relays to a remote PSO reward server: the remote model's scores and version, its 422 for
    input it cannot score stays a 422."""
    remote = RewardServerConfig(models=[TinySpec(), TinySpec(reward="fidelity"), TinyJudgeSpec()])
    images, prompts = scene_batch(5, seed=7)
    want = build_backend(TinySpec(reward="fidelity")).score(list(images), prompts)
    with serve_in_background(create_app(remote)) as remote_url:
        RewardClient(remote_url).wait_ready(120)
        front = RewardServerConfig(models=[HttpSpec(url=remote_url, remote_model="tiny-fidelity", name="far")])
        with serve_in_background(create_app(front)) as url:
            client = RewardClient(url)
            client.wait_ready(120)
            assert client.score(images, prompts).per_model["far"] == pytest.approx(want.tolist(), abs=1e-6)
            (info,) = client.models()
            assert info["version"].startswith("tiny-fidelity@builtin:tiny/fidelity")
            r = httpx.post(f"{url}/v1/score", json={"prompts": ["a photo of a cat"], "images": [png_b64(images[0])]})
            assert r.status_code == 422 and error_of(r) == "upstream_rejected" and "tiny-world prompt" in r.text
        with pytest.raises(ValueError, match="serves \\['tiny-fidelity', 'tiny-judge-large', 'tiny-large'\\], not"):
            build_backend(HttpSpec(url=remote_url, remote_model="nope"))
        with pytest.raises(ValueError, match="remote_model 'tiny-judge-large' is a pairwise judge there"):
            build_backend(HttpSpec(url=remote_url, remote_model="tiny-judge-large"))


def test_a_vision_language_pairwise_judge_serves_compare(judge_url, token):
    scene, rng = Scene("red", "circle", "blue"), np.random.default_rng(0)
    images = torch.from_numpy(np.stack([draw(scene, rng) for _ in range(3)]))
    pairwise = judge(judge_url, "pair-judge", api="openai-chat-pairwise")
    config = RewardServerConfig(models=[pairwise, judge(judge_url, "confused", api="openai-chat-pairwise")])
    body = {"prompt": scene.prompt, "images": [png_b64(i) for i in images]}
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        judged = RewardClient(url).judge(images, scene.prompt, "pair-judge")
        confused = httpx.post(f"{url}/v1/compare", json={**body, "judge": "confused"})
    ratings = [rating(im.numpy(), scene.prompt) for im in images]
    for j in judged["judgements"]:
        a, b = ratings[j["first"]], ratings[j["second"]]
        assert j["preference"] == (1.0 if a > b else 0.0 if a < b else 0.5)
    assert judged["version"] == "pair-judge@openai-chat-pairwise" and judged["winner"] == ratings.index(max(ratings))
    assert confused.status_code == 502 and error_of(confused) == "judge_unparseable"
    assert "is not 1 (first), 2 (second) or 0 (a tie)" in confused.text


@pytest.mark.parametrize("answer", ["7", " 7.5 ", "Score: 7", "rating = 7.", "7/10", "Answer: 7 / 10"])
def test_a_judge_answer_that_is_the_number_is_read(answer):
    completion = {"choices": [{"message": {"content": answer}, "finish_reason": "stop"}]}
    assert judgement(completion, "a prompt", 1, 10) in (7.0, 7.5)


@pytest.mark.parametrize(
    "answer, finish, words",
    [
        ("On a scale of 1 to 10 I'd give it 7", "stop", "holds no score from 1 to 10"),  # the first number is 1
        ("Image 1 is worse, so 2", "stop", "holds no score"),
        ("7", "length", "was cut off at max_tokens"),
        ("", "stop", "holds no score"),
    ],
)
def test_a_judge_answer_in_prose_or_cut_off_is_refused_not_guessed(answer, finish, words):
    completion = {"choices": [{"message": {"content": answer}, "finish_reason": finish}]}
    with pytest.raises(ApiError, match=words) as e:
        judgement(completion, "a prompt", 1, 10)
    assert e.value.status == 502 and e.value.code == "judge_unparseable"


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"url": "ftp://x"}, "url must be http:// or https://"),
        ({"url": "http://x", "api": "openai-chat"}, "needs remote_model"),
        ({"url": "http://x", "api": "openai-chat-pairwise"}, "needs remote_model"),
        ({"url": "http://x", "api": "openai-chat", "remote_model": "m", "rubric": "{image}"}, "rubric may use only"),
        ({"url": "http://x", "api": "openai-chat", "remote_model": "m", "score_range": (5, 1)}, "low < high"),
    ],
)
def test_remote_settings_are_checked_when_the_config_is_read(fields, error):
    with pytest.raises(ValueError, match=error):
        HttpSpec(**fields)


def test_a_remote_that_could_outlast_the_request_timeout_is_refused():
    slow = HttpSpec(url="http://x", timeout_s=30, retries=2)
    with pytest.raises(ValueError, match=r"timeout_s x \(retries \+ 1\) = 90 s is more than limits.request_timeout_s"):
        RewardServerConfig(models=[slow])
    RewardServerConfig(models=[slow], limits=LimitsConfig(request_timeout_s=120))
