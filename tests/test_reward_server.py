"""The reward server over real HTTP: Granian on a free local port, called with httpx and the client."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from reward_helpers import error_of, metric, png_b64, scene_batch
from safetensors.torch import save

from pso.config.reward_server import LimitsConfig, RewardServerConfig, TinySpec
from pso.net import free_port
from reward_server.app import create_app
from reward_server.backends import build_backend
from reward_server.client import NotARewardServer, RewardClient, RewardServerError
from reward_server.main import serve_in_background

MODELS = [TinySpec(reward="large"), TinySpec(reward="fidelity", weight=0.5)]


def expected_scores(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    return {s.model_name: build_backend(s).score(list(images), prompts) for s in MODELS}


@pytest.fixture(scope="module")
def url():
    limits = LimitsConfig(max_images=16, max_pixels=128 * 128, max_total_pixels=8 * 128 * 128)
    config = RewardServerConfig(models=MODELS, limits=limits)
    with serve_in_background(create_app(config)) as base:
        RewardClient(base).wait_ready(120)
        yield base


def test_json_multipart_and_safetensors_scores_equal_the_in_process_models(url):
    images, prompts = scene_batch(6)
    want = expected_scores(images, prompts)
    total = want["tiny-large"] + 0.5 * want["tiny-fidelity"]

    by_json = httpx.post(f"{url}/v1/score", json={"prompts": prompts, "images": [png_b64(i) for i in images]}).json()
    files = [("images", (f"{i}.png", base64.b64decode(png_b64(im)), "image/png")) for i, im in enumerate(images)]
    by_form = httpx.post(f"{url}/v1/score/multipart", files=files, data={"prompts": json.dumps(prompts)}).json()
    by_client = RewardClient(url).score(images, prompts)

    for scores, totals in [
        (by_json["scores"], by_json["total"]),
        (by_form["scores"], by_form["total"]),
        (by_client.per_model, by_client.total),
    ]:
        for name, expected in want.items():
            assert scores[name] == pytest.approx(expected.tolist(), abs=1e-6)
        assert totals == pytest.approx(total.tolist(), abs=1e-6)
    assert by_client.versions["tiny-large"].startswith("builtin:tiny/large@")
    assert max(by_json["scores"]["tiny-fidelity"]) > 0.5  # the data scores high: the test can tell


def test_client_accepts_decoder_output_and_picks_models(url):
    images, prompts = scene_batch(3, seed=1)
    as_float = images.permute(0, 3, 1, 2).float() / 255
    scores = RewardClient(url).score(as_float, prompts, models=["tiny-fidelity"])
    assert list(scores.per_model) == ["tiny-fidelity"]
    assert scores.total == pytest.approx((0.5 * expected_scores(images, prompts)["tiny-fidelity"]).tolist(), abs=1e-6)


def test_compare_prefers_the_image_that_fits_the_prompt(url):
    images, prompts = scene_batch(2, seed=2)
    other = images[1] if prompts[1] != prompts[0] else torch.zeros_like(images[1])
    body = {"prompt": prompts[0], "images": [png_b64(other), png_b64(images[0])]}
    r = httpx.post(f"{url}/v1/compare", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["winner"] == 1
    assert sum(data["probabilities"]) == pytest.approx(1.0)
    assert data["probabilities"][1] > data["probabilities"][0]


def test_models_health_readiness_openapi(url):
    models = httpx.get(f"{url}/v1/models").json()["models"]
    assert [(m["name"], m["weight"], m["higher_is_better"]) for m in models] == [
        ("tiny-large", 1.0, True),
        ("tiny-fidelity", 0.5, True),
    ]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").json()["ready"] is True
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/score/safetensors", "/v1/score/multipart", "/v1/compare", "/v1/models"} <= set(paths)


def test_concurrent_clients_are_batched_and_get_their_own_scores(url):
    images, prompts = scene_batch(48, seed=3)
    want = expected_scores(images, prompts)["tiny-large"]
    before = metric(url, "pso_reward_batch_requests_count")
    client = RewardClient(url)
    barrier = threading.Barrier(16)

    def one(i: int) -> list[float]:
        barrier.wait() if i < 16 else None
        return client.score(images[i : i + 1], prompts[i : i + 1], models=["tiny-large"]).per_model["tiny-large"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(48)))
    assert [g[0] for g in got] == pytest.approx(want.tolist(), abs=1e-6)
    batches = metric(url, "pso_reward_batch_requests_count") - before
    assert batches < 48, f"48 concurrent requests ran in {batches} batches: no batching"
    assert metric(url, "pso_reward_images_scored_total", model="tiny-large") >= 48


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _bad_requests():
    images, prompts = scene_batch(2, seed=4)
    good = png_b64(images[0])
    png = _png_bytes(images[0].numpy())
    huge = base64.b64encode(_png_bytes(np.zeros((200, 200, 3), np.uint8))).decode()  # 40,000 px > 128x128
    J = "application/json"
    st = "application/octet-stream"

    def body(**kw):
        return json.dumps({"prompts": prompts[:1], "images": [good], **kw}).encode()

    def st_body(tensor, meta):
        return save({"images": tensor}, metadata=meta)

    return [
        # name, path, content, content-type headers, status, code
        ("malformed base64", "/v1/score", body(images=["not*base64!"]), J, 400, "bad_base64"),
        ("not an image", "/v1/score", body(images=[base64.b64encode(b"hello world").decode()]), J, 400, "bad_image"),
        ("truncated PNG", "/v1/score", body(images=[base64.b64encode(png[:-40]).decode()]), J, 400, "bad_image"),
        ("GIF is not accepted", "/v1/score", body(images=[_gif_b64()]), J, 400, "bad_image"),
        ("too many pixels", "/v1/score", body(images=[huge]), J, 413, "image_too_large"),
        ("wrong content type", "/v1/score", body(), "text/plain", 415, "unsupported_media_type"),
        ("no content type", "/v1/compare", body(), "", 415, "unsupported_media_type"),
        ("invalid JSON", "/v1/score", b'{"prompts": [', J, 400, "bad_json"),
        ("missing field", "/v1/score", json.dumps({"prompts": prompts}).encode(), J, 422, "invalid_request"),
        ("count mismatch", "/v1/score", body(prompts=prompts), J, 422, "count_mismatch"),
        ("unknown model", "/v1/score", body(models=["pickscore"]), J, 422, "unknown_model"),
        ("empty model list", "/v1/score", body(models=[]), J, 422, "bad_field"),
        ("too many images", "/v1/score", body(prompts=prompts[:1] * 17, images=[good] * 17), J, 413, "too_many_images"),
        ("prompt too long", "/v1/score", body(prompts=["a" * 2001]), J, 422, "prompt_too_long"),
        ("not a tiny-world prompt", "/v1/score", body(prompts=["a photo of a cat"]), J, 422, "bad_prompt"),
        ("wrong image size", "/v1/score", body(images=[png_b64(torch.zeros(64, 64, 3, dtype=torch.uint8))]), J, 422,
         "bad_image"),
        ("compare needs two images", "/v1/compare", json.dumps({"prompt": prompts[0], "images": [good]}).encode(), J,
         422, "invalid_request"),
        ("compare temperature", "/v1/compare",
         json.dumps({"prompt": prompts[0], "images": [good, good], "temperature": 0}).encode(), J, 422,
         "invalid_request"),
        ("body too large", "/v1/score", b" " * (64 * 2**20 + 1), J, 413, "body_too_large"),
        ("garbage safetensors", "/v1/score/safetensors", b"\x00" * 64, st, 400, "bad_safetensors"),
        ("float safetensors", "/v1/score/safetensors",
         st_body(torch.zeros(1, 32, 32, 3), {"prompts": json.dumps(prompts[:1])}), st, 422, "bad_safetensors"),
        ("safetensors without prompts", "/v1/score/safetensors", st_body(images[:1].contiguous(), {}), st, 422,
         "bad_safetensors"),
        ("safetensors prompts not a list", "/v1/score/safetensors",
         st_body(images[:1].contiguous(), {"prompts": "a red circle"}), st, 422, "bad_field"),
        ("multipart without prompts", "/v1/score/multipart", None, None, 422, "bad_field"),
        ("unknown path", "/v1/nothing", body(), J, 404, "http_error"),
    ]  # fmt: skip


def _gif_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(url, case):
    _, path, content, ctype, status, code = case
    if content is None:  # a multipart form with a file but no prompts field
        r = httpx.post(f"{url}{path}", files=[("images", ("a.png", b"x", "image/png"))])
    else:
        r = httpx.post(f"{url}{path}", content=content, headers={"content-type": ctype} if ctype else {})
    assert (r.status_code, error_of(r)) == (status, code), r.text
    assert len(r.json()["error"]["message"]) > 5
    images, prompts = scene_batch(1)
    assert RewardClient(url).score(images, prompts).total  # still serving


def test_a_decompression_bomb_is_refused_before_decoding(url):
    """A 20000 x 20000 PNG compresses to a few hundred KB; its header alone must get it refused."""
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG", optimize=False, compress_level=9)
    r = httpx.post(f"{url}/v1/score", json={"prompts": ["x"], "images": [base64.b64encode(buf.getvalue()).decode()]})
    assert (r.status_code, error_of(r)) == (413, "image_too_large")


def test_bearer_token_is_required_when_configured(monkeypatch):
    monkeypatch.setenv("TEST_REWARD_TOKEN", "s3cret")
    config = RewardServerConfig(token_env="TEST_REWARD_TOKEN")
    images, prompts = scene_batch(1)
    with serve_in_background(create_app(config)) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no token
        RewardClient(url).wait_ready(120)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, error_of(r), r.headers["www-authenticate"]) == (401, "unauthorized", "Bearer")
        with pytest.raises(RewardServerError) as e:
            RewardClient(url, token="wrong", retries=0).score(images, prompts)
        assert e.value.status == 401
        assert RewardClient(url, token="s3cret").score(images, prompts).total
        monkeypatch.setenv("PSO_REWARD_TOKEN", "s3cret")
        assert RewardClient(url).models()[0]["name"] == "tiny-large"


def test_readiness_gate_holds_until_every_model_is_loaded():
    gate = threading.Event()

    def gated_build(spec, device):
        gate.wait(30)
        return build_backend(spec, device)

    images, prompts = scene_batch(1)
    with serve_in_background(create_app(RewardServerConfig(models=MODELS), builder=gated_build)) as url:
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert httpx.get(f"{url}/healthz").status_code == 200
        r = httpx.post(f"{url}/v1/score", json={"prompts": prompts, "images": [png_b64(images[0])]})
        assert (r.status_code, error_of(r)) == (503, "not_ready")
        assert "pso_reward_ready 0.0" in httpx.get(f"{url}/metrics").text
        gate.set()
        RewardClient(url).wait_ready(120)
        assert httpx.get(f"{url}/readyz").json()["models"] == ["tiny-large@cpu", "tiny-fidelity@cpu"]
        # the queue gauge is there, at 0, before any image: an autoscaler reads an idle server, not an error
        assert 'pso_reward_pending_images{device="cpu"} 0.0' in httpx.get(f"{url}/metrics").text
        assert RewardClient(url).score(images, prompts).total


def test_a_model_that_fails_to_load_keeps_readiness_down_with_the_reason():
    failures = []

    def broken_build(spec, device):
        raise FileNotFoundError("/models/missing has no ImageReward.pt")

    app = create_app(RewardServerConfig(), on_load_failure=failures.append, builder=broken_build)
    with serve_in_background(app) as url:
        _wait_for(lambda: httpx.get(f"{url}/readyz").json()["error"] is not None, "the load to fail")
        with pytest.raises(RewardServerError, match=r"tiny-large failed to load on cpu \(FileNotFoundError\)"):
            RewardClient(url).wait_ready(0.1, interval=0.1)
        assert "/models/missing" not in httpx.get(f"{url}/readyz").text  # paths stay in the log
    assert failures == ["FileNotFoundError: /models/missing has no ImageReward.pt"]


def test_client_retries_until_the_server_comes_up():
    port = free_port()
    images, prompts = scene_batch(2)
    result = {}

    def call():
        result["scores"] = RewardClient(f"http://127.0.0.1:{port}", retries=30, backoff=0.2).score(images, prompts)

    caller = threading.Thread(target=call)
    caller.start()  # the first attempts meet a closed port
    threading.Event().wait(0.5)
    with serve_in_background(create_app(RewardServerConfig()), port=port):
        caller.join(300)
    assert result["scores"].per_model["tiny-large"] == pytest.approx(
        build_backend(TinySpec()).score(list(images), prompts).tolist(), abs=1e-6
    )


def test_client_gives_up_with_a_clear_error_when_nobody_answers():
    with pytest.raises(RewardServerError, match="failed after 3 attempts: ConnectError"):
        RewardClient("http://127.0.0.1:9", retries=2, backoff=0.01).score(*scene_batch(1))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_pso_reward_server_command_serves_the_tiny_reward_and_stops_cleanly(tmp_path, workers):
    """...and /metrics counts every worker's requests, whichever worker answers the scrape, from a folder of
    the server's own (in the temporary folder, or in the operator's $PROMETHEUS_MULTIPROC_DIR)."""
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    parent = tmp_path / "operator" if workers > 1 else tmp_path
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pso.cli", "reward-server", "--port", str(port), "--workers", str(workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
        # where the server makes its metrics folder: in the temporary folder, or in the operator's (two workers)
        env={**os.environ, "TMPDIR": str(tmp_path)}
        | ({"PROMETHEUS_MULTIPROC_DIR": str(parent)} if workers > 1 else {}),
    )
    try:
        client = RewardClient(url)
        client.wait_ready(120)
        images, prompts = scene_batch(4, seed=5)
        assert client.score(images, prompts).per_model["tiny-large"] == pytest.approx(
            build_backend(TinySpec()).score(list(images), prompts).tolist(), abs=1e-6
        )
        # one ready worker answers /readyz; the others may still be loading (slower on a busy machine)
        deadline = time.monotonic() + 120
        while (tmp_path / "server.log").read_text().count("ready: tiny-large on cpu") < workers:
            assert time.monotonic() < deadline, "not every worker got ready within 120 s"
            time.sleep(0.2)
        (folder,) = parent.glob("pso-reward-metrics-*")
        sent = _score_until_every_worker_answered(url, folder, workers)
        scored = lambda: metric(url, "pso_reward_requests_total", endpoint="/v1/score")  # noqa: E731
        _wait_for(lambda: scored() == sent, "every request to be counted")
        assert [scored() for _ in range(4)] == [sent] * 4  # a new connection each: any worker may answer
        assert metric(url, "pso_reward_ready") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    log.seek(0)
    text = log.read()
    assert code == 0, text
    assert text.count("ready: tiny-large on cpu") == workers and text.count("pso.reward_server: shut down") == workers
    assert not folder.exists() and parent.is_dir()


def _score_until_every_worker_answered(url: str, folder, workers: int) -> int:
    """Sends /v1/score requests, 8 at a time on new connections, until every worker has answered some; returns
    how many it sent. Each worker's own count is read from its file in the server's metrics folder."""
    from prometheus_client.multiprocess import MultiProcessCollector

    image, prompt = scene_batch(1, seed=7)
    body = {"images": [png_b64(image[0])], "prompts": prompt}
    sent = 0
    for _ in range(50):
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/score", json=body, timeout=60).status_code, range(8)))
        assert codes == [200] * 8
        sent += 8
        answered = [
            sum(s.value for m in MultiProcessCollector.merge([str(f)]) for s in m.samples
                if s.name == "pso_reward_requests_total" and s.labels["endpoint"] == "/v1/score")
            for f in folder.glob("counter_*.db")
        ]  # fmt: skip
        if sum(n > 0 for n in answered) == workers:
            return sent
    raise AssertionError(f"{sent} requests, answered by the workers as {answered}")


def test_pso_reward_server_rejects_a_bad_config_before_serving(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "bad.yaml"
    config.write_text("reward_server:\n  models: [{kind: tiny, reward: huge}]\n")
    r = subprocess.run(
        [sys.executable, "-m", "pso.cli", "reward-server", "--config", str(config)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "reward_server.models.0.reward" in r.stderr and "huge" in r.stderr


def test_two_model_copies_share_the_load():
    config = RewardServerConfig(devices=["cpu", "cpu"], batching={"window_ms": 20})
    images, prompts = scene_batch(64, seed=6)
    want = build_backend(TinySpec()).score(list(images), prompts)
    with serve_in_background(create_app(config)) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        assert httpx.get(f"{url}/readyz").json()["models"] == ["tiny-large@cpu", "tiny-large@cpu#1"]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda i: client.score(images[i : i + 4], prompts[i : i + 4]).total, range(0, 64, 4)))
        assert sum(got, []) == pytest.approx(want.tolist(), abs=1e-6)
        for device in ("cpu", "cpu#1"):
            assert metric(url, "pso_reward_batch_requests_count", device=device) > 0


def test_pso_reward_server_exits_when_a_model_cannot_be_loaded(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "missing.yaml"
    config.write_text(
        f"reward_server:\n  models: [{{kind: image-reward, checkpoint: {tmp_path}/none/ImageReward.pt}}]\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pso.cli", "reward-server", "-c", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert "loading the reward models failed: FileNotFoundError" in r.stderr and "none/ImageReward.pt" in r.stderr


def test_neural_reward_models_over_http_score_as_in_process(tmp_path):
    """Tiny random ImageReward, PickScore, HPSv2 and aesthetic models served together with the tiny reward:
    per-model scores equal each model's own in-process scores, and the total is their weighted sum."""
    from pso.config.reward_server import AestheticSpec, HPSv2Spec, ImageRewardSpec, PickScoreSpec
    from reward_server.backends import clip_rewards, image_reward

    ir = image_reward.build_random(tmp_path / "ir")
    folders = {k: clip_rewards.build_random(k, tmp_path / k) for k in ("pickscore", "hpsv2", "aesthetic")}
    models = [
        TinySpec(),
        ImageRewardSpec(checkpoint=str(ir), tokenizer=str(ir), weight=0.5),
        PickScoreSpec(model=str(folders["pickscore"]), processor=str(folders["pickscore"]), weight=0.01),
        HPSv2Spec(checkpoint=str(folders["hpsv2"]), processor=str(folders["hpsv2"]), max_batch=3),
        AestheticSpec(model=str(folders["aesthetic"]), head=str(folders["aesthetic"]), weight=0.1),
    ]
    images, prompts = scene_batch(7, seed=7)
    with serve_in_background(create_app(RewardServerConfig(models=models))) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        served = client.score(images, prompts)
        info = {m["name"]: m for m in client.models()}
    total = torch.zeros(7, dtype=torch.float64)
    for spec in models:
        want = build_backend(spec).score(list(images), prompts)
        assert served.per_model[spec.model_name] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6), spec.kind
        assert served.versions[spec.model_name] == info[spec.model_name]["version"]
        total += spec.weight * want.double()
    assert served.total == pytest.approx(total.tolist(), rel=1e-5, abs=1e-6)
    assert len(set(served.per_model["image-reward"])) == 7  # the scores tell the images apart


