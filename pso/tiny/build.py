"""`pso tiny build`: train the built-in few-step model from nothing, on CPU, from one seed.

1. data: procedurally drawn scenes (pso/tiny/world.py) with their prompts;
2. a small VAE (32x32x3 <-> 4x8x8);
3. a teacher: text encoder + UNet, epsilon prediction, caption dropout, EMA;
4. teacher ODE pairs: noise -> latent by 25 Euler steps with CFG;
5. a student distilled from the teacher, initialised from it: its x0 at t = 999 regresses onto
   the teacher's ODE output from the same noise, and at the re-noised timesteps of its few-step
   sampler (749, 499, 249) onto the same target, so 1, 2 and 4 LCM steps all work;
6. evaluation of teacher and student with the tiny-world rewards, and the student saved as a
   diffusers StableDiffusionPipeline with an LCM scheduler (family "tiny").
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pso.config import StrictModel
from pso.samplers import EulerSampler
from pso.tiny.pipelines import SD_BETAS, sd_pipeline, text_config
from pso.tiny.rewards import crispness, fidelity, large
from pso.tiny.tokenizer import build_clip_tokenizer
from pso.tiny.world import draw_batch, random_scenes

log = logging.getLogger(__name__)
# v-prediction: x0 = alpha x_t - sigma v stays well conditioned at t = 999, where an epsilon model's
# x0 = (x_t - sigma eps) / alpha multiplies its errors by 1 / alpha = 14.6 (a tiny teacher then
# samples latents of twice the data's spread).
SCHEDULE = {**SD_BETAS, "prediction_type": "v_prediction"}
STUDENT_TIMESTEPS = (999, 749, 499, 249)


class BuildConfig(StrictModel):
    """Sizes and step counts of the build; `quick()` is a seconds-long version for tests."""

    seed: int = 0
    dataset_size: int = Field(16384, ge=64)
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    text_dim: int = 64
    unet_channels: tuple[int, int] = (32, 64)
    teacher_steps: int = 2000
    teacher_batch: int = 128
    teacher_lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    ode_pairs: int = 2048
    ode_steps: int = 25
    ode_guidance: float = 3.0
    student_steps: int = 600
    student_batch: int = 128
    student_lr: float = 2e-4
    eval_prompts: int = 256

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(
            seed=seed,
            dataset_size=256,
            vae_steps=20,
            vae_batch=32,
            text_dim=32,
            unet_channels=(32, 64),
            teacher_steps=20,
            teacher_batch=32,
            ode_pairs=64,
            ode_steps=4,
            student_steps=10,
            student_batch=32,
            eval_prompts=16,
        )


def _text_encoder(tokenizer: CLIPTokenizer, dim: int) -> CLIPTextModel:
    return CLIPTextModel(text_config(tokenizer, dim, 2 * dim))


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32,
        sample_size=32,
    )


def _unet(cfg: BuildConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> Tensor:
    """Token ids padded to `max_length` (default: the tokenizer's), as the pipelines tokenize."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with warm-up: early on the average follows the model, so the random init fades out."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_vae(cfg: BuildConfig, images: Tensor, gen: torch.Generator) -> AutoencoderKL:
    vae = _vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps, eta_min=cfg.vae_lr / 20)
    bar = tqdm(range(cfg.vae_steps), desc="VAE")
    for _ in bar:
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # L1 keeps edges and flat colours crisper than MSE alone
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(images[:1024] * 2 - 1).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: Tensor) -> Tensor:
    return (
        torch.cat([vae.encode(images[i : i + 512] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 512)])
        * vae.config.scaling_factor
    )


