"""Offline preference training (pso/offline.py, learner/offline.py): preference pairs from a Pick-a-Pic-layout
data set, no actors. The pairs are the tiny world's own (pso/tiny/tasks.py), a few dozen of them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pso.config import load_config
from pso.config.schema import PSOConfig
from pso.offline import (
    PairLatentCache,
    PreferenceReader,
    latent_cache,
    open_stream,
    pair_batch_from_pairs,
    run_offline_loop,
)
from pso.policy import DistilledPolicy
from pso.preference_data import PreferencePair
from pso.targets import encode_images
from pso.tiny.tasks import preference_pairs, write_preference_parquet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """40 tiny-world preference pairs (a few are ties) in one parquet file."""
    return write_preference_parquet(tmp_path_factory.mktemp("prefs") / "train.parquet", preference_pairs(40, seed=3))


def config(source, **preferences) -> PSOConfig:
    return PSOConfig.model_validate(
        {
            "model": {"family": "tiny", "pretrained": "builtin:tiny", "num_steps": 4},
            "finetune": {"mode": "lora", "rank": 4},
            "loss": {"name": "offline-pso", "beta": 2000.0},
            "optim": {"lr": 1e-3, "pairs_per_step": 4},
            "preferences": {"source": str(source), **preferences},
        }
    )


def policy_for(cfg: PSOConfig) -> DistilledPolicy:
    return DistilledPolicy.from_config(cfg.model, cfg.finetune)


def stream(cfg: PSOConfig, start: int = 0, rank: int = 0, world_size: int = 1):
    return open_stream(cfg.preferences, rank=rank, world_size=world_size, image_size=32, start=start)


def test_preference_pairs_become_a_pair_batch_of_final_latents_encoded_once(tmp_path):
    cfg = config("unused")
    policy = policy_for(cfg)
    gen = torch.Generator().manual_seed(0)
    pairs = [
        PreferencePair(i, caption, torch.rand(3, 32, 32, generator=gen), torch.rand(3, 32, 32, generator=gen))
        for i, caption in enumerate(["b caption", "a caption", "b caption"])
    ]
    batch = pair_batch_from_pairs(policy, pairs)
    assert len(batch) == 3 and batch.winner_states.shape == (3, 1, *policy.latent_shape)
    assert batch.loser_states.shape == batch.winner_states.shape and batch.winner_states.dtype == policy.dtype
    want_w = encode_images(policy, [torch.stack([p.winner for p in pairs])])
    want_l = encode_images(policy, [torch.stack([p.loser for p in pairs])])
    torch.testing.assert_close(batch.winner_states[:, 0], want_w)
    torch.testing.assert_close(batch.loser_states[:, 0], want_l)
    # each pair's own caption: rows 0 and 2 share theirs
    emb = batch.cond.batched["encoder_hidden_states"]
    assert torch.equal(emb[0], emb[2]) and not torch.equal(emb[0], emb[1])
    torch.testing.assert_close(emb[1], policy.encode(["a caption"]).batched["encoder_hidden_states"][0])

    cache = PairLatentCache(tmp_path, "k" * 64, rank=0, latent_shape=policy.latent_shape, block=2)
    first = pair_batch_from_pairs(policy, pairs, cache)
    cache.flush()
    assert cache.misses == 3 and sorted(p.name for p in cache.directory.iterdir()) == [
        "block0000000.safetensors",
        "block0000001.safetensors",
    ]
    again = PairLatentCache(tmp_path, "k" * 64, rank=0, latent_shape=policy.latent_shape, block=2)
    blank = [p._replace(winner=torch.zeros(3, 32, 32), loser=torch.zeros(3, 32, 32)) for p in pairs]
    cached = pair_batch_from_pairs(policy, blank, again)  # from the files: the images are not looked at
    assert again.hits == 3 and again.misses == 0
    assert torch.equal(cached.winner_states, first.winner_states)
    assert torch.equal(cached.loser_states, first.loser_states)
    other = PairLatentCache(tmp_path, "x" * 64, rank=0, latent_shape=policy.latent_shape, block=2)
    assert other.lookup([0, 1, 2]) == {}  # another key (data, VAE): its own folder
    with pytest.raises(ValueError, match="the model samples 32 px"):
        pair_batch_from_pairs(policy, [PreferencePair(0, "c", torch.rand(3, 16, 16), torch.rand(3, 16, 16))])


def test_the_reader_goes_through_epochs_and_resumes_at_the_next_pair(pairs_file):
    cfg = config(pairs_file)
    every = [p.index for p in stream(cfg)]
    assert 30 <= len(every) < 40  # the ties are skipped
    reader = PreferenceReader(stream(cfg), epochs=2, max_pairs=10)
    first = reader.take(7)
    saved = reader.state()
    assert [p.index for p in first] == every[:7] and saved.position == every[6] + 1 and saved.pairs == 7
    rest = reader.take(100)
    assert [p.index for p in rest] == every[7:10] + every[:10] and reader.exhausted
    # a reader made from the saved state hands out what followed, the second epoch included
    resumed = PreferenceReader(stream(cfg), epochs=2, max_pairs=10, state=saved)
    assert [p.index for p in resumed.take(100)] == [p.index for p in rest]
    started = PreferenceReader(stream(cfg, start=saved.position))  # or a stream's own start, no state
    assert [p.index for p in started.take(3)] == every[7:10]
    with pytest.raises(ValueError, match="shard of 1 ranks, this learner has 2"):
        PreferenceReader(stream(cfg, rank=1, world_size=2), state=saved)


def test_the_offline_loop_trains_and_is_reproducible(pairs_file):
    cfg = config(pairs_file)
    runs = []
    for _ in range(2):
        policy = policy_for(cfg)
        before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        steps = run_offline_loop(policy, cfg, stream(cfg), steps=3, progress=False)
        after = policy.trainable_state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        runs.append((steps, after))
    (a, wa), (b, wb) = runs
    assert [s.step for s in a] == [0, 1, 2] and all(s.pairs == 4 for s in a)
    assert [s.metrics for s in a] == [s.metrics for s in b] and all(s.metrics["loss"] > 0 for s in a)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # without a step limit it runs until the data is used up: whole batches of the one epoch only
    everything = run_offline_loop(policy_for(cfg), cfg, stream(cfg), progress=False)
    assert len(everything) == sum(1 for _ in stream(cfg)) // 4


def test_preferences_need_an_offline_loss_and_no_targets():
    with pytest.raises(ValueError, match="preferences .* train with loss offline-pso or diffusion-dpo, not online-pso"):
        PSOConfig.model_validate({"preferences": {"source": "d.parquet"}})
    with pytest.raises(ValueError, match="preferences .* and targets .* are two kinds of run"):
        PSOConfig.model_validate(
            {"preferences": {"source": "d"}, "targets": {"source": "t"}, "loss": {"name": "offline-pso"}}
        )
    with pytest.raises(ValueError, match="epochs"):
        PSOConfig.model_validate({"preferences": {"source": "d", "epochs": 0}, "loss": {"name": "offline-pso"}})
    ok = PSOConfig.model_validate({"preferences": {"source": "d"}, "loss": {"name": "diffusion-dpo"}})
    assert ok.preferences.cache_latents and ok.preferences.epochs == 1
    shipped = load_config(PSOConfig, ROOT / "configs" / "tiny-offline.yaml")
    assert shipped.preferences.source == "builtin:tiny-offline" and shipped.loss.name == "offline-pso"


class RecordingLearner:
    """The offline learner, remembering the pair indices of every update (the pairs' own, as read)."""

    @staticmethod
    def make(cfg: PSOConfig):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from learner.engine import LearnerEngine
        from learner.offline import OfflineLearner
        from pso.transport.memory import MemoryWeightStore

        class Recording(OfflineLearner):
            def _take(self):
                out = super()._take()
                self.taken.append([(self.reader.epoch, p.index) for p in out[2]])
                return out

        learner = Recording(cfg, LearnerEngine(policy_for(cfg), cfg.loss, cfg.optim, cfg.learner), MemoryWeightStore())
        learner.taken = []
        return learner


def test_a_resumed_offline_learner_continues_at_the_pair_after_its_checkpoint_and_stops_when_the_data_ends(
    pairs_file, tmp_path
):
    cfg = config(pairs_file, epochs=2, max_pairs=12)
    run = tmp_path / "learner"
    cfg.learner = cfg.learner.model_copy(
        update={
            "run_dir": run, "checkpoint_dir": run / "checkpoints", "metrics_file": run / "metrics.jsonl",
            "max_updates": 2, "grid_every": None,
        }
    )  # fmt: skip
    every = [p.index for p in stream(cfg)][:12]
    first = RecordingLearner.make(cfg)
    state = first.run()
    assert state.updates == 2 and not state.data_exhausted
    assert [i for batch in first.taken for _, i in batch] == every[:8]
    assert (run / "checkpoints" / "latest").is_file()

    cfg.learner = cfg.learner.model_copy(update={"max_updates": None})
    second = RecordingLearner.make(cfg)
    assert second.resume()
    state = second.run()
    # the rest of epoch 1 (its next pair is the one after the last trained), then epoch 2, then the data ends
    assert [i for _, i in second.taken[0]] == every[8:12]
    assert [i for batch in second.taken[1:] for _, i in batch] == every
    assert state.updates == 6 and state.data_exhausted and state.trained_pairs == 24
    rows = [r for r in state.history]
    assert [r["updates"] for r in rows] == [3, 4, 5, 6] and rows[-1]["epoch"] == 1
    assert rows[0]["latents_cached"] == 0 and rows[-1]["latents_cached"] == 12  # epoch 2 is not encoded again
    cached = latent_cache(cfg.preferences, second.engine.policy, run / "preference-latents", 0, 1)
    assert set(cached.lookup(every)) == set(every)
    # the checkpoint of the exhausted run: a learner resumed from it trains nothing more and says so
    third = RecordingLearner.make(cfg)
    assert third.resume() and third.run().data_exhausted and third.taken == []


@pytest.mark.slow
def test_pso_up_trains_offline_without_actors_and_leaves_the_same_pictures(tmp_path):
    updates, run_dir = 4, tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "pso.cli", "up", "-c", str(ROOT / "configs" / "tiny-offline.yaml"),
         "--updates", str(updates), "--out", str(run_dir), "--set", "up.eval_prompts=8"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"weights version {updates} against the base model on 8 prompts" in run.stdout, run.stdout
    assert f"preferences: {updates * 8} pairs of builtin:tiny-offline trained in {updates} updates" in run.stdout
    assert not list((run_dir / "logs").glob("actor-*.log"))  # no actors
    for picture in ("reward_curve.png", "versions.png", "before_after.png"):
        assert (run_dir / picture).stat().st_size > 0, picture
    learner = run_dir / "learner"
    assert {int(p.stem[1:]) for p in (learner / "grids").glob("v*.png")} == {0, updates}
    assert (learner / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "lora" / "README.md").is_file() and list((learner / "preference-latents").rglob("*.safetensors"))


def test_an_actor_refuses_an_offline_configuration(capsys):
    """Its records would pile up in Redis, read by nobody: it says to run no actors, before any connection."""
    from pso.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-offline.yaml"
    assert main(["actor", "-c", str(config)]) == 2
    assert "trains offline on builtin:tiny-offline" in capsys.readouterr().err