def test_every_shipped_config_names_served_models_that_exist():
    from pathlib import Path

    from pso.config import load_config
    from pso.config.schema import PSOConfig
    from reward_server.backends import BACKENDS

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        config = load_config(PSOConfig, path).reward_server
        assert {m.kind for m in config.models} <= set(BACKENDS), path
    service = load_config(PSOConfig, Path(__file__).parents[1] / "configs" / "reward-server.yaml").reward_server
    assert [m.model_name for m in service.models] == ["pickscore", "image-reward", "hpsv2", "aesthetic"]


def _png(array: np.ndarray, **save) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return base64.b64encode(buf.getvalue()).decode()


def test_hardened_inputs(url):
    images, prompts = scene_batch(2, seed=8)
    good = png_b64(images[0])

    def post(path, **kw):
        return httpx.post(f"{url}{path}", **kw)

    # a whole request's pixels are bounded, not just each image's (checked from the headers)
    many = [_png(np.zeros((120, 120, 3), np.uint8))] * 16
    r = post("/v1/score", json={"prompts": ["x"] * 16, "images": many})
    assert (r.status_code, error_of(r)) == (413, "too_many_pixels")
    # a long list of wrong items is refused before it is parsed
    r = post("/v1/score", json={"prompts": [0] * 100_000, "images": [good]})
    assert (r.status_code, error_of(r)) == (413, "too_many_values")
    r = post("/v1/score", json={"prompts": [0] * 5000, "images": [good]})
    assert (r.status_code, error_of(r)) == (422, "invalid_request") and "at most 4096" in r.text
    # a lone surrogate cannot reach a tokenizer
    body = save({"images": images[:1].contiguous()}, metadata={"prompts": '["\\ud800"]'})
    r = post("/v1/score/safetensors", content=body, headers={"content-type": "application/octet-stream"})
    assert (r.status_code, error_of(r)) == (422, "bad_field") and "not valid JSON" in r.text
    # a vanishing temperature still gives finite probabilities
    r = post("/v1/compare", json={"prompt": prompts[0], "images": [good, good], "temperature": 5e-324})
    assert r.status_code == 200 and r.json()["probabilities"] == [0.5, 0.5]  # a tie is a tie
    assert len(set(r.json()["total"])) == 1
    # safetensors headers the library cannot read are a 400, not a 500
    for dtype, shape in [("F8_E8M0", [1, 32, 32, 3]), ("U8", [2**62, 0, 0, 3]), ("U8", [1, 32, 32, 3])]:
        header = json.dumps({"images": {"dtype": dtype, "shape": shape, "data_offsets": [0, 7]}}).encode()
        raw = len(header).to_bytes(8, "little") + header + b"\0" * 7
        r = post("/v1/score/safetensors", content=raw, headers={"content-type": "application/octet-stream"})
        assert 400 <= r.status_code < 500, (dtype, shape, r.text)
    # multipart: too many files is a 413, a part without a filename is named
    files = [("images", (f"{i}.png", base64.b64decode(good), "image/png")) for i in range(17)]
    r = post("/v1/score/multipart", files=files, data={"prompts": json.dumps(prompts[:1] * 17)})
    assert (r.status_code, error_of(r)) == (413, "too_many_images")
    r = post(
        "/v1/score/multipart", files=[("images", (None, b"not a file"))], data={"prompts": json.dumps(prompts[:1])}
    )
    assert (r.status_code, error_of(r)) == (422, "bad_field")


