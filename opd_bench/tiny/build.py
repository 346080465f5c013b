"""Assemble a real ``StableDiffusion3Pipeline`` from tiny random-init parts, fully offline.

The result is an ordinary diffusers pipeline: it round-trips through ``save_pretrained`` /
``from_pretrained(folder)`` and loads through the same ``Policy`` code as SD3.5-Medium. Tests use
it as a stand-in for real checkpoints; the tiny suite trains one as its base model.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class TinyConfig:
    """Sizes of the miniature SD3. Defaults: a few hundred thousand parameters, 64x64 images."""

    image_size: int = 64
    latent_channels: int = 16  # as SD3's VAE
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels -> 4x downsampling: 64 px -> 16x16 latents
    vae_norm_groups: int | None = None  # GroupNorm groups; None = one channel per group at the top level
    vae_mid_attention: bool = True  # False makes the VAE fully convolutional (trainable on crops)
    patch_size: int = 2
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    text_hidden: int = 32  # each CLIP encoder's width; the joint width is text_hidden * 2
    text_layers: int = 2
    text_heads: int = 2
    text_projection: int = 32
    max_prompt_tokens: int = 16
    t5_tokens: int = 1  # SD3 appends T5 tokens (zeros when T5 is absent); keep the sequence short
    shift: float = 3.0  # the scheduler's timestep shift, as SD3.5
    words: list[str] | None = field(default=None)  # tokenizer word list; None = the default
    char_tokens: bool = False  # case kept, one token per capital letter / digit (tokenizer.build_tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)


def clip_text_config(vocab_size: int, hidden: int, layers: int, heads: int, max_tokens: int, bos: int, eos: int, **extra):
    """A tiny CLIP text encoder's config (shared by the SD3 and FLUX stand-ins)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_tokens,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
        **extra,
    )


def tiny_vae(channels: tuple[int, ...], latent_channels: int, image_size: int, norm_groups: int | None = None, **extra):
    """A small ``AutoencoderKL`` (one layer per level; ``extra`` sets scale/shift, mid attention)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups or min(channels),
        sample_size=image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **extra,
    )


def _text_encoder(config: TinyConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_text_config(
        vocab_size, config.text_hidden, config.text_layers, config.text_heads, config.max_prompt_tokens, bos, eos,
        projection_dim=config.text_projection,
    ))


def build_pipeline(config: TinyConfig | None = None, seed: int = 0):
    """Build the miniature pipeline with weights drawn from ``seed`` (no file or network access)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from opd_bench.tiny.tokenizer import DEFAULT_WORDS, build_tokenizer

    config = config or TinyConfig()
    if config.image_size % (2 ** (len(config.vae_channels) - 1) * config.patch_size):
        raise ValueError("image_size must be divisible by the VAE downsampling times the patch size")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, config.words or DEFAULT_WORDS, config.max_prompt_tokens, config.char_tokens)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = _text_encoder(config, len(tokenizer), bos, eos)
    text_encoder_2 = _text_encoder(config, len(tokenizer), bos, eos)
    levels = len(config.vae_channels)
    vae = tiny_vae(
        config.vae_channels, config.latent_channels, config.image_size, config.vae_norm_groups,
        scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=config.vae_mid_attention,
    )
    latent_size = config.image_size // 2 ** (levels - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=config.patch_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.text_hidden * 2,
        caption_projection_dim=config.num_heads * config.head_dim,
        pooled_projection_dim=config.text_projection * 2,
        pos_embed_max_size=latent_size // config.patch_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_pipeline(pipeline, folder: str | Path) -> Path:
    """``save_pretrained``, quietly, with a tokenizer class both transformers 4 and 5 load.

    Quietly because diffusers warns once per component a tiny pipeline leaves out on purpose
    (the T5 encoder) and transformers draws a bar per one-shard model: noise in a command's output.
    """
    from opd_bench.policy import quiet_libraries
    from opd_bench.tiny.tokenizer import portable_tokenizer_class

    with quiet_libraries(quiet_warnings=True):
        pipeline.save_pretrained(folder)
    portable_tokenizer_class(folder)
    return Path(folder)


def save_tiny(folder: str | Path, config: TinyConfig | None = None, seed: int = 0) -> Path:
    """Build a random tiny pipeline and save it as a diffusers folder; returns the folder."""
    return save_pipeline(build_pipeline(config, seed), folder)
