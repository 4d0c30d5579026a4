"""Randomly initialised pipelines with the real architectures of the distilled families, built offline.

    sd2         SD 2.x-base, as SD-Turbo: the 865.9M-parameter UNet (320/640/1280/1280 channels,
                cross-attention 1024) with the OpenCLIP ViT-H text tower's widths, SD's VAE
    sdxl        SDXL, as SDXL-Turbo and SDXL-DMD2: the 2.57B-parameter UNet (320/640/1280, 1/2/10
                transformer layers, cross-attention 2048, text_time conditioning), SDXL's VAE
                (force_upcast), the ViT-L and bigG text towers' widths
    sdxl-smoke  the SDXL layout at toy widths (64 px images), for CPU wiring checks
    flux        FLUX.1-schnell: the 11.89B-parameter FluxTransformer2DModel (19 double-stream and 38
                single-stream blocks, width 3072, no guidance embedding), FLUX's 16-channel VAE (no quant
                convs), the CLIP ViT-L (pooled vector) and T5-XXL (d_model 4096) text towers' widths
    flux-smoke  the FLUX layout at toy widths (1 double + 1 single block), for CPU wiring checks

Text towers keep their widths (so the denoiser sees the real context) but only `text_layers` layers,
with the tiny offline tokenizers of pso.tiny (CLIP; T5 for FLUX). They exist for what needs a real-size
model without the weights: the GPU benchmarks and the presets' slow tests. On a CPU the SDXL UNet takes
about a minute and ~10 GB to build; the FLUX transformer wants a GPU (24 GB in bfloat16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
# black-forest-labs/FLUX.1-schnell transformer/config.json
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels in packed 2x2 patches
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL's d_model
    pooled_projection_dim=768,  # CLIP ViT-L's pooled vector
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE_SCALE = dict(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's vae/config.json
FLUX_VAE = {**_VAE, **FLUX_VAE_SCALE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "force_upcast": True, "sample_size": 1024}  # fmt: skip
# FLUX.1-schnell's scheduler_config.json
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# widths of the text towers: CLIP ViT-L/14 and OpenCLIP bigG/14 (SDXL), OpenCLIP ViT-H/14 (SD 2.x)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")  # fmt: skip
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, projection_dim=512,
              hidden_act="gelu")  # fmt: skip
# google/t5-v1_1-xxl's encoder widths (FLUX's text_encoder_2)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128)  # fmt: skip

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
SMOKE_T5 = dict(d_model=64, d_kv=16, d_ff=96, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=32)  # fmt: skip
SMOKE_FLUX_TRANSFORMER = {
    **FLUX_TRANSFORMER,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": SMOKE_T5["d_model"],
    "pooled_projection_dim": SMOKE_CLIP_L["hidden_size"],
    "axes_dims_rope": (4, 6, 6),
}
SMOKE_FLUX_VAE = {**FLUX_VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}


@dataclass(frozen=True)
class Arch:
    pipeline: str  # "sd", "sdxl" or "flux"
    backbone: dict  # the denoiser's config: a UNet2DConditionModel's (sd, sdxl) or a FluxTransformer2DModel's
    vae: dict
    text: tuple[dict, ...]  # one CLIP width set per CLIP text encoder
    params: int | None  # the published denoiser's parameter count (None: a toy layout)
    t5: dict | None = None  # the T5 encoder's widths (flux)

    @property
    def unet_params(self) -> int | None:
        return self.params


ARCHS = {
    "sd2": Arch("sd", SD2_UNET, SD_VAE, (CLIP_H,), 865_910_724),
    "sdxl": Arch("sdxl", SDXL_UNET, SDXL_VAE, (CLIP_L, CLIP_G), 2_567_463_684),
    "sdxl-smoke": Arch("sdxl", SMOKE_UNET, SMOKE_VAE, (SMOKE_CLIP_L, SMOKE_CLIP_G), None),
    # FLUX.1-schnell's transformer: flux1-schnell.safetensors, 23.8 GB of bfloat16
    "flux": Arch("flux", FLUX_TRANSFORMER, FLUX_VAE, (CLIP_L,), 11_891_178_560, T5_XXL),
    "flux-smoke": Arch("flux", SMOKE_FLUX_TRANSFORMER, SMOKE_FLUX_VAE, (SMOKE_CLIP_L,), None, SMOKE_T5),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


# the pipeline folder's denoiser entry and its diffusers class, per pipeline kind
_BACKBONES = {
    "sd": ("unet", "UNet2DConditionModel"),
    "sdxl": ("unet", "UNet2DConditionModel"),
    "flux": ("transformer", "FluxTransformer2DModel"),
}


def backbone_class(arch: str = "sdxl") -> type:
    """The diffusers class of `arch`'s denoiser (UNet2DConditionModel or FluxTransformer2DModel)."""
    import diffusers

    return getattr(diffusers, _BACKBONES[get_arch(arch).pipeline][1])


