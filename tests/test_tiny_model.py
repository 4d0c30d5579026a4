"""The shipped tiny students (UNet `builtin:tiny`, flow-matching `builtin:tiny-flow`): load offline, are faithful
at 1 step, and online PSO moves them."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pso.config.schema import ModelConfig
from pso.demo import demo_config
from pso.evaluation import score_model
from pso.loop import run_local_loop
from pso.policy import DistilledPolicy
from pso.tiny.rewards import fidelity, large
from pso.tiny.world import random_scenes

DOC = Path(__file__).parents[1] / "docs" / "tiny-model.md"


# family -> (the shipped model, the phrase docs/tiny-model.md states its threshold with, its online noise level,
# online rounds: the flow student moves more slowly per round, docs/results.md)
MODELS = {
    "tiny": ("builtin:tiny", "Test threshold", None, 30),
    "tiny-flow": ("builtin:tiny-flow", "Flow test threshold", 0.7, 80),
}


def documented_threshold(family: str) -> float:
    phrase = MODELS[family][1]
    m = re.search(rf"(?m)^{phrase}: 1-step fidelity >= ([0-9.]+)", DOC.read_text())
    assert m, f"{DOC} must state the {phrase.lower()}"
    return float(m[1])


def eval_prompts(n=128, seed=11):
    return [s.prompt for s in random_scenes(np.random.default_rng(seed), n)]


@pytest.mark.parametrize("family", MODELS)
def test_shipped_student_is_faithful_at_one_step(family):
    model = ModelConfig(family=family, pretrained=MODELS[family][0], num_steps=1)
    policy = DistilledPolicy.from_config(model, None)
    prompts = eval_prompts()
    scores, images = score_model(policy, prompts, {"fidelity": fidelity}, seed=11, batch_size=128)
    assert images.shape == (128, 3, 32, 32)
    assert float(scores["fidelity"].mean()) >= documented_threshold(family)
    # the prompt matters: the same images scored against other prompts fail
    shifted = fidelity(images, prompts[1:] + prompts[:1])
    assert float(shifted.mean()) < 0.5 * float(scores["fidelity"].mean())


@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_short_online_pso_run_raises_the_target_beyond_noise(family, request):
    prompts = eval_prompts(64, seed=7)
    gains = []
    pretrained, _, eta, rounds = MODELS[family]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models' small kernels run faster on one thread than on two
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for seed in (0, 1, 2):
        cfg = demo_config(rounds=rounds)
        cfg.model = cfg.model.model_copy(update={"family": family, "pretrained": pretrained, "eta": eta})
        cfg.sampling.seed, cfg.finetune.init_seed = seed, seed
        policy = DistilledPolicy.from_config(cfg.model, cfg.finetune)
        run_local_loop(policy, cfg, large, progress=False)
        tuned, _ = score_model(policy, prompts, {"large": large}, seed=7)
        base, _ = score_model(policy, prompts, {"large": large}, seed=7, reference=True)
        gains.append(float(tuned["large"].mean() - base["large"].mean()))
    # every training seed gains, and the mean gain is well outside the spread between seeds
    assert min(gains) > 0, gains
    assert np.mean(gains) > 3 * np.std(gains), gains