def test_the_largest_request_with_quotes_in_its_prompts_is_scored():
    """max_images images in one safetensors body, each prompt with quotes and a backslash: the header's
    JSON-in-JSON escapes them all, and the bounded JSON scan must still let it through."""
    config = RewardServerConfig(
        models=[TinySpec(reward="crispness")], limits=LimitsConfig(max_images=4096), batching={"max_queue": 4096}
    )
    images = scene_batch(64)[0].repeat(64, 1, 1, 1)
    prompts = [f"a sign saying \"{i}\", a \\ and a 'quote'" for i in range(4096)]
    with serve_in_background(create_app(config)) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        assert len(client.score(images, prompts).total) == 4096


def test_16_bit_and_rotated_images_decode_as_viewers_show_them():
    from reward_server import decode

    limits = LimitsConfig()
    grey16 = io.BytesIO()
    Image.fromarray(np.full((4, 6), 30000, np.uint16)).save(grey16, format="PNG")
    (im,) = decode.open_images([grey16.getvalue()], limits)
    assert decode.to_tensor(im, "x").unique().tolist() == [30000 >> 8]
    tall = np.zeros((8, 4, 3), np.uint8)
    tall[0, :] = 255  # a white top row
    jpeg = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(tall).save(jpeg, format="JPEG", exif=exif, quality=100)
    (im,) = decode.open_images([jpeg.getvalue()], limits)
    upright = decode.to_tensor(im, "x")
    assert upright.shape == (4, 8, 3) and upright[:, -1].float().mean() > 200  # the top row is now on the right