def backbone_config(arch: str = "sdxl", image_size: int | None = None) -> dict:
    """The denoiser config of `arch` at `image_size` px (default: the architecture's own, 512 / 64); FLUX's
    transformer does not depend on the image size (which must be a multiple of 16: 2x2 patches of latents)."""
    spec = get_arch(arch)
    config = dict(spec.backbone)
    if image_size is not None:
        multiple = 16 if spec.pipeline == "flux" else 8
        if image_size % multiple:
            raise ValueError(f"image size must be a multiple of {multiple}, got {image_size}")
        if spec.pipeline != "flux":
            config["sample_size"] = image_size // 8
    return config


def count_parameters(arch: str = "sdxl") -> int:
    """Parameters of the denoiser `arch` builds, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = backbone_class(arch)(**backbone_config(arch))
    return sum(p.numel() for p in model.parameters())


def count_folder_parameters(model_dir: str | Path) -> int:
    """Parameters of the denoiser (UNet or transformer) in a diffusers pipeline folder, from its config
    (meta device)."""
    import json

    import diffusers

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    name = next(n for n in ("unet", "transformer") if n in index)
    cls = getattr(diffusers, index[name][1])
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(Path(model_dir) / name))
    return sum(p.numel() for p in model.parameters())


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


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
    saved from the CPU one at a time, so at most one full-size module is in host memory at once. In
    bfloat16 (float32's range) they are initialised in it directly, so the 11.9B-parameter FLUX
    transformer takes 24 GB on the device, not 48; float16 modules are initialised in float32 and cast.
    `text_layers` must be at least 2: SDXL conditions on the text towers' penultimate layer.
    """
    spec = get_arch(arch)
    if text_layers < 2:
        raise ValueError("SDXL and SD 2.x read a text encoder's penultimate layer: text_layers must be >= 2")
    backbone_cfg = backbone_config(arch, image_size)
    vae_cfg = {**spec.vae, "sample_size": image_size} if image_size else dict(spec.vae)
    out_dir = Path(out_dir)
    torch_device = torch.device(device)
    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    init_dtype = dtype if dtype == torch.bfloat16 else torch.float32

    def make(build, subfolder: str):
        with torch.random.fork_rng(devices=devices, device_type=torch_device.type):
            torch.manual_seed(seed)
            with torch_device, _default_dtype(init_dtype):
                module = build()
        module = module.to("cpu", dtype)
        module.save_pretrained(out_dir / subfolder, safe_serialization=True, variant=variant)
        return module

    # the big one first, saved and dropped before the others are made; the pipeline object only
    # writes model_index.json and the scheduler, with a stand-in denoiser of the same config on the meta device
    cls = backbone_class(arch)
    subfolder = _BACKBONES[spec.pipeline][0]
    make(lambda: cls(**backbone_cfg), subfolder)
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.device("meta"):
        stub = cls(**backbone_cfg)
    if spec.pipeline == "flux":
        pipe = _flux_pipeline(out_dir, spec, vae_cfg, stub, make, text_layers)
    else:
        pipe = _sd_pipeline(out_dir, spec, vae_cfg, stub, make, text_layers)
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    pipe.save_config(out_dir)
    return out_dir


def _sd_pipeline(out_dir: Path, spec: Arch, vae_cfg: dict, unet_stub, make, text_layers: int):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pso.tiny.pipelines import SD_BETAS
    from pso.tiny.tokenizer import build_clip_tokenizer

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

        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet_stub, scheduler=scheduler, add_watermarker=False,
        )  # fmt: skip
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet_stub, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _flux_pipeline(out_dir: Path, spec: Arch, vae_cfg: dict, transformer_stub, make, text_layers: int):
    """FLUX.1-schnell's pipeline: CLIP-L's pooled vector and T5's hidden states (the tiny offline tokenizers)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    from pso.tiny.flow.clip_t5 import build_t5_tokenizer, t5_encoder
    from pso.tiny.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_t5_tokenizer(out_dir / "tokenizer_2")
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER),
        vae=make(lambda: AutoencoderKL(**vae_cfg), "vae"),
        text_encoder=make(lambda: CLIPTextModel(_text_config(tokenizer, spec.text[0], text_layers)), "text_encoder"),
        tokenizer=tokenizer,
        text_encoder_2=make(lambda: t5_encoder(tokenizer_2, spec.t5, text_layers), "text_encoder_2"),
        tokenizer_2=tokenizer_2,
        transformer=transformer_stub,
    )
