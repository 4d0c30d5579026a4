"""The learner's DeepSpeed engine on CPU: parity with `pso.loop.update_on_pairs`, ZeRO stages 0-3,
bf16, gradient accumulation, pair weights, weight export, checkpoints, and (slow) two data-parallel
ranks under the `deepspeed` launcher.

Run as a script, this file is one rank of the two-rank test (see `_rank_main`).
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import: these tests run on CPU

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from learner.engine import LearnerEngine, MicroBatch, deepspeed_config, weighted_loss  # noqa: E402
from pso.codecs import decode_weights, encode_weights  # noqa: E402
from pso.config.schema import (  # noqa: E402
    LoraFinetune,
    ModelConfig,
    OfflinePSOLoss,
    OnlinePSOLoss,
    OptimConfig,
    PSOConfig,
)
from pso.config.services import LearnerConfig  # noqa: E402
from pso.export import locate_weights  # noqa: E402
from pso.loop import make_optimizer, update_on_pairs  # noqa: E402
from pso.net import free_port  # noqa: E402
from pso.objectives import PairBatch, compute_loss  # noqa: E402
from pso.policy import DistilledPolicy  # noqa: E402
from pso.sampling import sample_groups  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green dot", "a yellow star"]
# The default lr (1e-5) and a gentle beta: ZeRO, gradient accumulation and DeepSpeed's clipping
# round differently in the last bit, and Adam turns that into lr-sized noise on weights whose
# gradient is near zero; a larger lr or beta only scales that noise up.
LOSS = OnlinePSOLoss(beta=5.0)
OPTIM = OptimConfig(lr=1e-5, pairs_per_step=2)


def make_batch(policy: DistilledPolicy, prompts: list[str], seed: int = 0) -> PairBatch:
    """One pair per prompt group of two, winners alternating between the group's samples."""
    traj = sample_groups(policy, prompts, 2, seed=seed, decode=False)
    pairs = [(2 * i, 2 * i + 1) if i % 2 == 0 else (2 * i + 1, 2 * i) for i in range(len(prompts))]
    return PairBatch.from_trajectories(traj, pairs, policy.encode(prompts))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def relative_distance(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], init: dict[str, torch.Tensor]):
    """||got - want|| / ||want - init||: how far apart two runs ended, relative to how far they moved.

    Where two runs sum in a different order (ZeRO-3's flat buffers, accumulation over micro-batches),
    the max-abs difference is no measure: weights with no true gradient (e.g. shifting every key of
    an attention, which softmax ignores) get pure rounding noise, and Adam scales that to lr-sized
    steps of either sign. They are few, so the distance over all weights stays small.
    """

    def norm(x, y):
        return sum(float(((x[k].float() - y[k].float()) ** 2).sum()) for k in x) ** 0.5

    return norm(got, want) / norm(want, init)


@pytest.fixture
def policy(make_policy):
    """A factory of identical tiny LoRA policies (2-step LCM sampler: one stochastic transition)."""
    return lambda **kw: make_policy("tiny", num_steps=2, **kw)


@pytest.fixture
def batch(policy):
    return make_batch(policy(), PROMPTS[:3])


def reference_run(policy, batch, updates=3, loss=LOSS, optim=OPTIM):
    """The plain PyTorch loop: update_on_pairs with torch AdamW, gen seeded per update."""
    cfg = PSOConfig(loss=loss, optim=optim)
    optimizer = make_optimizer(policy, cfg)
    metrics = [update_on_pairs(policy, optimizer, batch, cfg, torch.Generator().manual_seed(u)) for u in range(updates)]
    return policy.trainable_state_dict(), metrics


def engine_run(engine, batch, updates=3, first=0):
    return [engine.update(batch, gen=torch.Generator().manual_seed(u)) for u in range(first, first + updates)]


def test_deepspeed_config_maps_the_sections():
    cfg = deepspeed_config(
        LearnerConfig(zero_stage=2, precision="bf16", gradient_accumulation_steps=3),
        OptimConfig(lr=3e-5, weight_decay=0.01, max_grad_norm=0.5, pairs_per_step=4),
    )
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 3)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 3e-5 and cfg["optimizer"]["params"]["weight_decay"] == 0.01
    assert deepspeed_config(LearnerConfig(precision="fp16"), OptimConfig())["fp16"]["loss_scale"] == 0  # dynamic


