"""Assemble a real diffusers ``FluxPipeline`` from tiny random-init parts, fully offline.

The FLUX counterpart of ``opd_bench.tiny.build``: same roles as FLUX.1 (a FLUX transformer with
double- and single-stream blocks, a 16-channel VAE with FLUX's scaling and shift, CLIP for the
pooled embedding, T5 for the token sequence, a dynamically shifted flow-matching scheduler), at
a size that runs on a laptop CPU. It round-trips through ``save_pretrained`` /
``Policy.from_pretrained(folder)``, the code path of FLUX.1-dev and FLUX.1-schnell; tests use it
as their stand-in.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd_bench.tiny.build import clip_text_config, save_pipeline, tiny_vae

T5_SPACE = "\u2581"  # SentencePiece's word-start marker, as in T5's vocabulary


@dataclass
class TinyFluxConfig:
    """Sizes of the miniature FLUX. Defaults: 64x64 images, 16x16 latents, 64 packed tokens."""

    image_size: int = 64
    latent_channels: int = 16  # as FLUX's VAE; packed 2x2 into 64 transformer channels
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels -> 4x downsampling
    num_layers: int = 1  # double-stream (MMDiT) blocks
    num_single_layers: int = 1  # single-stream blocks
    num_heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # rotary dims per position axis; must sum to head_dim
    clip_hidden: int = 32  # CLIP width = the pooled projection width
    t5_hidden: int = 32  # T5 width = the joint attention width
    text_layers: int = 2
    text_heads: int = 2
    max_prompt_tokens: int = 16  # CLIP and T5 sequence length
    guidance_embeds: bool = True  # FLUX.1-dev (guidance-distilled); False is schnell-like
    words: list[str] | None = None  # tokenizer word list; None = the tiny world's default

    def to_dict(self) -> dict:
        return asdict(self)


def build_t5_tokenizer(words, max_length: int):
    """A T5 tokenizer built in code: a Unigram model whose pieces are whole words and characters.

    Listed words are single cheap pieces; anything else falls back to single characters (every
    printable ASCII character is a piece), so no prompt encodes to unknown tokens.
    """
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (T5_SPACE, -2.0)]  # T5's fixed ids 0, 1, 2
    pieces += [(T5_SPACE + w, -1.0) for w in words]
    pieces += [(T5_SPACE + c, -5.0) for c in chars] + [(c, -5.0) for c in chars]
    vocab: dict[str, float] = {}
    for piece, score in pieces:  # one-letter words ("a") are also character pieces: keep the first
        vocab.setdefault(piece, score)
    return T5TokenizerFast(vocab=list(vocab.items()), extra_ids=0, model_max_length=max_length)


def _clip_encoder(config: TinyFluxConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(
        vocab_size, config.clip_hidden, config.text_layers, config.text_heads, config.max_prompt_tokens, bos, eos
    ))


def _t5_encoder(config: TinyFluxConfig, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=config.t5_hidden,
            d_kv=config.t5_hidden // config.text_heads,
            d_ff=config.t5_hidden * 2,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=config.max_prompt_tokens,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            dropout_rate=0.0,  # a module built here starts in train mode; no dropout keeps it deterministic
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_flux_pipeline(seed: int = 0, config: TinyFluxConfig | None = None):
    """Build the miniature ``FluxPipeline`` with weights drawn from ``seed`` (no file or network access)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from opd_bench.tiny.tokenizer import DEFAULT_WORDS, build_tokenizer

    config = config or TinyFluxConfig()
    levels = len(config.vae_channels)
    if config.image_size % (2 ** (levels - 1) * 2):
        raise ValueError("image_size must be divisible by the VAE downsampling times 2 (FLUX packs 2x2 patches)")
    if sum(config.rope_axes) != config.head_dim:
        raise ValueError(f"rope_axes {config.rope_axes} must sum to head_dim {config.head_dim}")
    words = config.words or DEFAULT_WORDS
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, words, config.max_prompt_tokens)
    tokenizer_2 = build_t5_tokenizer(words, config.max_prompt_tokens)
    text_encoder = _clip_encoder(config, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder_2 = _t5_encoder(config, len(tokenizer_2))
    # sample_size = image_size: the policy's default image size for FLUX (1024 on FLUX.1);
    # FLUX.1's VAE scale and shift, so decode's scale-and-shift path is exercised.
    vae = tiny_vae(config.vae_channels, config.latent_channels, config.image_size, scaling_factor=0.3611, shift_factor=0.1159)
    transformer = FluxTransformer2DModel(
        patch_size=1,  # FLUX patchifies outside the model, by packing 2x2 latent patches into channels
        in_channels=config.latent_channels * 4,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.t5_hidden,
        pooled_projection_dim=config.clip_hidden,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=config.rope_axes,
    )
    # FLUX.1-dev's scheduler config: the shift depends on the packed image sequence length.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_flux(folder: str | Path, seed: int = 0, config: TinyFluxConfig | None = None) -> Path:
    """Build a random tiny FLUX pipeline and save it as a diffusers folder; returns the folder."""
    return save_pipeline(build_flux_pipeline(seed, config), folder)


__all__ = ["TinyFluxConfig", "build_flux_pipeline", "build_t5_tokenizer", "save_tiny_flux"]
