"""``Policy``: one diffusers SD3 or FLUX.1 pipeline seen as a velocity field with named adapters.

Trainers never touch the pipeline directly; they ask the policy to encode prompts, to give the
(guided) velocity at a state, to switch adapter, and to decode latents. The same class serves
the embedded tiny pipelines, SD3.5-Medium and FLUX.1-dev / -schnell.

Families differ only in a small backend (``_SD3`` / ``_Flux``): how prompts are encoded, how the
transformer is called, the latent layout and the sampling schedule. The rollout state is always
the unpacked latent ``[B, C, h, w]``: FLUX's 2x2 token packing happens inside its backend's
forward, so the rollout, the SDE math and per-dimension log-probs are the same for both.

Adapters: one backbone holds any number of named LoRA adapters (peft). ``with policy.use(name)``
switches the active one for the calls inside; ``use(None)`` runs the adapter-free base, which is
the reference model for KL terms. Only adapters added with ``trainable=True`` ever receive
gradients: peft flips ``requires_grad`` whenever adapters are switched, so the policy restores the
intended flags after every switch.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from opd_bench.result_schema import MODEL_DTYPES

DEFAULT_LORA_TARGETS = (
    # The joint attention's projections, named alike in SD3's and FLUX's transformers. In FLUX the
    # to_q/to_k/to_v names also hit the single-stream blocks (which have no to_out: their output
    # goes through proj_out, shared with the MLP, left untargeted); add_*/to_add_out exist in the
    # double-stream blocks only.
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_UNKNOWN = object()  # peft's active adapter is not the one the policy last set
DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}  # by the names --dtype and results.json use


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on a GPU, as Flow-GRPO and the paper train; float32 on the CPU, where the
    tiny suite was trained and its comparison was measured."""
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return dtype


def check_device(device: str) -> None:
    """A one-line ``ValueError`` for a device name torch does not know, or hardware this machine lacks."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{device}: this machine has no usable CUDA GPU; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{device}: this machine has no usable MPS device; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{device}: opd-bench runs on cpu, cuda or mps")


class ModelLoadError(RuntimeError):
    """A model path or hub id that cannot be loaded; the message says what to do."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, with the unconditional ("") embeddings for guidance."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]
    negative_embeds: torch.Tensor  # [B, L, D]
    negative_pooled: torch.Tensor  # [B, P]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, index) -> "PromptEmbeds":
        return PromptEmbeds(*(t[index] for t in self._tensors()))

    def repeat_interleave(self, repeats: int) -> "PromptEmbeds":
        return PromptEmbeds(*(t.repeat_interleave(repeats, dim=0) for t in self._tensors()))

    def _tensors(self):
        return (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled)


QUIET_LOAD_BYTES = 256 * 2**20  # a pipeline this small loads in well under a second