@pytest.mark.parametrize("loss", [LOSS, OfflinePSOLoss(beta=100.0)], ids=["online-pso", "offline-pso"])
def test_stage_0_fp32_matches_the_plain_pytorch_loop(policy, batch, loss):
    """Same batches, same gen seeds: 3 updates of 2 optimiser steps each (the last micro-batch has 1 pair)."""
    want, want_metrics = reference_run(policy(), batch, loss=loss)
    engine = LearnerEngine(policy(), loss, OPTIM, LearnerConfig())
    got_metrics = engine_run(engine, batch)
    assert max_diff(engine.trainable_state_dict(), want) <= 1e-6
    for got, ref in zip(got_metrics, want_metrics):
        assert got["steps"] == 2 and got["lr"] == OPTIM.lr
        for key, value in ref.items():  # loss, margin, accuracy, ..., grad_norm
            # DeepSpeed clips with its own norm (sum of squares, not torch's norm of norms): the
            # clip factor differs in the last bit, and the loss amplifies that a little per step
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_the_plain_pytorch_loop(policy, batch, stage):
    """And export complete weights (ZeRO-3 gathers its partitions) and leave the reference model alone."""
    want, want_metrics = reference_run(policy(), batch)
    pol = policy()
    engine = LearnerEngine(pol, LOSS, OPTIM, LearnerConfig(zero_stage=stage))
    x, step, cond = batch.winner_states[:, 0], torch.zeros(len(batch), dtype=torch.long), batch.cond
    reference_before = pol.predict(x, step, cond, reference=True)
    init = engine.trainable_state_dict()
    got_metrics = engine_run(engine, batch)
    got = engine.trainable_state_dict()
    assert max_diff(got, want) <= 1e-6  # measured: 3.8e-8 (ZeRO-1, ZeRO-2), 1.1e-7 (ZeRO-3)
    assert relative_distance(got, want, init) <= 1e-3  # 3.2e-5, 3.2e-5, 1.2e-4
    assert [m["grad_norm"] for m in got_metrics] == pytest.approx([m["grad_norm"] for m in want_metrics], rel=1e-4)
    actor = policy()
    actor.load_weights(decode_weights(encode_weights(engine.export_weights(3)), expected=engine.weight_spec()))
    assert max_diff(actor.trainable_state_dict(), got) == 0
    assert torch.equal(pol.predict(x, step, cond, reference=True), reference_before)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_reference_model_never_changes(policy, batch, mode):
    pol = policy(mode=mode)
    engine = LearnerEngine(pol, LOSS, OPTIM, LearnerConfig())
    x, step, cond = batch.winner_states[:, 0], torch.zeros(len(batch), dtype=torch.long), batch.cond
    reference_before = pol.predict(x, step, cond, reference=True)
    trained_before = engine.trainable_state_dict()
    frozen = pol._reference_backbone if mode == "full" else pol.backbone  # the reference copy / the LoRA base weights
    frozen_before = {n: p.detach().clone() for n, p in frozen.named_parameters() if not p.requires_grad}
    engine_run(engine, batch, updates=2)
    assert torch.equal(pol.predict(x, step, cond, reference=True), reference_before)
    assert max_diff(engine.trainable_state_dict(), trained_before) > 0  # the policy did train
    assert frozen_before and all(
        torch.equal(p, frozen_before[n]) for n, p in frozen.named_parameters() if not p.requires_grad
    )


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_trains_on_cpu_and_exports_float32_adapters(policy, stage):
    pol = policy(dtype="bfloat16")
    batch = make_batch(pol, PROMPTS[:3])
    engine = LearnerEngine(pol, LOSS, OPTIM, LearnerConfig(zero_stage=stage, precision="bf16"))
    before = engine.trainable_state_dict()
    metrics = engine_run(engine, batch, updates=2)
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in metrics)
    bundle = engine.export_weights(1)
    actor = policy(dtype="bfloat16")  # an actor's policy: float32 adapters in a bfloat16 UNet
    assert {t.dtype for t in bundle.tensors.values()} == {torch.float32}
    actor.load_weights(decode_weights(encode_weights(bundle), expected=actor.weight_spec()))
    assert max_diff(bundle.tensors, before) > 0


def test_precision_must_match_the_model_dtype(policy):
    with pytest.raises(ValueError, match="set model.dtype bfloat16"):
        LearnerEngine(policy(), LOSS, OPTIM, LearnerConfig(precision="bf16"))
    with pytest.raises(ValueError, match="use precision bf16"):
        LearnerEngine(policy(mode="full", dtype="bfloat16"), LOSS, OPTIM, LearnerConfig(precision="fp32"))


def test_fp16_needs_an_accelerator_that_supports_it(policy):
    """DeepSpeed's CPU accelerator supports fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX)."""
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU runs fp16")
    with pytest.raises(ValueError, match="Type fp16 is not supported on your device"):
        LearnerEngine(policy(dtype="float16"), LOSS, OPTIM, LearnerConfig(precision="fp16"))


