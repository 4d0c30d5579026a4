"""Randomly initialised pipelines with the real architectures of the distilled families, built offline.

    sd2         SD 2.x-base, as SD-Turbo: the 865.9M-parameter UNet (320/640/1280/1280 channels,
                cross-attention 1024) with the OpenCLIP ViT-H text tower's widths, SD's VAE
    sdxl        SDXL, as SDXL-Turbo and SDXL-DMD2: the 2.57B-parameter UNet (320/640/1280, 1/2/10
                transformer layers, cross-attention 2048, text_time conditioning), SDXL's VAE
                (force_upcast), the ViT-L and bigG text towers' widths
    sdxl-smoke  the SDXL layout at toy widths (64 px images), for CPU wiring checks

Text towers keep their widths (so the UNet sees the real context) but only `text_layers` layers,
with the tiny offline CLIP tokenizer of pso.tiny. They exist for what needs a real-size model
without the weights: the GPU benchmarks and the presets' slow tests. On a CPU the SDXL UNet takes
about a minute and ~10 GB to build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_CROSS_DOWN = "CrossAttnDownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (sample_size 64 is SDXL-Turbo's 512 px)
SDXL_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", _CROSS_DOWN, _CROSS_DOWN),
    up_block_types=(_CROSS_UP, _CROSS_UP, "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop ids x 256 + the 1280-wide pooled text
    use_linear_projection=True,
    norm_num_groups=32,
)
# stabilityai/sd-turbo (SD 2.1-base) unet/config.json
SD2_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, "DownBlock2D"),
    up_block_types=("UpBlock2D", _CROSS_UP, _CROSS_UP, _CROSS_UP),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
SDXL_VAE = {**_VAE, "scaling_factor": 0.13025, "force_upcast": True}  # sdxl-vae
SD_VAE = {**_VAE, "scaling_factor": 0.18215}
# widths of the text towers: CLIP ViT-L/14 and OpenCLIP bigG/14 (SDXL), OpenCLIP ViT-H/14 (SD 2.x)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")  # fmt: skip
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, projection_dim=512,
              hidden_act="gelu")  # fmt: skip

SMOKE_UNET = {
    **SDXL_UNET,
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 128),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 8),
    "cross_attention_dim": 32 + 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 64,
}
SMOKE_VAE = {**SDXL_VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
SMOKE_CLIP_L = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, projection_dim=32,
                    hidden_act="quick_gelu")  # fmt: skip
SMOKE_CLIP_G = dict(hidden_size=64, intermediate_size=37, num_attention_heads=4, projection_dim=64,
                    hidden_act="gelu")  # fmt: skip


@dataclass(frozen=True)
class Arch:
    pipeline: str  # "sd" or "sdxl"
    unet: dict
    vae: dict
    text: tuple[dict, ...]  # one width set per text encoder
    unet_params: int | None  # the published UNet's parameter count (None: a toy layout)


ARCHS = {
    "sd2": Arch("sd", SD2_UNET, SD_VAE, (CLIP_H,), 865_910_724),
    "sdxl": Arch("sdxl", SDXL_UNET, SDXL_VAE, (CLIP_L, CLIP_G), 2_567_463_684),
    "sdxl-smoke": Arch("sdxl", SMOKE_UNET, SMOKE_VAE, (SMOKE_CLIP_L, SMOKE_CLIP_G), None),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def unet_config(arch: str = "sdxl", image_size: int | None = None) -> dict:
    """The UNet config of `arch` at `image_size` px (default: the architecture's own, 512 / 64)."""
    config = dict(get_arch(arch).unet)
    if image_size is not None:
        if image_size % 8:
            raise ValueError(f"image size must be a multiple of 8, got {image_size}")
        config["sample_size"] = image_size // 8
    return config


def count_unet_parameters(arch: str = "sdxl") -> int:
    """Parameters of the UNet `arch` builds, counted on the meta device (no memory, no time)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch))
    return sum(p.numel() for p in unet.parameters())


def count_folder_unet_parameters(model_dir: str | Path) -> int:
    """Parameters of the UNet in a diffusers pipeline folder, from its config (meta device)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(Path(model_dir) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in unet.parameters())


def _text_config(tokenizer, widths: dict, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **widths,
        vocab_size=len(tokenizer),
        num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random_pipeline(
    out_dir: str | Path,
    arch: str = "sdxl",
    *,
    image_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    text_layers: int = 2,
    dtype: torch.dtype = torch.float16,
    variant: str | None = None,
) -> Path:
    """Write a random pipeline of `arch` to `out_dir` in `dtype` (weight files named for `variant`,
    e.g. "fp16", when given); returns the folder.

    The modules are initialised on `device` (a GPU does the 2.57B-parameter UNet in seconds), then
    saved from the CPU one at a time, so at most one full-size module is in host memory at once.
    `text_layers` must be at least 2: SDXL conditions on the text towers' penultimate layer.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pso.tiny.pipelines import SD_BETAS
    from pso.tiny.tokenizer import build_clip_tokenizer

    spec = get_arch(arch)
    if text_layers < 2:
        raise ValueError("SDXL and SD 2.x read a text encoder's penultimate layer: text_layers must be >= 2")
    unet_cfg = unet_config(arch, image_size)
    vae_cfg = {**spec.vae, "sample_size": unet_cfg["sample_size"] * 8}
    out_dir = Path(out_dir)
    torch_device = torch.device(device)
    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []

    def make(build, subfolder: str):
        with torch.random.fork_rng(devices=devices, device_type=torch_device.type):
            torch.manual_seed(seed)
            with torch_device:
                module = build()
        module = module.to("cpu", dtype)
        module.save_pretrained(out_dir / subfolder, safe_serialization=True, variant=variant)
        return module

    # the big one first, saved and dropped before the others are made; the pipeline object only
    # writes model_index.json and the scheduler, with a stand-in UNet of the same config on the meta device
    make(lambda: UNet2DConditionModel(**unet_cfg), "unet")
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.device("meta"):
        unet_stub = UNet2DConditionModel(**unet_cfg)
    names = ["", "_2"][: len(spec.text)]
    tokenizers = [build_clip_tokenizer(out_dir / f"tokenizer{n}") for n in names]
    encoders = []
    for i, (name, tok, widths) in enumerate(zip(names, tokenizers, spec.text)):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        encoders.append(make(lambda c=cls, t=tok, w=widths: c(_text_config(t, w, text_layers)), f"text_encoder{name}"))
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=1)
    vae = make(lambda: AutoencoderKL(**vae_cfg), "vae")
    if spec.pipeline == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet_stub, scheduler=scheduler, add_watermarker=False,
        )  # fmt: skip
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet_stub, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    pipe.save_config(out_dir)
    return out_dir
