"""`kind: python`: a scorer class of the user's, named in the config, served like the built-in kinds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from reward_helpers import error_of, metric, png_b64, scene_batch

from pso.config.reward_server import PythonSpec, RewardServerConfig
from pso.net import free_port
from reward_server.app import create_app
from reward_server.backends import build_backend
from reward_server.backends.base import RewardInputError
from reward_server.backends.python import ScorerError
from reward_server.client import RewardClient
from reward_server.main import serve_in_background

EXAMPLE = Path(__file__).parents[1] / "examples" / "pso-example-scorer"

# scorers for the protocol's edge cases, written into a module the server imports by path
SCORERS = '''
import torch

class MeanRed:
    """The mean red level, 0-1; remembers the shapes it was given."""
    scale = "mean red, 0 to 1"
    version = "v7"
    def __init__(self, device, offset=0.0):
        self.device, self.offset, self.shapes = device, offset, []
    def score(self, images, prompts):
        self.shapes.append(tuple(images.shape))
        return images[..., 0].float().mean((1, 2)) / 255 + self.offset
    def check_prompt(self, prompt):
        return "the prompt is empty" if not prompt.strip() else None

class TooFew:
    def __init__(self, device): pass
    def score(self, images, prompts): return [0.5] * (len(images) - 1)

class Words:
    def __init__(self, device): pass
    def score(self, images, prompts): return ["good"] * len(images)

class NaNs:
    def __init__(self, device): pass
    def score(self, images, prompts): return [float("nan")] * len(images)

class NoScore:
    def __init__(self, device): pass

class Both:
    def __init__(self, device): pass
    def score(self, images, prompts): return [0.0] * len(images)
    def compare(self, first, second, prompts): return [0.5] * len(first)

class RedderFirst:
    """A pairwise judge: prefers the redder image; `out_of_range` breaks the protocol."""
    def __init__(self, device, out_of_range=False):
        self.out_of_range = out_of_range
    def compare(self, first, second, prompts):
        a, b = first[..., 0].float().mean((1, 2)), second[..., 0].float().mean((1, 2))
        prefs = (a > b).float() + 0.5 * (a == b).float()
        return (prefs * 3 if self.out_of_range else prefs).tolist()
'''


@pytest.fixture
def scorers(tmp_path, monkeypatch) -> str:
    """The name of an importable module holding SCORERS (unique per test: no stale import)."""
    name = f"user_scorers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_scorer_class_is_loaded_with_its_options_and_scores_in_batches(scorers):
    spec = PythonSpec(scorer=f"{scorers}:MeanRed", options={"offset": 1.0}, max_batch=2)
    assert spec.model_name == "MeanRed"
    backend = build_backend(spec)
    images, prompts = scene_batch(5)
    scores = backend.score(list(images), prompts)
    assert scores.tolist() == pytest.approx((images[..., 0].float().mean((1, 2)) / 255 + 1.0).tolist())
    assert backend.scorer.shapes == [(2, 32, 32, 3), (2, 32, 32, 3), (1, 32, 32, 3)]  # max_batch per call
    info = backend.info
    assert (info.kind, info.version, info.scale) == ("python", f"{scorers}:MeanRed@v7", "mean red, 0 to 1")
    with pytest.raises(RewardInputError, match="the prompt is empty"):
        backend.score([images[0]], ["  "])


def test_image_size_resizes_every_image_to_one_square(scorers):
    backend = build_backend(PythonSpec(scorer=f"{scorers}:MeanRed", image_size=16))
    wide = torch.full((24, 48, 3), 200, dtype=torch.uint8)
    assert backend.score([wide, wide[:, :24]], ["a", "b"]).tolist() == pytest.approx([200 / 255] * 2, abs=1e-6)
    assert backend.scorer.shapes == [(2, 16, 16, 3)]  # both sizes resized, then scored together
    with pytest.raises(RewardInputError, match="longer than it is wide"):
        backend.check_size(2000, 10)


@pytest.mark.parametrize(
    "cls, message",
    [
        ("TooFew", "returned 2 scores for 3 images"),
        ("Words", "must return numbers"),
        ("NaNs", "returned a non-finite score"),
    ],
)
def test_a_scorer_that_breaks_the_protocol_is_named(scorers, cls, message):
    backend = build_backend(PythonSpec(scorer=f"{scorers}:{cls}"))
    images, prompts = scene_batch(3)
    with pytest.raises(ScorerError, match=re.escape(f"{scorers}:{cls}.score ") + message):
        backend.score(list(images), prompts)


@pytest.mark.parametrize(
    "path, error",
    [
        ("no_such_package_here.rewards:Score", "cannot import no_such_package_here.rewards .*is its package installed"),
        ("{mod}:Missing", "{mod} has no class Missing"),
        ("{mod}:NoScore", "NoScore has neither score.* nor compare"),
        ("{mod}:Both", "Both has both score.* and compare"),
    ],
)
def test_a_scorer_that_cannot_be_loaded_says_why(scorers, path, error):
    with pytest.raises((ImportError, TypeError), match=error.format(mod=scorers)):
        build_backend(PythonSpec(scorer=path.format(mod=scorers)))


@pytest.mark.parametrize("path", ["module", "a.b", "a:b:c", "a b:C", "1a:B", "a:", ":B", "os.system('x'):A"])
def test_the_config_accepts_only_module_colon_class(path):
    with pytest.raises(ValueError, match="scorer must be module:Class"):
        PythonSpec(scorer=path)


def test_a_judge_class_serves_compare_and_its_protocol_is_checked(scorers):
    config = RewardServerConfig(
        models=[
            PythonSpec(scorer=f"{scorers}:RedderFirst"),
            PythonSpec(scorer=f"{scorers}:RedderFirst", name="broken", options={"out_of_range": True}),
        ]
    )
    images, prompts = scene_batch(3, seed=2)
    reds = images[..., 0].float().mean((1, 2)).tolist()
    with serve_in_background(create_app(config)) as url:
        client = RewardClient(url)
        client.wait_ready(120)
        judged = client.judge(images, prompts[0], "RedderFirst")
        assert [m["pairwise"] for m in client.models()] == [True, True]
        broken = httpx.post(
            f"{url}/v1/compare", json={"prompt": prompts[0], "images": [png_b64(i) for i in images], "judge": "broken"}
        )
    assert judged["winner"] == reds.index(max(reds))
    assert all(reds[w] > reds[lo] for w, lo in judged["pairs"]) and judged["inconsistent"] == 0
    assert broken.status_code == 500 and error_of(broken) == "internal"


def test_over_http_a_broken_scorer_fails_its_own_requests_and_a_bad_prompt_gets_422(scorers):
    config = RewardServerConfig(
        models=[PythonSpec(scorer=f"{scorers}:MeanRed"), PythonSpec(scorer=f"{scorers}:TooFew", name="broken")]
    )
    images, prompts = scene_batch(3)
    body = {"prompts": prompts, "images": [png_b64(i) for i in images]}
    with serve_in_background(create_app(config)) as url:
        RewardClient(url).wait_ready(120)
        ok = httpx.post(f"{url}/v1/score", json={**body, "models": ["MeanRed"]}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["scores"]["MeanRed"]) == 3
        broken = httpx.post(f"{url}/v1/score", json={**body, "models": ["broken"]}, timeout=60)
        assert broken.status_code == 500 and error_of(broken) == "internal"
        empty = httpx.post(f"{url}/v1/score", json={**body, "prompts": ["", *prompts[1:]]}, timeout=60)
        assert empty.status_code == 422 and "prompts[0] for MeanRed: the prompt is empty" in empty.text
        again = httpx.post(f"{url}/v1/score", json={**body, "models": ["MeanRed"]}, timeout=60)
        assert again.json()["scores"] == ok.json()["scores"]  # the server goes on serving


def colourfulness(images: torch.Tensor) -> np.ndarray:
    """Hasler and Süsstrunk's colourfulness, computed here independently of the example package."""
    x = images.double()
    rg, yb = x[..., 0] - x[..., 1], (x[..., 0] + x[..., 1]) / 2 - x[..., 2]
    spread = (rg.flatten(1).std(1, unbiased=False) ** 2 + yb.flatten(1).std(1, unbiased=False) ** 2).sqrt()
    return (spread + 0.3 * (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2).sqrt()).numpy()


