"""A randomly initialised SDXL-size pipeline in diffusers format, built offline (for the GPU benchmarks).

    python benchmarks/sdxl_random.py OUT_DIR [--device cuda:0] [--size full|smoke] [--image-size 512]
    python benchmarks/sdxl_random.py --count          # the UNet's parameter count, on the meta device

`full` is SDXL's own UNet (2.57B parameters: 320/640/1280 channels, 1/2/10 transformer layers,
cross-attention 2048, text_time conditioning) and VAE (128/256/512/512, 4 latent channels,
scaling 0.13025, force_upcast as SDXL's: the policy decodes in float32), with CLIP text encoders of
SDXL's widths (ViT-L 768, bigG 1280 with a 1280 projection, so the UNet sees the real 2048-wide
context and 2816-wide added embedding) but only 2 layers each, and the tiny offline CLIP tokenizer
of pso.tiny. `smoke` is the same layout at toy widths for CPU wiring checks. Weights are saved in
float16; building on a GPU takes seconds, on a CPU the full size takes minutes and ~10 GB.

The folder loads as an `sdxl-turbo` model (512 px, 1-4 steps) through `DistilledPolicy.from_config`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (sample_size 64 is SDXL-Turbo's 512 px)
SDXL_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop ids x 256 + the 1280-wide pooled text
    use_linear_projection=True,
    norm_num_groups=32,
)
# sdxl-vae (stabilityai/sdxl-turbo vae/config.json)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.13025,
    force_upcast=True,
)
# widths of SDXL's CLIP ViT-L/14 and OpenCLIP bigG/14 text towers (their depths are 12 and 32)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")  # fmt: skip

# the same layout at toy widths (64 px images, 8x8 latents), for CPU smoke runs
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

SIZES = {"full": (SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_G), "smoke": (SMOKE_UNET, SMOKE_VAE, SMOKE_CLIP_L, SMOKE_CLIP_G)}
SDXL_UNET_PARAMS = 2_567_463_684  # SDXL-base's (and SDXL-Turbo's) UNet
FAMILY = "sdxl-turbo"  # 512 px, Euler ancestral (trailing), 1-4 steps


def unet_config(size: str = "full", image_size: int | None = None) -> dict:
    """The UNet config for `size`, at `image_size` px (default: the size's own, 512 / 64)."""
    config = dict(SIZES[size][0])
    if image_size is not None:
        if image_size % 8:
            raise ValueError(f"image size must be a multiple of 8, got {image_size}")
        config["sample_size"] = image_size // 8
    return config


def count_unet_parameters(size: str = "full") -> int:
    """Parameters of the UNet `size` builds, counted on the meta device (no memory, no time)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(size))
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


def build_sdxl_random(
    out_dir: str | Path,
    *,
    size: str = "full",
    image_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    text_layers: int = 2,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a random SDXL pipeline of `size` ("full" or "smoke") to `out_dir` in `dtype`; returns the folder.

    The modules are initialised on `device` (a GPU does the 2.57B-parameter UNet in seconds), then
    saved from the CPU one at a time, so at most one full-size module is in host memory at once.
    `text_layers` must be at least 2: SDXL conditions on the text towers' penultimate layer.
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pso.tiny.pipelines import SD_BETAS
    from pso.tiny.tokenizer import build_clip_tokenizer

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    if text_layers < 2:
        raise ValueError("SDXL reads the text encoders' penultimate layer: text_layers must be >= 2")
    _, vae_cfg, clip_l, clip_g = SIZES[size]
    unet_cfg = unet_config(size, image_size)
    vae_cfg = {**vae_cfg, "sample_size": unet_cfg["sample_size"] * 8}
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(out_dir / "tokenizer_2")
    torch_device = torch.device(device)
    devices = [torch_device.index or 0] if torch_device.type == "cuda" else []

    def make(build, subfolder: str):
        with torch.random.fork_rng(devices=devices, device_type=torch_device.type):
            torch.manual_seed(seed)
            with torch_device:
                module = build()
        module = module.to("cpu", dtype)
        module.save_pretrained(out_dir / subfolder, safe_serialization=True)
        return module

    # the big one first, saved and dropped before the others are made
    make(lambda: UNet2DConditionModel(**unet_cfg), "unet")
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
    # the pipeline object only writes model_index.json and the scheduler (every module is saved by
    # `make`); its UNet is a stand-in of the same config on the meta device
    with torch.device("meta"):
        unet_stub = UNet2DConditionModel(**unet_cfg)
    pipe = StableDiffusionXLPipeline(
        vae=make(lambda: AutoencoderKL(**vae_cfg), "vae"),
        text_encoder=make(lambda: CLIPTextModel(_text_config(tokenizer, clip_l, text_layers)), "text_encoder"),
        text_encoder_2=make(
            lambda: CLIPTextModelWithProjection(_text_config(tokenizer_2, clip_g, text_layers)), "text_encoder_2"
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet_stub,
        scheduler=EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing", steps_offset=1),
        add_watermarker=False,
    )
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    pipe.save_config(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--image-size", type=int, help="default 512 (full), 64 (smoke)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda:0 is much faster)")
    parser.add_argument("--count", action="store_true", help="only print the UNet's parameter count (meta device)")
    args = parser.parse_args()
    if args.count or args.out_dir is None:
        n = count_unet_parameters(args.size)
        print(f"{args.size} UNet: {n:,} parameters" + (f" (SDXL: {SDXL_UNET_PARAMS:,})" if args.size == "full" else ""))
        return
    path = build_sdxl_random(args.out_dir, size=args.size, image_size=args.image_size, device=args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