def _stalled_upload(url: str, release: threading.Event, headers: dict[str, str], result: dict) -> threading.Thread:
    """A thread posting a JSON body whose second half waits for `release` (at most a minute)."""

    def body():
        yield b'{"prompts": '
        release.wait(60)
        yield b"[]}"

    def post():
        result["r"] = httpx.post(
            f"{url}/v1/score", content=body(), headers={**headers, "content-type": "application/json"}, timeout=120
        )

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_auth_and_admission_come_before_the_body(monkeypatch):
    monkeypatch.setenv("TEST_REWARD_TOKEN", "s3cret")
    config = RewardServerConfig(token_env="TEST_REWARD_TOKEN", limits=LimitsConfig(max_concurrent_requests=1))
    auth = {"Authorization": "Bearer s3cret"}
    with serve_in_background(create_app(config)) as url:
        r = httpx.post(f"{url}/v1/score", content=b"{not json", headers={"content-type": "application/json"})
        assert (r.status_code, error_of(r)) == (401, "unauthorized")  # the body was never parsed

        release, slow = threading.Event(), {}
        caller = _stalled_upload(url, release, auth, slow)
        _wait_for(lambda: metric(url, "pso_reward_body_bytes") > 0, "the stalled upload to start")
        r = httpx.get(f"{url}/v1/models", headers=auth)  # the stalled upload holds the only slot
        assert (r.status_code, error_of(r), r.headers["retry-after"]) == (429, "busy", "1")
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes are never turned away
        release.set()
        caller.join(60)
        assert (slow["r"].status_code, error_of(slow["r"])) == (422, "invalid_request")  # its body arrived whole
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200