@pytest.mark.slow
def test_the_example_package_installs_and_is_served_from_its_config(tmp_path):
    """pip installs examples/pso-example-scorer (offline, no build isolation) and `pso reward-server` serves
    both its scorers from the example config: scores, model info, metrics and a prompt it refuses."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    source = shutil.copytree(EXAMPLE, tmp_path / "source")  # the build writes beside the sources, not in the repo
    subprocess.run([*pip, str(source)], check=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"})
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    config = EXAMPLE / "reward-server.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pso.cli", "reward-server", "-c", str(config), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        client = RewardClient(url)
        client.wait_ready(120)
        images, prompts = scene_batch(6, seed=3)
        scored = client.score(images, prompts)
        assert scored.per_model["Colourfulness"] == pytest.approx(colourfulness(images) / 100, rel=1e-6)
        words = [p.split()[1] for p in prompts]  # "a red circle on ...": the foreground colour comes first
        assert all(0 < s < 1 for s in scored.per_model["colour-word"]), (words, scored.per_model)
        models = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert models["Colourfulness"]["kind"] == "python"
        assert models["Colourfulness"]["version"] == "pso_example_scorer:Colourfulness@hasler-susstrunk-2003"
        no_colour = httpx.post(f"{url}/v1/score", json={"prompts": ["a photo"], "images": [png_b64(images[0])]})
        assert no_colour.status_code == 422 and "names none of the colours" in no_colour.text
        assert metric(url, "pso_reward_images_scored_total", model="colour-word") == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    log.seek(0)
    assert code == 0, log.read()
