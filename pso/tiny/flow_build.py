"""`pso tiny build --flow`: the built-in few-step flow-matching model, trained on CPU from one seed.

The flow counterpart of pso/tiny/build.py, in FLUX.1's format (FluxPipeline, family "tiny-flow"), on the
same tiny world and with the UNet world's trained VAE and CLIP text encoder (frozen: CLIP gives FLUX its
pooled text vector):

1. data: the tiny world's scenes and prompts (pso/tiny/world.py), encoded by the shipped VAE;
2. a rectified-flow teacher: a FLUX transformer and a T5 encoder trained together on
   x_s = (1 - s) x0 + s z with velocity target z - x0, s logit-normal as SD3 and FLUX train, caption dropout, EMA;
3. teacher ODE pairs: noise -> latent by Euler steps with classifier-free guidance;
4. a student distilled from the teacher, initialised from it: its clean estimate x0 = x - s v at s = 1 from the
   ODE's own noise regresses onto the ODE output, and at the re-noised sigmas of its few-step sampler (0.75,
   0.5, 0.25) onto the same target, so 1, 2 and 4 flow-Euler steps (FLUX.1-schnell's sigmas) all work;
5. evaluation of teacher and student with the tiny-world rewards, the student also at the noise levels the
   online policy samples with; the student and teacher saved as diffusers FluxPipelines.
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
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

from pso.config import StrictModel
from pso.random_arch import FLUX_SCHNELL_SCHEDULER
from pso.tiny.build import ema_update, encode_images, token_ids, world_scores
from pso.tiny.flow.clip_t5 import build_t5_tokenizer, t5_encoder
from pso.tiny.world import draw_batch, random_scenes

log = logging.getLogger(__name__)
UNET_WORLD = Path(__file__).parent / "assets" / "model"  # its VAE and CLIP text encoder are reused
STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # linspace(1, 1/N, N) for N = 4, which holds those of N = 1 and 2
TEXT_TOKENS = 32  # T5 tokens per prompt (tiny-world prompts need fewer than 16)


class FlowBuildConfig(StrictModel):
    """Sizes and step counts of the flow build; `quick()` is a seconds-long version for tests."""

    seed: int = 0
    dataset_size: int = Field(16384, ge=64)
    heads: int = 4  # x 16 = the transformer width
    layers: int = 2
    single_layers: int = 2
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
    def quick(cls, seed: int = 0) -> FlowBuildConfig:
        return cls(
            seed=seed,
            dataset_size=256,
            heads=2,
            layers=1,
            single_layers=1,
            teacher_steps=20,
            teacher_batch=32,
            ode_pairs=64,
            ode_steps=4,
            student_steps=10,
            student_batch=32,
            eval_prompts=16,
        )


def _transformer(cfg: FlowBuildConfig, text_dim: int, pooled_dim: int) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 2x2 patches of the 4-channel latents
        num_layers=cfg.layers,
        num_single_layers=cfg.single_layers,
        attention_head_dim=16,
        num_attention_heads=cfg.heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


class FlowNet:
    """The transformer called on unpacked (B, 4, 8, 8) latents, with FLUX's packing and position ids."""

    def __init__(self, transformer: FluxTransformer2DModel):
        self.transformer = transformer

    def velocity(self, x: Tensor, s: Tensor, text: Tensor, pooled: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = self.transformer(
            hidden_states=FluxPipeline._pack_latents(x, b, c, h, w),
            timestep=s,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * 4, w * 4, 4)


def train_teacher(
    cfg: FlowBuildConfig,
    latents: Tensor,
    t5_ids: Tensor,
    pooled: Tensor,
    empty: tuple[Tensor, Tensor],
    t5: T5EncoderModel,
    gen: torch.Generator,
) -> tuple[FluxTransformer2DModel, T5EncoderModel]:
    transformer = _transformer(cfg, t5.config.d_model, pooled.shape[-1])
    params = list(transformer.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.teacher_steps, eta_min=cfg.teacher_lr / 10)
    ema_net, ema_t5 = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(t5).requires_grad_(False)
    net = FlowNet(transformer)
    bar = tqdm(range(cfg.teacher_steps), desc="flow teacher")
    for step in bar:
        idx = torch.randint(len(latents), (cfg.teacher_batch,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
        ids = torch.where(drop[:, None], empty[0], t5_ids[idx])
        pool = torch.where(drop[:, None], empty[1], pooled[idx])
        z = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(len(idx), generator=gen)).view(-1, 1, 1, 1)  # logit-normal
        x_s = (1 - s) * x0 + s * z
        loss = F.mse_loss(net.velocity(x_s, s.flatten(), t5(ids).last_hidden_state, pool), z - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema_net, transformer, cfg.ema_decay, step)
        ema_update(ema_t5, t5, cfg.ema_decay, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_net.eval(), ema_t5.eval()


@torch.no_grad()
def teacher_ode(
    net: FlowNet,
    text: Tensor,
    pooled: Tensor,
    empty: tuple[Tensor, Tensor],
    noise: Tensor,
    steps: int,
    guidance: float,
    batch: int = 256,
) -> Tensor:
    """Euler ODE on sigmas linspace(1, 0, steps + 1) from noise to x0, with classifier-free guidance."""
    sigmas = torch.linspace(1, 0, steps + 1)
    out = []
    for i in tqdm(range(0, len(noise), batch), desc=f"teacher ODE ({steps} steps)", leave=False):
        x = noise[i : i + batch]
        n = len(x)
        both_text = torch.cat([empty[0].expand(n, -1, -1), text[i : i + batch]])
        both_pooled = torch.cat([empty[1].expand(n, -1), pooled[i : i + batch]])
        for k in range(steps):
            s = sigmas[k].expand(2 * n)
            v_u, v_c = net.velocity(torch.cat([x, x]), s, both_text, both_pooled).chunk(2)
            x = x + (sigmas[k + 1] - sigmas[k]) * (v_u + guidance * (v_c - v_u))
        out.append(x)
    return torch.cat(out)


def train_student(
    cfg: FlowBuildConfig,
    teacher: FluxTransformer2DModel,
    text: Tensor,
    pooled: Tensor,
    noise: Tensor,
    targets: Tensor,
    gen: torch.Generator,
) -> FluxTransformer2DModel:
    """x0 = x - s v at s = 1 from the ODE's own noise, and at the re-noised sampler sigmas, onto the ODE output."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    net = FlowNet(student)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.student_steps, eta_min=cfg.student_lr / 10)
    renoise = torch.tensor(STUDENT_SIGMAS[1:])
    bar = tqdm(range(cfg.student_steps), desc="flow student")
    for _ in bar:
        idx = torch.randint(len(noise), (cfg.student_batch,), generator=gen)
        x0 = targets[idx]
        s_r = renoise[torch.randint(len(renoise), (len(idx),), generator=gen)].view(-1, 1, 1, 1)
        s = torch.cat([torch.ones(len(idx), 1, 1, 1), s_r])
        fresh = torch.randn(x0.shape, generator=gen)
        x_s = torch.cat([noise[idx], (1 - s_r) * x0 + s_r * fresh])
        v = net.velocity(x_s, s.flatten(), torch.cat([text[idx]] * 2), torch.cat([pooled[idx]] * 2))
        loss = F.mse_loss(x_s - s * v, torch.cat([x0, x0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.eval().requires_grad_(False)


def flux_pipeline(vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer) -> FluxPipeline:
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


@torch.no_grad()
def evaluate_flow_build(cfg: FlowBuildConfig, out_dir: Path) -> dict:
    """Scores of data, the saved teacher (1 and many ODE steps) and the saved student (1, 2, 4 steps at noise level
    0, and 4 steps at the online policy's noise levels) on the same prompts and starting noise."""
    from pso.config.schema import ModelConfig
    from pso.policy import DistilledPolicy
    from pso.sampling import sample_groups

    rng = np.random.default_rng(cfg.seed + 1000)
    scenes = random_scenes(rng, cfg.eval_prompts)
    prompts = [s.prompt for s in scenes]
    teacher = FluxPipeline.from_pretrained(out_dir / "teacher", local_files_only=True)
    text, pooled, _ = teacher.encode_prompt(prompts, max_sequence_length=TEXT_TOKENS)
    empty_text, empty_pooled, _ = teacher.encode_prompt([""], max_sequence_length=TEXT_TOKENS)
    noise = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(cfg.seed + 1000))
    report = {"data": world_scores(draw_batch(scenes, rng), prompts)}
    vae = teacher.vae
    for steps in (1, cfg.ode_steps):
        latents = teacher_ode(
            FlowNet(teacher.transformer), text, pooled, (empty_text, empty_pooled), noise, steps, cfg.ode_guidance
        )
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        report[f"teacher_{steps}_step"] = world_scores(images, prompts)
    for steps, eta in ((1, 0.0), (2, 0.0), (4, 0.0), (4, 0.5), (4, 1.0)):
        model = ModelConfig(family="tiny-flow", pretrained=str(out_dir / "student"), num_steps=steps, eta=eta)
        policy = DistilledPolicy.from_config(model, finetune=None)
        traj = sample_groups(policy, prompts, 1, cfg.seed + 1000, batch_size=256)
        report[f"student_{steps}_step" + (f"_eta{eta:g}" if eta else "")] = world_scores(traj.images, prompts)
    return report


def build_tiny_flow_model(out_dir: Path, cfg: FlowBuildConfig) -> dict:
    """Run every stage; writes out_dir/{student,teacher}/ (FluxPipeline folders) and out_dir/report.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    vae = AutoencoderKL.from_pretrained(UNET_WORLD / "vae").requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline decodes latents / scaling + shift
    clip_tokenizer = CLIPTokenizer.from_pretrained(UNET_WORLD / "tokenizer")
    clip = CLIPTextModel.from_pretrained(UNET_WORLD / "text_encoder").requires_grad_(False).eval()
    t5_tokenizer = build_t5_tokenizer(out_dir / "t5-tokenizer")

    scenes = random_scenes(rng, cfg.dataset_size)
    prompts = [s.prompt for s in scenes]
    latents = encode_images(vae, draw_batch(scenes, rng))
    with torch.no_grad():
        clip_ids = token_ids(clip_tokenizer, prompts + [""])
        pooled_all = torch.cat([clip(clip_ids[i : i + 1024]).pooler_output for i in range(0, len(clip_ids), 1024)])
    pooled, empty_pooled = pooled_all[:-1], pooled_all[-1:]
    t5_ids, empty_ids = token_ids(t5_tokenizer, prompts, TEXT_TOKENS), token_ids(t5_tokenizer, [""], TEXT_TOKENS)
    timings["data"] = time.perf_counter() - start

    transformer, t5 = train_teacher(
        cfg, latents, t5_ids, pooled, (empty_ids, empty_pooled), t5_encoder(t5_tokenizer), gen
    )
    teacher = FlowNet(transformer)
    timings["teacher"] = time.perf_counter() - start - sum(timings.values())

    @torch.no_grad()
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, cids = token_ids(t5_tokenizer, texts, TEXT_TOKENS), token_ids(clip_tokenizer, texts)
        chunks = range(0, len(texts), 512)
        return (
            torch.cat([t5(ids[i : i + 512]).last_hidden_state for i in chunks]),
            torch.cat([clip(cids[i : i + 512]).pooler_output for i in chunks]),
        )

    empty = (encode([""])[0], empty_pooled)
    pick = torch.randint(len(prompts), (cfg.ode_pairs,), generator=gen)
    text, pair_pooled = encode([prompts[i] for i in pick])
    noise = torch.randn((cfg.ode_pairs, 4, 8, 8), generator=gen)
    targets = teacher_ode(teacher, text, pair_pooled, empty, noise, cfg.ode_steps, cfg.ode_guidance)
    timings["ode_pairs"] = time.perf_counter() - start - sum(timings.values())

    student = train_student(cfg, transformer, text, pair_pooled, noise, targets, gen)
    timings["student"] = time.perf_counter() - start - sum(timings.values())

    flux_pipeline(vae, clip, clip_tokenizer, t5, t5_tokenizer, student).save_pretrained(out_dir / "student")
    flux_pipeline(vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer).save_pretrained(out_dir / "teacher")
    report = {"config": cfg.model_dump(mode="json"), "scores": evaluate_flow_build(cfg, out_dir)}
    timings["evaluate"] = time.perf_counter() - start - sum(timings.values())
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - start, 1)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