def test_a_body_that_stalls_gets_408_and_the_server_moves_on():
    config = RewardServerConfig(limits=LimitsConfig(request_timeout_s=1.0))
    with serve_in_background(create_app(config)) as url:
        release, slow = threading.Event(), {}
        caller = _stalled_upload(url, release, {}, slow)
        _wait_for(lambda: metric(url, "pso_reward_requests_total", status="408") == 1, "the server to answer 408")
        release.set()  # the client reads the answer once its body is out
        caller.join(60)
        assert (slow["r"].status_code, error_of(slow["r"])) == (408, "body_timeout")
        assert metric(url, "pso_reward_body_bytes") == 0
        assert RewardClient(url).score(*scene_batch(1)).total


def test_a_body_without_a_length_is_cut_off_at_the_limit():
    """A chunked upload announces no length: it is refused once what arrived passes max_body_bytes."""
    config = RewardServerConfig(limits=LimitsConfig(max_body_bytes=2**20))

    def chunks():
        for _ in range(64):
            yield b" " * 2**16

    with serve_in_background(create_app(config)) as url:
        r = httpx.post(f"{url}/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert (r.status_code, error_of(r)) == (413, "body_too_large")
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert metric(url, "pso_reward_body_bytes") == 0


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


def faulty(fault):
    """A builder for `create_app` whose real tiny models run `fault(prompts)` before each batch: a test's
    way to hold a batch (an Event), or to make one fail as a device would (out of memory)."""

    def build(spec, device):
        backend = build_backend(spec, device)
        score_batch = backend.score_batch

        def faulty_score_batch(pixels, prompts):
            fault(list(prompts))
            return score_batch(pixels, prompts)

        backend.score_batch = faulty_score_batch
        return backend

    return build


def test_a_request_not_scored_in_time_gets_503_timeout_with_retry_after():
    gate = threading.Event()
    app = create_app(
        RewardServerConfig(limits=LimitsConfig(request_timeout_s=1.0)), builder=faulty(lambda _: gate.wait(60))
    )
    with serve_in_background(app) as url:
        RewardClient(url).wait_ready(120)
        r = httpx.post(
            f"{url}/v1/score", json={"prompts": scene_batch(1)[1], "images": [png_b64(scene_batch(1)[0][0])]}
        )
        assert (r.status_code, error_of(r), r.headers["retry-after"]) == (503, "timeout", "1")
        gate.set()
        _wait_for(lambda: metric(url, "pso_reward_pending_images") == 0, "the abandoned job to give its room back")
        assert RewardClient(url).score(*scene_batch(2)).total


def test_one_request_failing_its_batch_does_not_fail_the_others():
    """Out of memory on a batch that holds a huge request: the batch is rerun one request at a time, the
    culprit gets 503 `overloaded` (retry with fewer images), the others their scores."""
    gate, batches = threading.Event(), []

    def fault(prompts):
        batches.append(prompts)
        gate.wait(60)
        if len(prompts) >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (as a device would say)")

    app = create_app(RewardServerConfig(), builder=faulty(fault))
    pool = app.app.state.pool
    small, small_prompts = scene_batch(2, seed=12)
    big, big_prompts = scene_batch(8, seed=13)
    with serve_in_background(app) as url:
        client = RewardClient(url, retries=0)
        client.wait_ready(120)
        with ThreadPoolExecutor(3) as threads:
            holder = threads.submit(client.score, *scene_batch(1, seed=14))  # holds the device while the others queue
            _wait_for(lambda: len(batches) == 1, "the first batch to start")
            fine = threads.submit(client.score, small, small_prompts)
            huge = threads.submit(client.score, big, big_prompts)
            _wait_for(lambda: pool.batchers[0].queue.qsize() == 2, "both requests to queue")
            gate.set()
            assert holder.result(60).total
            assert fine.result(60).per_model["tiny-large"] == pytest.approx(
                build_backend(TinySpec()).score(list(small), small_prompts).tolist(), abs=1e-6
            )
            with pytest.raises(RewardServerError) as e:
                huge.result(60)
    assert (e.value.status, e.value.code) == (503, "overloaded")
    assert sorted(map(len, batches)) == [1, 2, 8, 10]  # together, then each alone


def test_requests_waiting_when_the_models_stop_get_503_shutting_down():
    """The HTTP server answers the requests in progress before it stops the models; one still waiting
    then (the grace period over) is told to go elsewhere."""
    import asyncio

    from reward_server.errors import ApiError
    from reward_server.metrics import ServerMetrics
    from reward_server.pool import ModelPool

    gate = threading.Event()
    images, prompts = scene_batch(2)

    async def scenario():
        pool = ModelPool(RewardServerConfig(), ServerMetrics(), faulty(lambda _: gate.wait(60)))
        await pool.load()
        running = asyncio.ensure_future(pool.run(lambda: (images[:1], prompts[:1], ["tiny-large"])))
        await _until(lambda: pool.batchers[0]._running or running.done(), "the first request to run")
        waiting = asyncio.ensure_future(pool.run(lambda: (images[1:], prompts[1:], ["tiny-large"])))
        await _until(lambda: pool.batchers[0].queue.qsize() or waiting.done(), "the second request to queue")
        await pool.close()
        gate.set()
        return await asyncio.gather(running, waiting, return_exceptions=True)

    async def _until(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"waited 60 s for {what}"
            await asyncio.sleep(0.01)

    results = asyncio.run(scenario())
    for result in results:
        assert isinstance(result, ApiError) and (result.status, result.code) == (503, "shutting_down"), result


def test_the_client_waits_as_long_as_retry_after_says(caplog):
    """A 429 says Retry-After: 1; with a backoff of 10 ms of its own the client still waits about a second."""
    gate = threading.Event()
    config = RewardServerConfig(limits=LimitsConfig(max_concurrent_requests=1))
    app = create_app(config, builder=faulty(lambda _: gate.wait(60)))
    with serve_in_background(app) as url:
        RewardClient(url).wait_ready(120)
        with ThreadPoolExecutor(1) as threads:
            holder = threads.submit(RewardClient(url).score, *scene_batch(1))  # holds the only slot
            _wait_for(lambda: metric(url, "pso_reward_pending_images") == 1, "the first request to hold the slot")
            caplog.set_level("WARNING", logger="pso.reward_client")
            client = RewardClient(url, backoff=0.01, retries=20)

            def release_after_a_429():  # the slot frees up while the client waits
                _wait_for(lambda: metric(url, "pso_reward_requests_total", status="429") >= 1, "a 429")
                gate.set()

            release = threading.Thread(target=release_after_a_429)
            release.start()
            start = time.perf_counter()
            assert client.score(*scene_batch(2)).total
            elapsed = time.perf_counter() - start
            release.join(60)
            assert holder.result(60).total
    retries = [r.getMessage() for r in caplog.records if r.name == "pso.reward_client"]
    delays = [float(m.rsplit("retrying in ", 1)[1].split()[0]) for m in retries]
    assert delays and all(0.8 <= d <= 1.2 for d in delays), delays
    assert "429 too many requests in progress" in retries[0]
    assert elapsed >= 0.8 * len(delays)


class _FixedAnswer(BaseHTTPRequestHandler):
    """Answers every GET with the class's status and body: a web server or gateway at a wrong reward URL."""

    status, body = 404, b"<html>not found</html>"

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "status, body, gives_up_at_once",
    [
        (404, b"<html>not found</html>", True),  # a web server
        (200, b'{"status": "ok"}', True),  # some other JSON service
        (502, b"<html>bad gateway</html>", False),  # a proxy whose reward server is not up yet
        (503, b'{"ready": false, "models": [], "error": null}', False),  # a reward server loading its models
    ],
)
def test_wait_ready_names_a_server_that_is_not_a_reward_server_and_waits_for_one_starting(
    status, body, gives_up_at_once
):
    handler = type("Answer", (_FixedAnswer,), {"status": status, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(RewardServerError) as e:
            RewardClient(url).wait_ready(timeout=2, interval=0.1)
        assert isinstance(e.value, NotARewardServer) == gives_up_at_once, e.value
        if gives_up_at_once:
            assert f"{url} answers, but not as a PSO reward server" in str(e.value) and str(status) in str(e.value)
        else:
            assert time.monotonic() - start >= 2 and "not ready after 2 s" in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


def _keep_alive_exchange(url: str, requests: list[bytes]) -> list[bytes]:
    """Send each request on one kept-alive connection after the previous answer; the status lines."""
    host, port = url.removeprefix("http://").split(":")
    lines = []
    with socket.create_connection((host, int(port)), timeout=60) as s:
        reader = s.makefile("rb")
        for request in requests:
            s.sendall(request)
            lines.append(reader.readline().strip())
            length = 0
            while (header := reader.readline().strip()) != b"":
                name, _, value = header.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            reader.read(length)
    return lines


def test_a_server_error_keeps_the_connection_open():
    """A 500 once reset the kept-alive connection, failing the client's next request on it."""

    images, prompts = scene_batch(2, seed=15)
    assert prompts[0] != prompts[1]

    def fault(batch_prompts):
        if prompts[1] in batch_prompts:
            raise KeyError("a bug in a model")  # unexpected: the batch fails with a 500

    app = create_app(RewardServerConfig(), builder=faulty(fault))

    def request(i: int) -> bytes:
        body = save({"images": images[i : i + 1].contiguous()}, metadata={"prompts": json.dumps(prompts[i : i + 1])})
        return (f"POST /v1/score/safetensors HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip

    with serve_in_background(app) as url:
        RewardClient(url).wait_ready(120)
        lines = _keep_alive_exchange(url, [request(1), request(0), request(1), request(0)])
    assert [line.split()[1] for line in lines] == [b"500", b"200", b"500", b"200"]


def test_an_unexpected_error_is_a_json_500_and_the_connection_stays_open(caplog):
    """An exception no handler expects (here a model's prompt check) is logged with its traceback once and
    answered as JSON; the HTTP server never sees it, so it does not drop the kept-alive connection."""
    images, prompts = scene_batch(2, seed=16)
    assert prompts[0] != prompts[1]

    def build(spec, device):
        backend = build_backend(spec, device)
        check_prompt = backend.check_prompt

        def broken_check_prompt(prompt):
            if prompt == prompts[1]:
                raise KeyError("a bug")
            check_prompt(prompt)

        backend.check_prompt = broken_check_prompt
        return backend

    def request(i: int) -> bytes:
        body = json.dumps({"prompts": prompts[i : i + 1], "images": [png_b64(images[i])]}).encode()
        return (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip

    with serve_in_background(create_app(RewardServerConfig(), builder=build)) as url:
        RewardClient(url).wait_ready(120)
        lines = _keep_alive_exchange(url, [request(1), request(0), request(1), request(0)])
    assert [line.split()[1] for line in lines] == [b"500", b"200", b"500", b"200"]
    failures = [r for r in caplog.records if r.name == "pso.reward_server" and "failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info and r.exc_info[0] is KeyError for r in failures)


def test_queue_room_is_reserved_per_device_and_given_back():
    from pso.config import ConfigError, load_config
    from pso.config.schema import PSOConfig

    with pytest.raises(ConfigError, match="max_queue"):
        load_config(PSOConfig, overrides=["reward_server.batching.max_queue=8", "reward_server.limits.max_images=16"])
    config = RewardServerConfig(batching={"max_queue": 16}, limits=LimitsConfig(max_images=16))
    images, prompts = scene_batch(16, seed=9)
    with serve_in_background(create_app(config)) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: client.score(images, prompts), range(8)))  # 429s are retried
        assert metric(url, "pso_reward_pending_images") == 0
        assert metric(url, "pso_reward_requests_total", endpoint="/v1/score/safetensors", status="200") == 8
