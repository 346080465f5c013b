"""Pretrain the tiny suite's base model from scratch: data, VAE, then the MMDiT + text encoders.

``opd-bench pretrain base --out DIR`` runs :func:`pretrain_base`. Steps:

1. render ``num_images`` scenes from the three train prompt files (seeded) and give each a
   web-like caption (:mod:`opd_bench.tiny.captions`), drawn afresh each time the scene is sampled;
2. train the AutoencoderKL on the images (L1 + MSE + a small KL), then encode every image once and
   set the VAE's ``shift_factor`` / ``scaling_factor`` to the latents' mean and 1 / std;
3. train the transformer and both CLIP text encoders jointly with the rectified-flow loss
   (SD3's logit-normal timesteps, ``v = eps - x0``), captions dropped to "" at ``cfg_dropout`` so
   classifier-free guidance works; the transformer's EMA weights are saved, beside the text
   encoders' last weights (they have no EMA).

The result is an ordinary diffusers folder that ``Policy.from_pretrained`` loads like SD3.5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opd_bench.tiny.build import TinyConfig

PROMPT_DIR = Path(__file__).resolve().parent.parent / "suites" / "tiny" / "prompts"


def base_architecture(words: list[str] | None = None, config: "PretrainConfig | None" = None) -> TinyConfig:
    """The base model's sizes, read from a :class:`PretrainConfig` (its defaults are the shipped
    base's; see docs/tiny_base.md for why each was chosen)."""
    config = config or PretrainConfig()
    return TinyConfig(
        vae_channels=tuple(config.vae_channels),
        latent_channels=config.latent_channels,
        vae_norm_groups=2,  # 1 channel per group normalised each channel's level away: colours drifted
        vae_mid_attention=False,  # fully convolutional: trained on crops, 4x cheaper per image
        patch_size=config.patch_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        head_dim=32,
        text_hidden=48,
        text_layers=config.text_layers,
        text_heads=2,
        text_projection=48,
        max_prompt_tokens=24,
        words=words,
        char_tokens=config.char_tokens,
    )