def train_teacher(
    cfg: BuildConfig, latents: Tensor, ids: Tensor, empty_ids: Tensor, text_encoder: CLIPTextModel, gen: torch.Generator
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    unet = _unet(cfg)
    noise_sched = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.teacher_steps, eta_min=cfg.teacher_lr / 10)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    bar = tqdm(range(cfg.teacher_steps), desc="teacher")
    for step in bar:
        idx = torch.randint(len(latents), (cfg.teacher_batch,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
        batch_ids = torch.where(drop[:, None], empty_ids, ids[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(1000, (len(idx),), generator=gen)
        x_t = noise_sched.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(batch_ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise_sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_unet, unet, cfg.ema_decay, step)
        ema_update(ema_text, text_encoder, cfg.ema_decay, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_unet.eval(), ema_text.eval()


@torch.no_grad()
def teacher_ode(
    unet: UNet2DConditionModel,
    cond: Tensor,
    uncond: Tensor,
    noise: Tensor,
    steps: int,
    guidance: float,
    batch: int = 256,
) -> Tensor:
    """Euler ODE (trailing timesteps) from VP noise x_999 = noise to x0, with classifier-free guidance."""
    sampler = EulerSampler(EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing"), steps)
    out = []
    for i in tqdm(range(0, len(noise), batch), desc=f"teacher ODE ({steps} steps)", leave=False):
        x = noise[i : i + batch] * (sampler.scheduler.sigmas[0] ** 2 + 1) ** 0.5
        c, u = cond[i : i + batch], uncond[:1].expand(len(x), -1, -1)
        for k in range(steps):
            step = torch.full((len(x),), k, dtype=torch.long)
            x_in = sampler.model_input(x, step)
            t = sampler.timesteps[step]
            eps_u, eps_c = unet(
                torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u, c])
            ).sample.chunk(2)
            x = sampler.step(x, eps_u + guidance * (eps_c - eps_u), step).mean
        out.append(x)
    return torch.cat(out)


def _x0_from_v(x_t: Tensor, v: Tensor, abar: Tensor) -> Tensor:
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v


def train_student(
    cfg: BuildConfig, teacher: UNet2DConditionModel, cond: Tensor, noise: Tensor, targets: Tensor, gen: torch.Generator
) -> UNet2DConditionModel:
    """x0 at t = 999 from the ODE's own noise, and at the re-noised sampler timesteps, onto the ODE output."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    abar_all = DDPMScheduler(**SCHEDULE).alphas_cumprod
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.student_steps, eta_min=cfg.student_lr / 10)
    renoise_t = torch.tensor(STUDENT_TIMESTEPS[1:])
    bar = tqdm(range(cfg.student_steps), desc="student")
    for _ in bar:
        idx = torch.randint(len(noise), (cfg.student_batch,), generator=gen)
        x0, c = targets[idx], cond[idx]
        t_r = renoise_t[torch.randint(len(renoise_t), (len(idx),), generator=gen)]
        t = torch.cat([torch.full((len(idx),), 999), t_r])
        abar = abar_all[t].view(-1, 1, 1, 1)
        fresh = torch.randn(x0.shape, generator=gen)
        x_t = torch.cat([noise[idx], abar[len(idx) :].sqrt() * x0 + (1 - abar[len(idx) :]).sqrt() * fresh])
        v = student(x_t, t, encoder_hidden_states=torch.cat([c, c])).sample
        loss = F.mse_loss(_x0_from_v(x_t, v, abar), torch.cat([x0, x0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.eval().requires_grad_(False)


@torch.no_grad()
def _decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def world_scores(images: Tensor, prompts: list[str]) -> dict[str, float]:
    fid = fidelity(images, prompts)
    return {
        "fidelity": float(fid.mean()),
        "accuracy": float((fid > 0.5).float().mean()),
        "large": float(large(images, prompts).mean()),
        "crispness": float(crispness(images).mean()),
    }


@torch.no_grad()
def evaluate_build(cfg: BuildConfig, vae, teacher, text_encoder, tokenizer, student_dir: Path) -> dict:
    """Scores of data, teacher (1 and many ODE steps) and the saved student (1, 2, 4 steps) on the same
    prompts and starting noise."""
    from pso.config.schema import ModelConfig
    from pso.policy import DistilledPolicy
    from pso.sampling import sample_groups

    rng = np.random.default_rng(cfg.seed + 1000)
    scenes = random_scenes(rng, cfg.eval_prompts)
    prompts = [s.prompt for s in scenes]
    ids = token_ids(tokenizer, prompts + [""])
    text = text_encoder(ids).last_hidden_state
    cond, uncond = text[:-1], text[-1:]
    noise = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(cfg.seed + 1000))
    report = {"data": world_scores(draw_batch(scenes, rng), prompts)}
    for steps in (1, cfg.ode_steps):
        latents = teacher_ode(teacher, cond, uncond, noise, steps, cfg.ode_guidance)
        report[f"teacher_{steps}_step"] = world_scores(_decode(vae, latents), prompts)
    for steps in (1, 2, 4):
        model = ModelConfig(family="tiny", pretrained=str(student_dir), num_steps=steps)
        policy = DistilledPolicy.from_config(model, finetune=None)
        traj = sample_groups(policy, prompts, 1, cfg.seed + 1000, batch_size=256)
        report[f"student_{steps}_step"] = world_scores(traj.images, prompts)
    return report


def build_tiny_model(out_dir: Path, cfg: BuildConfig) -> dict:
    """Run every stage; writes out_dir/{student,teacher}/ (diffusers folders) and out_dir/report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    scenes = random_scenes(rng, cfg.dataset_size)
    images = draw_batch(scenes, rng)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    ids = token_ids(tokenizer, [s.prompt for s in scenes])
    empty_ids = token_ids(tokenizer, [""])

    vae = train_vae(cfg, images, gen)
    latents = encode_images(vae, images)
    timings["vae"] = time.perf_counter() - start

    teacher, text_encoder = train_teacher(cfg, latents, ids, empty_ids, _text_encoder(tokenizer, cfg.text_dim), gen)
    timings["teacher"] = time.perf_counter() - start - sum(timings.values())

    with torch.no_grad():
        pair_ids = ids[torch.randint(len(ids), (cfg.ode_pairs,), generator=gen)]
        cond = torch.cat([text_encoder(pair_ids[i : i + 512]).last_hidden_state for i in range(0, len(pair_ids), 512)])
        uncond = text_encoder(empty_ids).last_hidden_state
    noise = torch.randn((cfg.ode_pairs, 4, 8, 8), generator=gen)
    targets = teacher_ode(teacher, cond, uncond, noise, cfg.ode_steps, cfg.ode_guidance)
    timings["ode_pairs"] = time.perf_counter() - start - sum(timings.values())

    student = train_student(cfg, teacher, cond, noise, targets, gen)
    timings["student"] = time.perf_counter() - start - sum(timings.values())

    lcm = LCMScheduler(**SCHEDULE, timestep_spacing="leading", original_inference_steps=50, clip_sample=False)
    sd_pipeline(vae, text_encoder, tokenizer, student, lcm).save_pretrained(out_dir / "student")
    euler = EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing")
    sd_pipeline(vae, text_encoder, tokenizer, teacher, euler).save_pretrained(out_dir / "teacher")
    report = {
        "config": cfg.model_dump(mode="json"),
        "scores": evaluate_build(cfg, vae, teacher, text_encoder, tokenizer, out_dir / "student"),
    }
    timings["evaluate"] = time.perf_counter() - start - sum(timings.values())
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - start, 1)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