def test_gradient_accumulation_steps_over_micro_batches(policy, batch):
    """2 micro-batches of 1 pair per step = 1 micro-batch of 2 pairs; the odd last pair is a step of its own."""
    want, _ = reference_run(policy(), batch, updates=2)
    engine = LearnerEngine(
        policy(), LOSS, OPTIM.model_copy(update={"pairs_per_step": 1}), LearnerConfig(gradient_accumulation_steps=2)
    )
    init = engine.trainable_state_dict()
    metrics = engine_run(engine, batch, updates=2)
    assert [m["steps"] for m in metrics] == [2, 2]
    got = engine.trainable_state_dict()
    assert relative_distance(got, want, init) <= 1e-2  # measured 6.5e-4 (max |diff| 1.5e-6, lr 1e-5)


def test_weighted_loss_is_the_mean_of_weighted_pair_losses(policy, batch):
    pol = policy()
    weights = [1.0, 0.25, 0.0]

    def grads(loss):
        params = pol.trainable_parameters()
        return torch.autograd.grad(loss, params)

    per_pair = [compute_loss(pol, LOSS, batch[i : i + 1], torch.Generator()).loss for i in range(len(batch))]
    want = grads(sum(w * loss for w, loss in zip(weights, per_pair)) / len(batch))
    micro = MicroBatch([(batch[0:1], 1.0), (batch[1:2], 0.25), (batch[2:3], 0.0)], pairs=len(batch))
    loss, metrics = weighted_loss(pol, LOSS, micro, torch.Generator())
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-8) for g, w in zip(grads(loss), want))
    assert metrics["loss"] == pytest.approx((per_pair[0].item() + per_pair[1].item()) / 2)  # pairs with weight > 0


def test_all_ones_weights_are_the_unweighted_update(policy, batch):
    plain = LearnerEngine(policy(), LOSS, OPTIM, LearnerConfig())
    weighted = LearnerEngine(policy(), LOSS, OPTIM, LearnerConfig())
    assert engine_run(plain, batch, updates=2) == [
        weighted.update(batch, torch.ones(len(batch)), gen=torch.Generator().manual_seed(u)) for u in range(2)
    ]
    assert max_diff(plain.trainable_state_dict(), weighted.trainable_state_dict()) == 0
    with pytest.raises(ValueError, match="finite values >= 0"):
        weighted.update(batch, torch.tensor([1.0, -1.0, 1.0]), gen=torch.Generator())


def test_exported_weights_are_the_policys_bundle(policy, batch):
    pol = policy()
    engine = LearnerEngine(pol, LOSS, OPTIM, LearnerConfig())
    engine_run(engine, batch, updates=1)
    bundle, want = engine.export_weights(7), pol.export_weights(7)
    assert (bundle.version, bundle.kind, bundle.base_model, bundle.metadata) == (
        want.version,
        want.kind,
        want.base_model,
        want.metadata,
    )
    assert max_diff(bundle.tensors, want.tensors) == 0 and engine.weight_spec() == policy().weight_spec()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resuming_a_checkpoint_gives_bit_identical_updates(policy, batch, tmp_path, stage):
    learner = LearnerConfig(zero_stage=stage)
    first = LearnerEngine(policy(), LOSS, OPTIM, learner)
    assert first.load_checkpoint(tmp_path / "ckpt") is None  # nothing there yet
    engine_run(first, batch, updates=2)
    saved = first.trainable_state_dict()
    bundle = encode_weights(first.export_weights(2))
    first.save_checkpoint(tmp_path / "ckpt", {"version": 2, "pairs_seen": 6}, {"covered": ["1-0"]}, bundle)
    # the checkpoint holds its weights as a bundle too, which pso export reads (no unpickling)
    assert max_diff(decode_weights(locate_weights(tmp_path / "ckpt").read_bytes()).tensors, saved) == 0
    want_metrics = engine_run(first, batch, updates=2, first=2)  # the uninterrupted run goes on
    first.save_checkpoint(tmp_path / "later", {}, {}, bundle)
    (tmp_path / "later" / "latest").unlink()  # killed before naming it: as if never saved
    assert first.load_checkpoint(tmp_path / "later") is None

    resumed = LearnerEngine(policy(), LOSS, OPTIM, learner)
    client_state, ranks = resumed.load_checkpoint(tmp_path / "ckpt")
    assert {k: client_state[k] for k in ("version", "pairs_seen")} == {"version": 2, "pairs_seen": 6}
    assert ranks == [{"covered": ["1-0"]}]
    assert engine_run(resumed, batch, updates=2, first=2) == want_metrics
    assert max_diff(resumed.trainable_state_dict(), first.trainable_state_dict()) == 0


# ----- two data-parallel ranks (slow) -----
STAGES_2_RANKS = (0, 2, 3)


