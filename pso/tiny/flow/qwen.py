"""Tiny random flow-matching pipelines whose text encoders are Qwen language models.

- ``flux2``: FLUX.2 [klein] (`Flux2KleinPipeline`, distilled), Qwen3 causal LM text encoder;
- ``zimage``: Z-Image-Turbo (`ZImagePipeline`), Qwen3 base model text encoder;
- ``qwenimage``: Qwen-Image (`QwenImagePipeline`), Qwen2.5-VL text encoder.

All three share one tiny byte-level BPE Qwen tokenizer with Qwen's special tokens and chat template.
Each pipeline makes 32x32 px images, builds offline in well under a second and saves to under 2.5 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from pso.tiny.pipelines import _seeded, save_pipeline, sharpen_attention
from pso.tiny.tokenizer import TOKENIZER_WORDS, bytes_to_unicode, merges_joining

TEXT_DIM = 16  # hidden size of every tiny Qwen text encoder
LATENT_CHANNELS = 4
MAX_POSITIONS = 2048  # covers Qwen-Image's 1024 prompt tokens plus its 34-token template

# Qwen's special tokens, in the order of their ids after the BPE vocabulary
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, "<think>", "</think>")

# Qwen3's chat template reduced to plain messages: `enable_thinking=False` adds an empty think block
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Words of the chat roles and of Qwen-Image's system prompt, which the pipeline drops by a fixed token
# count (34) and so must tokenize, as with the real tokenizer, one token a word
QWEN_WORDS: tuple[str, ...] = (
    *TOKENIZER_WORDS,
    *("system", "user", "assistant", "Describe", "image", "by", "detailing", "color", "size", "texture"),
    *("quantity", "text", "spatial", "relationships", "objects"),
    "\n\n",
)

# Scheduler configs of the released checkpoints
FLUX2_KLEIN_SCHEDULER = dict(  # FLUX.1-dev's, which scripts/convert_flux2_to_diffusers.py gives FLUX.2
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
Z_IMAGE_TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A tiny Qwen2 tokenizer: byte alphabet, one token per merge (each word alone and after a space), specials."""
    words = [*QWEN_WORDS, *(" " + w for w in QWEN_WORDS if w.isalpha())]
    byte_chars = bytes_to_unicode()
    merges = merges_joining([byte_chars[b] for b in word.encode()] for word in words)
    tokens = [*byte_chars.values(), *map("".join, merges), *SPECIAL_TOKENS]
    tokenizer = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.pad_token_id,  # Qwen models take <|endoftext|> as bos
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _qwen3_config(tokenizer: Qwen2Tokenizer, num_layers: int) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=TEXT_DIM // 2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        **_token_ids(tokenizer),
    )


def _vae_blocks() -> dict:
    """Two-level encoder/decoder (8x scale in the real ones, 2x here) shared by the FLUX.2 and Z-Image VAEs."""
    return dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
    )


def build_flux2(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny FLUX.2 [klein] pipeline (distilled, so no CFG) to `out_dir`; the same seed gives identical weights.

    The text encoder has 28 layers because the pipeline stacks hidden states 9, 18 and 27, as for Qwen3-4B.
    """
    tokenizer = build_qwen_tokenizer()
    text_encoder = _seeded(seed, lambda: Qwen3ForCausalLM(_qwen3_config(tokenizer, num_layers=28)))
    vae = _seeded(seed, lambda: AutoencoderKLFlux2(**_vae_blocks()))
    transformer = _seeded(
        seed,
        lambda: sharpen_attention(
            Flux2Transformer2DModel(
                patch_size=1,
                in_channels=4 * LATENT_CHANNELS,  # latents come 2x2-patchified
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=3 * TEXT_DIM,  # three stacked text-encoder layers
                timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4),
                guidance_embeds=False,
            )
        ),
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    return save_pipeline(pipe, out_dir)


def build_zimage(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny Z-Image-Turbo pipeline to `out_dir`; the same seed gives identical weights."""
    tokenizer = build_qwen_tokenizer()
    text_encoder = _seeded(seed, lambda: Qwen3Model(_qwen3_config(tokenizer, num_layers=2)))
    # Z-Image's VAE is FLUX.1's, with its latent scale and shift
    vae = _seeded(seed, lambda: AutoencoderKL(**_vae_blocks(), scaling_factor=0.3611, shift_factor=0.1159))
    transformer = _seeded(
        seed,
        lambda: sharpen_attention(
            ZImageTransformer2DModel(
                all_patch_size=(2,),
                all_f_patch_size=(1,),
                in_channels=LATENT_CHANNELS,
                dim=32,
                n_layers=2,
                n_refiner_layers=1,
                n_heads=2,
                n_kv_heads=2,
                cap_feat_dim=TEXT_DIM,
                axes_dims=[8, 4, 4],
                axes_lens=[1024, 512, 512],
            )
        ),
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_TURBO_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save_pipeline(pipe, out_dir)


def _qwen_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=MAX_POSITIONS,
            # multimodal RoPE splits the 4 frequencies of the 8-dim heads over time, height and width
            rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1_000_000.0),
            **_token_ids(tokenizer),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=TEXT_DIM,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )


def build_qwenimage(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen-Image pipeline to `out_dir`; the same seed gives identical weights."""
    tokenizer = build_qwen_tokenizer()
    text_encoder = _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(_qwen_vl_config(tokenizer)))
    vae = _seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],  # two spatial downsamplings: 4x scale
            latents_mean=[0.0] * LATENT_CHANNELS,
            latents_std=[1.0] * LATENT_CHANNELS,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: sharpen_attention(
            QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=4 * LATENT_CHANNELS,  # latents come 2x2-packed
                out_channels=LATENT_CHANNELS,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=TEXT_DIM,
                axes_dims_rope=(8, 4, 4),
            )
        ),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save_pipeline(pipe, out_dir)


BUILDERS: dict[str, Callable[..., Path]] = {"flux2": build_flux2, "zimage": build_zimage, "qwenimage": build_qwenimage}