@contextlib.contextmanager
def quiet_libraries(*, quiet_warnings: bool = False) -> Iterator[None]:
    """diffusers' and transformers' progress bars off (and, with ``quiet_warnings``, diffusers' warnings)
    for a block, then as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), (
        diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if quiet_warnings:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        for enabled, library in zip(bars, (diffusers_logging, transformers_logging)):
            if enabled:
                library.enable_progress_bar()


def _loads_in_a_blink(path: str) -> bool:
    """A local pipeline of under ``QUIET_LOAD_BYTES`` of weights (the tiny ones): its loading bars
    would flash past and stay in the output as clutter. A real model's load takes a while, and its
    bars say so."""
    folder = Path(path).expanduser()
    return folder.is_dir() and sum(f.stat().st_size for f in folder.glob("*/*.safetensors")) < QUIET_LOAD_BYTES


def _load_index(path: str) -> dict:
    """Read ``model_index.json`` from a local folder or the hub cache, with a clear error."""
    from diffusers import DiffusionPipeline

    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (local / "model_index.json").is_file():
        what = "does not exist" if not local.exists() else "has no model_index.json"
        raise ModelLoadError(
            f"model folder {str(local)!r} {what}; pass a diffusers pipeline folder "
            "(made by save_pretrained) or a hub id such as stabilityai/stable-diffusion-3.5-medium "
            "or black-forest-labs/FLUX.1-dev"
        )
    try:
        # Never download at run time: a hub id must already be in the hub cache.
        return dict(DiffusionPipeline.load_config(str(local) if looks_local else path, local_files_only=True))
    except (OSError, ValueError) as error:
        fix = ("Its model_index.json is damaged: rebuild the folder or copy it again." if looks_local else
               f"Download it on a machine with internet (`hf download {path}`) and copy the hub cache, or pass a local folder.")
        raise ModelLoadError(f"cannot load pipeline {path!r}: {str(error).splitlines()[0]} {fix}") from error


def check_pipeline(path: str, *, drop_t5: bool = False) -> dict:
    """The ``model_index.json`` of a pipeline ``from_pretrained`` can load (with ``drop_t5``), else a
    one-line ``ModelLoadError``; reads no weights, so a run checks its model before starting work."""
    index = _load_index(str(path))
    class_name = index.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(f"{str(path)!r} is a {class_name}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    if drop_t5:
        if class_name != "StableDiffusion3Pipeline":
            raise ModelLoadError("drop_t5 is for SD3 only: FLUX's text sequence comes from T5 alone")
        t5 = index.get("text_encoder_3")
        if not isinstance(t5, list) or t5[0] is None:
            raise ModelLoadError(f"drop_t5: {str(path)!r} has no T5 text encoder to drop; leave --drop-t5 out")
    return index


# ------------------------------------------------------------------------------- backends
# One small class per pipeline family: what differs between SD3 and FLUX, and nothing else.
# ``forward`` always takes and returns unpacked latents [B, C, h, w] and sigmas in [0, 1].


class _SD3:
    """SD3 / SD3.5: an MMDiT on [B, C, h, w] latents (it patchifies itself), timestep = 1000 sigma."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def guidance_embedded(self, transformer) -> bool:
        return False  # guidance is classifier-free: conditional and unconditional passes

    def default_max_sequence_length(self) -> int:
        # SD3 appends T5 tokens (zeros when T5 is dropped); with T5 the default is 256 as in diffusers.
        return 256 if self.pipeline.text_encoder_3 is not None else 1

    def default_size(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels

    def patch(self) -> int:
        """Latent pixels per side of one transformer token."""
        return self.pipeline.transformer.config.patch_size

    def max_side(self) -> int | None:
        """The largest image side the transformer's position embedding covers, in pixels."""
        config = self.pipeline.transformer.config
        tokens = getattr(config, "pos_embed_max_size", None)
        return tokens * config.patch_size * self.pipeline.vae_scale_factor if tokens else None

    def schedule_kwargs(self, num_steps: int, seq_len: int) -> dict:
        config = self.pipeline.scheduler.config
        return {"mu": _resolution_shift(seq_len, config)} if config.get("use_dynamic_shifting", False) else {}

    def encode(self, prompts: list[str], device, max_sequence_length: int):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled

    def forward(self, transformer, latents, sigma, embeds, pooled, guidance=None) -> torch.Tensor:
        scale = self.pipeline.scheduler.config.num_train_timesteps
        return transformer(
            hidden_states=latents,
            timestep=sigma * scale,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


class _Flux:
    """FLUX.1: 2x2 latent patches packed into tokens, RoPE position ids, timestep = sigma.

    FLUX.1-dev is guidance-distilled (``guidance_embeds``): the guidance scale is an input of a
    single forward. Without it (schnell-like) guidance is classifier-free, as for SD3.
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def guidance_embedded(self, transformer) -> bool:
        return bool(transformer.config.guidance_embeds)

    def default_max_sequence_length(self) -> int:
        return min(512, self.pipeline.tokenizer_2.model_max_length)  # 512: FluxPipeline's default and limit

    def default_size(self) -> int:
        # FluxPipeline hard-codes 1024 px; the VAE's sample size says the same for FLUX.1 (1024)
        # and gives the tiny pipeline its own size.
        size = self.pipeline.vae.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels // 4  # in_channels counts packed 2x2 patches

    def patch(self) -> int:
        return 2

    def max_side(self) -> None:
        return None  # rotary position embeddings: no fixed largest size

    def schedule_kwargs(self, num_steps: int, seq_len: int) -> dict:
        # As FluxPipeline: explicit linear sigmas 1 .. 1/N, shifted by mu of the packed sequence length.
        # (The scheduler's own spacing would end at 1/1000 instead of 1/N.)
        config = self.pipeline.scheduler.config
        kwargs = {"mu": _resolution_shift(seq_len, config)}
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return kwargs

    def encode(self, prompts: list[str], device, max_sequence_length: int):
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled

    def forward(self, transformer, latents, sigma, embeds, pooled, guidance=None) -> torch.Tensor:
        batch, _, height, width = latents.shape
        packed = pack_latents(latents)
        # Position ids as FluxPipeline makes them: text tokens all 0, image tokens (0, row, column).
        rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
        txt_ids = torch.zeros(embeds.shape[1], 3)
        if guidance is not None:
            guidance = torch.full((batch,), float(guidance), dtype=torch.float32, device=latents.device)
        out = transformer(
            hidden_states=packed,
            timestep=sigma,  # FLUX's transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids.to(latents.device, latents.dtype),
            img_ids=img_ids.to(latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> FLUX tokens [B, (h/2)(w/2), 4C] (2x2 patches, channel-major within a token)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of size ``height x width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


_BACKENDS = {"StableDiffusion3Pipeline": _SD3, "FluxPipeline": _Flux}


def check_max_batch(value: int | None) -> int | None:
    """``value`` if it can be ``Policy.max_batch`` (an integer >= 1, or None), else a one-line error."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"max_batch must be an integer >= 1, or None for no limit; got {value!r}")
    return value


class Policy:
    def __init__(
        self,
        pipeline,
        *,
        max_sequence_length: int | None = None,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
        resolution: int | None = None,
        max_batch: int | None = None,
    ):
        name = type(pipeline).__name__
        if name not in SUPPORTED_PIPELINES:
            raise ModelLoadError(f"{name} is not supported; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}")
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self._backend = _BACKENDS[name](pipeline)
        self.max_sequence_length = max_sequence_length or self._backend.default_max_sequence_length()
        # Image side every rollout uses unless told otherwise: suites fix it (SD3.5-M is trained
        # and evaluated at 512 px in the paper, though the pipeline's own default is 1024).
        self.resolution = resolution
        if resolution is not None:
            self.latent_shape(1)  # a side the transformer cannot draw is named now, not at the first image
        for module in self._modules():
            module.requires_grad_(False)
        if gradient_checkpointing:
            # Recompute block activations in backward: LoRA and full copies (deep-copied with the
            # flag) still get gradients, as diffusers checkpoints non-reentrantly.
            self.transformer.enable_gradient_checkpointing()
        # Frozen text encoders can wait on the CPU and visit the policy's device only inside
        # encode(), once per batch: FLUX's T5-XXL alone is ~9.5 GB in bf16 (SD3.5's too), memory
        # that the transformer(s) and training activations need far more often.
        self.offload_text_encoders = offload_text_encoders
        if offload_text_encoders:
            for encoder in self._text_encoders():
                encoder.to("cpu")
        # A rollout forwards all its samples at once (a Flow-GRPO teacher of the paper preset: 16 x 24
        # images, twice that with guidance) and decodes them at once; the VAE's 512 px activations
        # alone take ~0.25 GB an image. max_batch cuts no-grad forwards and decodes into chunks.
        self.max_batch = check_max_batch(max_batch)
        self._trainable: set[str] = set()
        self._adapter_configs: dict[str, object] = {}
        self._active: str | None = None
        # peft's LoRA layers and their parameters, found once per added adapter: diffusers' own
        # set_adapter / enable_adapters walk every module and check peft's version on each call
        # (~5 ms a switch on the tiny model, several per training step).
        self._lora_layers: list = []
        self._lora_params: list[tuple[torch.nn.Parameter, str]] = []
        # Device and dtype come from one parameter: diffusers' ModelMixin.device/.dtype walk
        # every module (~0.7 ms each, dozens of look-ups per step). Module.to() keeps Parameter
        # objects and swaps their data, so this stays right after the pipeline is moved.
        self._probe = next(self.transformer.parameters())
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None
        self._encodable: set[str] = set()  # prompts check_encodable has passed
        # Full-parameter students: name -> a trainable copy of the transformer (the base stays frozen).
        self._full: dict[str, torch.nn.Module] = {}
        self._sources: dict[str, Path] = {}  # adapter -> the folder it was loaded from
        # Sample-forwards of the transformer per adapter (None = base); CFG-guided calls count 2.
        self.forward_counts: dict[str | None, int] = {}

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int | None = None,
        drop_t5: bool = False,
        gradient_checkpointing: bool = False,
        offload_text_encoders: bool = False,
        resolution: int | None = None,
        max_batch: int | None = None,
        **components,
    ) -> "Policy":
        """Load a diffusers SD3-family or FLUX.1 pipeline by local folder or hub id, or the shipped
        model by its alias (``"tiny"``), as ``--model`` takes them.

        Components listed as absent in ``model_index.json`` (e.g. no T5) are passed as ``None``;
        ``drop_t5=True`` skips T5 on an SD3 pipeline that has it (saves ~10 GB on SD3.5).
        ``gradient_checkpointing`` trades compute for activation memory in training;
        ``offload_text_encoders`` keeps the text encoders on the CPU between ``encode`` calls;
        ``resolution`` sets the default image side (None: the pipeline's own default);
        ``max_batch`` is the most samples one no-grad transformer forward (2x that in inputs with
        classifier-free guidance) or VAE decode takes (larger batches go in chunks; None: no limit).
        """
        import diffusers

        from opd_bench.suites import resolve_model

        path = resolve_model(str(path))
        index = check_pipeline(path, drop_t5=drop_t5)
        class_name = index["_class_name"]
        absent = {key: None for key, value in index.items() if isinstance(value, list) and value[0] is None}
        if drop_t5:
            absent.update(text_encoder_3=None, tokenizer_3=None)
        try:
            with quiet_libraries() if _loads_in_a_blink(path) else contextlib.nullcontext():
                pipeline = getattr(diffusers, class_name).from_pretrained(
                    path, dtype=dtype, local_files_only=True, **{**absent, **components}
                )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load pipeline {path!r}: {str(error).splitlines()[0]}") from error
        pipeline.set_progress_bar_config(disable=True)
        for name, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module):  # text encoders never reach the device when offloaded
                module.to("cpu" if offload_text_encoders and name in TEXT_ENCODERS else device)
        return cls(
            pipeline,
            max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing,
            offload_text_encoders=offload_text_encoders,
            resolution=resolution,
            max_batch=max_batch,
        )

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipeline, name, None) for name in TEXT_ENCODERS) if m is not None]

    def _modules(self):
        return [m for m in (self.pipeline.transformer, self.pipeline.vae, *self._text_encoders()) if m is not None]

    @property
    def device(self) -> torch.device:
        return self._probe.device

    @property
    def dtype(self) -> torch.dtype:
        return self._probe.dtype

    # ------------------------------------------------------------------------------- shapes
    def default_size(self) -> tuple[int, int]:
        size = self.resolution or self._backend.default_size()
        return size, size

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """The (unpacked) latent state ``[B, C, h, w]`` of images ``height x width``."""
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        scale = self.pipeline.vae_scale_factor
        factor = scale * self._backend.patch()
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}; ask for a multiple of "
                             f"{factor} (--resolution, or the sd suite config's \"resolution\")")
        largest = self._backend.max_side()
        if largest is not None and max(height, width) > largest:
            raise ValueError(f"{height}x{width} px is larger than this pipeline's transformer draws (at most {largest} px per "
                             f"side); ask for at most {largest} (--resolution, or the sd suite config's \"resolution\": a "
                             "`build-tiny` stand-in draws 64 px)")
        return (batch, self._backend.latent_channels(), height // scale, width // scale)

    def sigmas(self, num_steps: int, latent_shape: Sequence[int]) -> torch.Tensor:
        """The scheduler's sigma schedule, ``num_steps + 1`` values from ~1 down to 0 (float32, CPU)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        patch = self._backend.patch()
        seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)  # image tokens (packed for FLUX)
        kwargs = self._backend.schedule_kwargs(num_steps, seq_len)
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.detach().float().cpu().clone()

    # ------------------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode a batch of prompts once; the unconditional embedding is computed once and cached."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        self.check_encodable(prompts)
        with self._text_encoders_on_device():
            embeds, pooled = self._backend.encode(list(prompts), self.device, self.max_sequence_length)
            if self._negative is None:
                self._negative = self._backend.encode([""], self.device, self.max_sequence_length)
        batch = len(prompts)
        negative, negative_pooled = self._negative
        return PromptEmbeds(
            embeds.to(self.dtype),
            pooled.to(self.dtype),
            negative.expand(batch, -1, -1).to(self.dtype),
            negative_pooled.expand(batch, -1).to(self.dtype),
        )

    def check_encodable(self, prompts: Sequence[str]) -> None:
        """Refuse a prompt that a tokenizer would cut short.

        The tiny base's tokenizers know printable ASCII only, and their unknown token is the end
        token: CLIP pools at the first end token and attends backwards, so everything after an
        "é" would silently not reach the model. Real CLIP tokenizers cover every byte and pass.
        """
        for prompt in dict.fromkeys(prompts):
            if prompt in self._encodable:
                continue
            for name in ("tokenizer", "tokenizer_2"):
                tokenizer = getattr(self.pipeline, name, None)
                end = getattr(tokenizer, "eos_token_id", None)
                if end is None or getattr(tokenizer, "unk_token_id", None) != end:
                    continue
                if end in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
                    unknown = [c for c in dict.fromkeys(prompt) if end in tokenizer(c, add_special_tokens=False)["input_ids"]]
                    what = f"characters its {name} cannot encode ({''.join(unknown)!r})" if unknown else f"{tokenizer.eos_token!r}"
                    raise ValueError(f"prompt {prompt!r} holds {what}, which would end it there and drop the rest; "
                                     "write it in printable ASCII for this model")
            self._encodable.add(prompt)

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With offloading, bring the text encoders to the policy's device for the enclosed calls."""
        encoders = self._text_encoders() if self.offload_text_encoders else []
        for encoder in encoders:
            encoder.to(self.device)
        try:
            yield
        finally:
            for encoder in encoders:
                encoder.to("cpu")

    # ----------------------------------------------------------------------------- velocity
    def velocity(
        self,
        latents: torch.Tensor,
        sigma,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity at ``(latents, sigma)``, guided by ``guidance_scale``, in one transformer forward
        (without gradients, one per ``max_batch`` samples).

        Classifier-free guidance batches the conditional and unconditional halves; guidance-
        distilled models (FLUX.1-dev) take the scale as an input instead. ``sigma`` is a scalar or
        ``[B]``; gradients flow when called outside ``no_grad``.

        ``detach_uncond``: the unconditional half is a constant for autograd (``noise_pred_uncond.detach()``,
        as some Flow-GRPO versions train), so gradients flow through the conditional half only.
        With gradients enabled it then runs as its own forward under ``no_grad`` (two transformer
        calls of ``B`` instead of one of ``2B``; the same sample-forwards, values and gradients),
        which spares the backward pass and the stored activations of that half.
        """
        batch = latents.shape[0]
        if len(cond) != batch:
            raise ValueError(f"{batch} latents but {len(cond)} prompt embeddings")
        size = self.max_batch
        if size is not None and batch > size and not torch.is_grad_enabled():  # training micro-batches set their own size
            sigmas = torch.as_tensor(sigma, dtype=torch.float32).expand(batch)
            return torch.cat([self.velocity(latents[i : i + size], sigmas[i : i + size], cond.select(slice(i, i + size)),
                                            guidance_scale, detach_uncond=detach_uncond) for i in range(0, batch, size)])
        device, dtype = self._probe.device, self._probe.dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(batch)
        latents = latents.to(dtype)
        transformer = self._full.get(self._active, self.transformer)
        forward = self._backend.forward
        if self._backend.guidance_embedded(transformer):
            self._count(batch)
            return forward(transformer, latents, sigma, cond.embeds, cond.pooled, guidance=guidance_scale)
        if guidance_scale == 1.0:
            self._count(batch)
            return forward(transformer, latents, sigma, cond.embeds, cond.pooled)
        self._count(2 * batch)
        if detach_uncond and torch.is_grad_enabled():
            with torch.no_grad():
                uncond = forward(transformer, latents, sigma, cond.negative_embeds, cond.negative_pooled)
            text = forward(transformer, latents, sigma, cond.embeds, cond.pooled)
            return uncond + guidance_scale * (text - uncond)
        both = forward(
            transformer,
            torch.cat([latents, latents]),
            torch.cat([sigma, sigma]),
            torch.cat([cond.negative_embeds, cond.embeds]),
            torch.cat([cond.negative_pooled, cond.pooled]),
        )
        uncond, text = both.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def _count(self, passes: int) -> None:
        self.forward_counts[self._active] = self.forward_counts.get(self._active, 0) + passes

    # ------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images ``[B, 3, H, W]`` in ``[0, 1]``.

        The same for both families: the state is never packed, and both VAEs undo a scale and shift.
        """
        size = self.max_batch
        if size is not None and len(latents) > size:
            return torch.cat([self.decode(latents[i : i + size]) for i in range(0, len(latents), size)])
        vae = self.pipeline.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> latents, the inverse of ``decode`` (the VAE's
        posterior mean, scaled and shifted as the sampler's states are): what a loss that fits
        given images works on."""
        vae = self.pipeline.vae
        latents = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    # ----------------------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        return list(self._adapter_configs) + list(self._full)

    def adapter_source(self, name: str) -> Path | None:
        """The folder adapter ``name`` was loaded from (``load_adapter``); None for one made here."""
        return self._sources.get(name)

    def add_full_copy(self, name: str, *, trainable: bool = True) -> None:
        """Add a full-parameter copy of the transformer named ``name``, used like an adapter.

        For full fine-tuning: ``use(name)`` runs the copy, ``use(None)`` the untouched base, which
        stays the reference. Costs one more transformer in memory.
        """
        import copy

        if name in self.adapters or not name or name == "base":
            raise ValueError(f"cannot add {name!r}: names must be new, non-empty and not 'base'; adapters: {self.adapters}")
        if trainable and self.dtype != torch.float32:
            warnings.warn(f"the full-parameter copy {name!r} trains in {str(self.dtype).removeprefix('torch.')}, where Adam's "
                          "small updates mostly round away; train full copies in float32 (--dtype float32) or use LoRA",
                          stacklevel=2)
        replica = copy.deepcopy(self.transformer)
        if getattr(replica, "_hf_peft_config_loaded", False):
            replica.disable_adapters()  # LoRA layers copied from the base stay off and frozen
        for param_name, param in replica.named_parameters():
            param.requires_grad_(trainable and ".lora_" not in param_name)
        self._full[name] = replica

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def add_adapter(
        self,
        name: str,
        *,
        rank: int = 32,
        alpha: float = 64,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        trainable: bool = True,
        init: bool | str = True,
        seed: int | None = None,
    ) -> None:
        """Add a LoRA adapter (zero-initialised B, so it starts equal to the base).

        ``seed`` makes the random A matrices reproducible (they shape the first gradients).
        """
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self._add(name, config, trainable)

    def _add(self, name: str, config, trainable: bool) -> None:
        if name in self._adapter_configs:
            raise ValueError(f"adapter {name!r} already exists; adapters: {self.adapters}")
        if not name or name == "base":
            raise ValueError("adapter names must be non-empty and not 'base' (the adapter-free model)")
        previous = self._active
        with warnings.catch_warnings():  # peft warns on every adapter after the first
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.transformer.add_adapter(config, adapter_name=name)
        self._adapter_configs[name] = config
        if trainable:
            self._trainable.add(name)
        self._find_lora()
        if self.dtype != torch.float32:
            # Adapter weights stay float32 on a bf16 base (as in diffusers' LoRA scripts and Flow-GRPO):
            # in bf16's 8-bit mantissa Adam's small updates would round away, and saved adapters keep
            # their full precision. peft casts each layer's input up and the sum back to the base dtype.
            for param, adapter in self._lora_params:
                if adapter == name:
                    param.data = param.data.float()
        self._active = _UNKNOWN  # peft has just activated the new adapter: force the switch back
        self._activate(previous)

    def _find_lora(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        self._lora_params = [
            (param, param_name.rsplit(".", 2)[-2])
            for param_name, param in self.transformer.named_parameters()
            if ".lora_" in param_name
        ]

    def save_adapter(self, name: str, folder: str | Path) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format), or a
        full copy's ``full_model.safetensors``."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if name in self._full:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            state = {n: p.detach().contiguous().cpu() for n, p in self._full[name].named_parameters() if ".lora_" not in n}
            save_file(state, folder / "full_model.safetensors")
            return folder
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / "adapter_model.safetensors")
        self._adapter_configs[name].save_pretrained(str(folder))
        _sort_config_lists(folder / "adapter_config.json")
        return folder

    def load_adapter(self, name: str, folder: str | Path, *, trainable: bool = False) -> None:
        """Load an adapter written by ``save_adapter`` (frozen unless ``trainable``)."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / "full_model.safetensors").is_file():
            self.add_full_copy(name, trainable=trainable)
            self.copy_adapter_weights(name, folder)
            self._sources[name] = folder.resolve()
            return
        weights = folder / "adapter_model.safetensors"
        if not (folder / "adapter_config.json").is_file() or not weights.is_file():
            hint = (f"; it is a training run's folder, its trained adapter is {folder / 'final'}"
                    if (folder / "final" / "adapter_config.json").is_file() else " (written by Policy.save_adapter)")
            raise FileNotFoundError(f"adapter folder {str(folder)!r} needs adapter_config.json and adapter_model.safetensors{hint}")
        try:
            config, state = LoraConfig.from_pretrained(str(folder)), load_file(weights)
        except Exception as error:  # noqa: BLE001 - json's, safetensors' and peft's own errors alike
            raise ModelLoadError(f"adapter {str(folder)!r} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                                 "its adapter_config.json or adapter_model.safetensors is damaged, copy or train it again") from None
        self._add(name, config, trainable)
        try:
            result = set_peft_model_state_dict(self.transformer, state, adapter_name=name)
        except RuntimeError as error:  # torch lists every tensor of another shape
            if "size mismatch" not in str(error):
                raise
            first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
            first = first.split(", copying a param")[0].rstrip(":")  # torch's line: "size mismatch for NAME: copying a param with shape ..."
            raise ModelLoadError(f"adapter {str(folder)!r} was trained on a model of another shape ({first}); "
                                 "load it on the model it was trained from") from None
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter {str(folder)!r} does not fit this model: {result.unexpected_keys[:3]}...")
        self._sources[name] = folder.resolve()

    def copy_adapter_weights(self, name: str, folder: str | Path) -> None:
        """Overwrite the weights of existing adapter ``name`` with those saved in ``folder``."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if name in self._full:
            with torch.no_grad():
                self._full[name].load_state_dict(load_file(Path(folder) / "full_model.safetensors"), strict=False)
            return
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters}")
        set_peft_model_state_dict(self.transformer, load_file(Path(folder) / "adapter_model.safetensors"), adapter_name=name)
        self._restore_trainable()

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator["Policy"]:
        """Run the enclosed calls with adapter ``name`` (``None``: the adapter-free base)."""
        previous = self._active
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(previous)

    def _activate(self, name: str | None) -> None:
        if name == self._active:
            return  # nested use() of the active adapter: nothing to switch
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters} (None = the base model)")
        if self._adapter_configs:
            # What diffusers' disable_adapters / set_adapter + enable_adapters do, on the cached layers.
            off = name is None or name in self._full
            for layer in self._lora_layers:
                if off:
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(name)
                    layer.enable_adapters(True)
            self._restore_trainable()
        self._active = name

    def _restore_trainable(self) -> None:
        for param, adapter in self._lora_params:
            param.requires_grad_(adapter in self._trainable)

    def equals_base(self, name: str | None) -> bool:
        """Whether adapter ``name`` computes exactly what the base does: a LoRA adapter whose every
        ``lora_B`` is zero (as added, before its first update; peft then adds exact zeros). DoRA
        rescales even then, and a full copy is never assumed equal."""
        if name is None:
            return True
        config = self._adapter_configs.get(name)
        if config is None or getattr(config, "use_dora", False):
            return False
        suffix = f".{name}.weight"
        with torch.no_grad():
            return all(not p.any() for n, p in self.transformer.named_parameters() if "lora_B" in n and n.endswith(suffix))

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter ``name`` (what an optimizer of that adapter should get)."""
        if name in self._full:
            return [p for n, p in self._full[name].named_parameters() if ".lora_" not in n]
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters}")
        suffix = f".{name}.weight"
        return [p for n, p in self.transformer.named_parameters() if ".lora_" in n and n.endswith(suffix)]


def _resolution_shift(seq_len: int, config) -> float:
    """diffusers' ``calculate_shift``: the resolution-dependent ``mu`` of dynamic shifting (FLUX-style).

    ``seq_len`` counts image tokens (packed 2x2 patches for FLUX); defaults are diffusers'.
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + (base_shift - slope * base_len)


def _sort_config_lists(path: Path) -> None:
    """peft writes set-valued fields (``target_modules``) in hash order, which changes from one
    process to the next, so the same weights would get another adapter sha256 in every process."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):  # sets of module names
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["Policy", "PromptEmbeds", "ModelLoadError", "DEFAULT_LORA_TARGETS", "pack_latents", "unpack_latents"]