@pytest.mark.slow
def test_two_cpu_ranks_average_their_gradients(tiny_models, tmp_path):
    """`deepspeed --num_gpus 2` on CPU (gloo): ranks update on different pairs (rank 1 has fewer, and
    weights), end with identical weights, and match one process averaging the two ranks' losses."""
    # (without the world-size-1 variables an in-process engine of another test left in os.environ)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank"]
    cmd += ["--master_port", str(free_port()), __file__, str(tiny_models["sd"]), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # ~25 s on two idle cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for stage in STAGES_2_RANKS:
        assert results[0][str(stage)]["weights"] == results[1][str(stage)]["weights"], f"stage {stage}"
        # relative distance (see relative_distance); measured 3.5e-5 (ZeRO-0), 0 (ZeRO-2), 2.8e-4 (ZeRO-3)
        assert results[0][str(stage)]["vs_single_process"] <= 1e-3, f"stage {stage}"


def _rank_main(model_dir: str, out_dir: str) -> None:
    """One rank: 2 updates per ZeRO stage on this rank's pairs, then its weights and (rank 0) the
    distance to a single-process run that averages both ranks' micro-batch losses."""
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def make():
        return DistilledPolicy.from_config(
            ModelConfig(family="tiny", pretrained=model_dir, num_steps=2), LoraFinetune(rank=4)
        )

    sampler = make()
    batches = [make_batch(sampler, PROMPTS[:3], seed=1), make_batch(sampler, PROMPTS[2:], seed=2)]
    weights = [None, torch.tensor([1.0, 0.5])]  # rank 1: one micro-batch (padded) with two weight groups
    init = make().trainable_state_dict()
    want = _averaged_ranks_reference(make(), batches, weights) if rank == 0 else None
    results = {}
    for stage in STAGES_2_RANKS:
        engine = LearnerEngine(make(), LOSS, OPTIM, LearnerConfig(zero_stage=stage))
        for u in range(2):
            engine.update(batches[rank], weights[rank], gen=torch.Generator().manual_seed(u))
        got = engine.trainable_state_dict()
        results[stage] = {
            "weights": torch.cat([t.flatten() for t in got.values()]).tolist(),
            "vs_single_process": None if want is None else relative_distance(got, want, init),
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    assert world == 2


def _averaged_ranks_reference(policy, batches, weights) -> dict[str, torch.Tensor]:
    """Plain PyTorch: per step, the mean over ranks of each rank's micro-batch loss (a rank out of pairs adds 0)."""
    optimizer = make_optimizer(policy, PSOConfig(optim=OPTIM))
    m = OPTIM.pairs_per_step
    steps = max((len(b) + m - 1) // m for b in batches)
    for _ in range(2):
        for i in range(steps):
            loss = torch.zeros(())
            for batch, w in zip(batches, weights):
                micro = batch[i * m : (i + 1) * m]
                if len(micro) == 0:
                    continue
                if w is None:  # as update_on_pairs
                    loss = loss + compute_loss(policy, LOSS, micro, torch.Generator()).loss / len(batches)
                    continue
                ws = w[i * m : (i + 1) * m]  # the weighted mean, pair by pair
                for j, wj in enumerate(ws):
                    pair_loss = compute_loss(policy, LOSS, micro[j : j + 1], torch.Generator()).loss
                    loss = loss + wj * pair_loss / len(micro) / len(batches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), OPTIM.max_grad_norm)
            optimizer.step()
    return policy.trainable_state_dict()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:3])


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_engines_policy_samples_and_saves_the_trained_weights_under_any_zero_stage(policy, tmp_path, stage, mode):
    """What the learner's grids and exports rely on: its own policy samples with the newest weights (under
    ZeRO-3 each forward gathers them), and inside `gathered_weights` the UNet is whole to be saved."""
    from diffusers import UNet2DConditionModel

    engine = LearnerEngine(policy(mode=mode), LOSS, OPTIM, LearnerConfig(zero_stage=stage))
    engine_run(engine, make_batch(engine.policy, PROMPTS[:2]), updates=2)
    trained = engine.trainable_state_dict()
    plain = policy(mode=mode)
    plain.load_trainable_state_dict(trained)
    got = sample_groups(engine.policy, PROMPTS, 1, seed=3).images
    torch.testing.assert_close(got, sample_groups(plain, PROMPTS, 1, seed=3).images)
    if mode == "full":
        with engine.gathered_weights():
            engine.policy.backbone.save_pretrained(tmp_path / "unet")
        saved = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
        assert max_diff({k: saved[k] for k in trained}, trained) == 0


def test_deepspeeds_gradient_reduction_waits_no_longer_than_collective_timeout_s(policy):
    """A rank hung inside an update must fail the others after learner.collective_timeout_s, like one hung
    between updates: DeepSpeed's gradient all-reduce runs on its own group, not the default one."""
    from datetime import timedelta

    from deepspeed.utils import groups

    engine = LearnerEngine(policy(), LOSS, OPTIM, LearnerConfig(collective_timeout_s=123))
    group = engine.engine.seq_data_parallel_group
    assert group is groups._get_data_parallel_group()
    assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=123)