@dataclass
class PretrainConfig:
    seed: int = 0
    num_images: int = 24_000
    mixture: dict = field(default_factory=lambda: {"geneval": 0.4, "ocr": 0.35, "pref": 0.25})
    # Relative weights of GenEval tags within the geneval share (a tag left out weighs 1; empty: the
    # train file's own balance, one sixth each) and position scenes with two colours named and drawn:
    # what taught a base the relation, with sigma_shift (probes J1-J12 in docs/benchmarks.md).
    tag_weights: dict = field(default_factory=dict)
    coloured_position: bool = False
    vae_steps: int = 2000
    vae_batch: int = 64
    vae_crop: int = 32  # the VAE trains on random crops of this side (it is fully convolutional)
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # 1e-6 left the latent unregularised (docs/tiny_base.md, probes)
    reconstruction_limit: int = 48  # test prompts per task for the VAE's reconstruction scores (0: skip)
    # Architecture (see base_architecture). The VAE downsamples 2 ** (len(vae_channels) - 1) times.
    vae_channels: tuple = (8, 16, 32)  # full-resolution convolutions dominate the VAE's cost on a CPU
    latent_channels: int = 4  # 16 channels at KL 1e-6 gave the v3 blobs; 4 at 1e-4 is smoother
    patch_size: int = 2  # 16x16 latents -> 64 tokens (patch 4 starved the output projection: v1; a block grid: P1)
    text_layers: int = 2
    char_tokens: bool = True  # quoted text as one token per character, case kept (see tiny/tokenizer.py)
    steps: int = 28000  # OCR 0.05 at 14,000 steps, 0.34 at 28,000, 0.62 at 34,000 (docs/tiny_base.md, budget rows)
    num_layers: int = 4  # transformer depth; the shipped base's
    num_heads: int = 3  # transformer width = 32 x num_heads
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    cfg_dropout: float = 0.1
    sigma_shift: float = 1.0  # > 1 draws the training sigmas towards pure noise, where the layout is decided (probe J7)
    # Time budget of the transformer phase: after 20 steps the step count is cut to what fits
    # (the cosine schedule then ends on time); the steps actually run are recorded.
    max_minutes: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        from opd_bench.training import check_fields, check_field_types
        from opd_bench.world.spec import IMAGE_SIZE

        check_field_types("pretrain config", self)
        check_fields("pretrain config", self, {  # a 0-step or 0-layer base saved as if trained, or a late traceback
            name: (getattr(self, name) >= 1, ">= 1") for name in
            ("num_images", "vae_steps", "vae_batch", "steps", "batch", "num_layers", "num_heads", "text_layers", "latent_channels")
        } | {"seed": (self.seed >= 0, ">= 0"), "sigma_shift": (self.sigma_shift > 0, "> 0 (1: unshifted)"),
             "max_minutes": (self.max_minutes is None or self.max_minutes > 0, "> 0, or null"),
             "warmup": (self.warmup >= 0, ">= 0 (0: none)"), "ema": (0 <= self.ema < 1, "in [0, 1)"),
             "cfg_dropout": (0 <= self.cfg_dropout <= 1, "in [0, 1]"),
             # crops are VAE training images: a whole number of latent pixels, inside the rendered side
             "vae_crop": (0 < self.vae_crop <= IMAGE_SIZE and self.vae_crop % 2 ** (len(self.vae_channels) - 1) == 0,
                          f"a multiple of {2 ** (len(self.vae_channels) - 1)} (the VAE's downsampling) up to {IMAGE_SIZE}")})
        from opd_bench.geneval import TAGS

        odd = sorted(set(self.tag_weights) - set(TAGS))
        if odd:
            raise ValueError(f"tag_weights names {odd[0]!r}; the GenEval tags are {', '.join(TAGS)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.tag_weights.values()) or (
                self.tag_weights and not sum(self.tag_weights.get(t, 1) for t in TAGS)):
            raise ValueError(f"tag_weights must be numbers >= 0, not all 0; got {self.tag_weights}")
        unknown = sorted(set(self.mixture) - {"geneval", "ocr", "pref"})
        if unknown:
            raise ValueError(f"mixture names {unknown[0]!r}; its tasks are geneval, ocr and pref")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.mixture.values()):
            raise ValueError(f"mixture weights must be numbers >= 0; got {self.mixture}")
        if abs(sum(self.mixture.values()) - 1) > 1e-6:
            raise ValueError(f"mixture weights must sum to 1, got {self.mixture}")
        if self.num_images < self.batch:
            raise ValueError("num_images must be at least one batch")
        try:  # the name only: whether this machine has the device is the command's check (--device)
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {self.device!r} is not a device; use cpu, cuda or cuda:N") from None


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_records(config: PretrainConfig) -> tuple[list[dict], list[str]]:
    """Sample ``num_images`` train records by the mixture; also return the prompt vocabulary."""
    from opd_bench.tiny.captions import vocabulary

    rng = np.random.default_rng([config.seed, 11])
    pools = {name: _read(PROMPT_DIR / f"{name}_train.jsonl") for name in config.mixture}
    tests = [r for name in config.mixture for r in _read(PROMPT_DIR / f"{name}_test.jsonl")]
    names = list(config.mixture)
    picks = rng.choice(len(names), size=config.num_images, p=[config.mixture[n] for n in names])
    from opd_bench.geneval import TAGS

    weights = np.array([config.tag_weights.get(tag, 1) for tag in TAGS], dtype=float)
    by_tag = {tag: [r for r in pools.get("geneval", []) if r["tag"] == tag] for tag in TAGS} if config.tag_weights else {}
    tags = np.random.default_rng([config.seed, 13])  # its own draws: weights change no OCR or pref scene

    def draw(name: str) -> dict:
        pool = pools[name]
        if name == "geneval" and config.tag_weights:  # the tag first, by weight (without weights: the file's balance)
            pool = by_tag[TAGS[int(tags.choice(len(TAGS), p=weights / weights.sum()))]]
        return pool[int(rng.integers(len(pool)))]

    records = [draw(names[k]) for k in picks]
    if config.coloured_position:
        from opd_bench.world.prompts import coloured_position

        colours = np.random.default_rng([config.seed, 17])
        records = [coloured_position(r, colours) if r.get("tag") == "position" else r for r in records]
    words = vocabulary([r for pool in pools.values() for r in pool] + tests + records)  # records: coloured prompts
    return records, words


def render_dataset(records: list[dict], seed: int) -> torch.Tensor:
    """uint8 images [N, 3, 64, 64]; record i drawn with seed ``seed * 10**6 + i``."""
    from tqdm import tqdm

    from opd_bench.world.render import render

    out = torch.empty(len(records), 3, 64, 64, dtype=torch.uint8)
    for i, record in enumerate(tqdm(records, desc="render", unit="img", mininterval=2)):
        out[i] = torch.from_numpy(np.array(render(record, seed * 10**6 + i).convert("RGB"))).permute(2, 0, 1)
    return out


def _to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def _random_crops(images: torch.Tensor, batch: int, side: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.randint(len(images), (batch,), generator=generator).tolist()
    corners = torch.randint(images.shape[-1] - side + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([images[i, :, y : y + side, x : x + side] for i, (y, x) in zip(index, corners)])


def train_vae(vae, images: torch.Tensor, config: PretrainConfig, log) -> None:
    from tqdm import tqdm

    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    bar = tqdm(range(config.vae_steps), desc="vae", mininterval=2)
    for step in bar:
        lr = config.vae_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / config.vae_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _to_unit(_random_crops(images, config.vae_batch, config.vae_crop, generator)).to(config.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + config.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.vae_steps - 1:
            log({"phase": "vae", "step": step, "loss": loss.item(), "recon": rec.item(), "kl": kl.item()})
            bar.set_postfix(recon=f"{rec.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_scores(vae, limit: int = 48, device: str = "cpu") -> dict[str, float]:
    """GenEval-style and OCR scores of the renderer's test images after a VAE round trip: an
    upper bound on what any denoiser over these latents can reach (a blurry or colour-shifting
    VAE caps the whole suite, which is what sank the first CPU base)."""
    from opd_bench import suites
    from opd_bench.evaluate import evaluate_benchmark, renderer_source

    render = renderer_source()

    def through_vae(prompts, seed, offset):
        x = render(prompts, seed, offset).to(device) * 2 - 1
        return ((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).cpu()

    suite = suites.get("tiny")
    return {
        task: evaluate_benchmark(suite.benchmark(task), through_vae, limit=limit, images_per_prompt=1, progress=False)["score"]
        for task in ("geneval", "ocr")
    }


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, device: str, batch: int = 256) -> torch.Tensor:
    latents = [vae.encode(_to_unit(images[i : i + batch]).to(device)).latent_dist.mean.cpu() for i in range(0, len(images), batch)]
    return torch.cat(latents)


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``sigma`` moved towards 1 as the sampler's flow shift moves its schedule (1: unchanged)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def logit_normal(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` sigmas in (0, 1), logit-normal: most of them mid-way, as rectified-flow training draws them."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def train_denoiser(pipeline, latents: torch.Tensor, records: list[dict], config: PretrainConfig, log,
                   train_text_encoders: bool = True) -> dict:
    """Train the transformer (and, unless ``train_text_encoders`` is False, both text encoders) jointly."""
    from tqdm import tqdm

    from opd_bench.tiny.captions import web_caption

    transformer = pipeline.transformer
    text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2] if train_text_encoders else []
    modules = [transformer, *text_encoders]
    params = [p for m in modules for p in m.parameters()]
    for module in modules:
        module.train().requires_grad_(True)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(config.seed + 2)
    caption_rng = np.random.default_rng([config.seed, 3])
    start, total = time.time(), config.steps
    bar = tqdm(total=total, desc="denoiser", mininterval=2)
    step = 0
    while step < total:
        if step == 20 and config.max_minutes is not None:
            per_step = (time.time() - start) / 20
            total = max(21, min(total, int(60 * config.max_minutes / per_step)))
            bar.total = total
            log({"phase": "denoiser", "planned_steps": total, "seconds_per_step": per_step})
        lr = config.lr * min(1.0, (step + 1) / max(config.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(latents), (config.batch,), generator=generator)
        captions = [
            "" if caption_rng.random() < config.cfg_dropout else web_caption(records[i], caption_rng)
            for i in index.tolist()
        ]
        x0 = latents[index].to(config.device)
        noise = torch.randn(x0.shape, generator=generator).to(config.device)
        sigma = shifted(logit_normal(config.batch, generator), config.sigma_shift).to(config.device)
        xs = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=config.device,
            do_classifier_free_guidance=False, max_sequence_length=1,
        )
        velocity = transformer(
            hidden_states=xs, timestep=sigma * 1000, encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == total - 1:
            log({"phase": "denoiser", "step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        step += 1
        bar.update()
    bar.close()
    done = step
    transformer.load_state_dict(ema.state_dict())
    for module in modules:
        module.eval().requires_grad_(False)
    return {"denoiser_steps": done, "denoiser_seconds": time.time() - start}


def pretrain_base(out_dir: str | Path, config: PretrainConfig | None = None) -> dict:
    """Run the whole pretraining and save the pipeline to ``out_dir``; returns a summary."""
    from opd_bench.io import atomic_write_json, sync_folder
    from opd_bench.tiny.build import build_pipeline, save_pipeline

    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    # Written beside the pipeline's log and moved over it at the end: a killed rebuild (--force)
    # leaves the old weights with their own log, and its partial log beside them.
    log_path = out_dir / "pretrain_log.jsonl.partial"
    log_file = log_path.open("w")

    def log(record: dict) -> None:
        log_file.write(json.dumps({"time": round(time.time() - t0, 2), **record}) + "\n")
        log_file.flush()

    t0 = time.time()
    records, words = training_records(config)
    images = render_dataset(records, config.seed)
    t_render = time.time() - t0
    architecture = base_architecture(words, config)
    pipeline = build_pipeline(architecture, seed=config.seed).to(config.device)
    train_vae(pipeline.vae, images, config, log)
    t_vae = time.time() - t0 - t_render
    vae_bound = {}
    if config.reconstruction_limit:
        vae_bound = reconstruction_scores(pipeline.vae, limit=config.reconstruction_limit, device=config.device)
        log({"phase": "vae", "reconstruction_scores": vae_bound})
    latents = encode_dataset(pipeline.vae, images, config.device)
    shift, scale = float(latents.mean()), float(1 / latents.std())
    pipeline.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    summary = train_denoiser(pipeline, latents, records, config, log)
    # The new pipeline is saved beside the old one and moved in by renames, model_index.json (what
    # makes the folder a pipeline) last, so a kill while saving also leaves the old one whole.
    staging = out_dir / ".pretrain.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(pipeline.to("cpu"), staging)
    summary.update(
        render_seconds=t_render, vae_seconds=t_vae, vae_reconstruction_scores=vae_bound, total_seconds=time.time() - t0,
        latent_shift=shift, latent_scale=scale, config=asdict(config), architecture=architecture.to_dict(),
        torch=torch.__version__, threads=torch.get_num_threads(),
    )
    atomic_write_json(staging / "pretrain_info.json", summary)
    log_file.close()
    sync_folder(staging)
    _move_entries(staging, out_dir, last="model_index.json")
    log_path.replace(out_dir / "pretrain_log.jsonl")  # last: until then --force may replace the folder's leftovers
    return summary


def _move_entries(source: Path, target: Path, last: str) -> None:
    """Rename every file and folder of ``source`` over its namesake in ``target`` (``last`` last),
    then remove ``source``; a folder being replaced is set aside first (a rename cannot replace a
    non-empty folder) and deleted after."""
    aside = target / ".pretrain.old"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    if (target / last).exists():  # first: a kill among the renames leaves no pipeline, not a mix of two
        os.replace(target / last, aside / last)
    for entry in sorted(source.iterdir(), key=lambda p: (p.name == last, p.name)):
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            os.replace(destination, aside / entry.name)
        os.replace(entry, destination)
    shutil.rmtree(aside)
    source.rmdir()
