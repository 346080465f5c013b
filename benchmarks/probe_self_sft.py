"""Can a small update move the base's held-out score when the signal is clean? (issue 11, probes B1-B16)

The teacher probes (docs/benchmarks.md, T/G/L) found that GRPO does not move this base's held-out
GenEval or OCR score, and blamed the base: its failures are not near misses that a small update
corrects. This probe asks the base that question without GRPO's noisy gradient. It draws
``--images`` samples of ``--prompts`` evenly spaced train prompts, keeps those that the
benchmark's own reward scores at least ``--keep-at`` (1.0: the strict hits; 0: every sample, the
control that the filter is what teaches), and fine-tunes a fresh LoRA adapter (the standard
teacher's rank, alpha and learning rate) on the kept latents with the base's pretraining loss
(rectified flow, logit-normal sigmas; the conditional velocity, or with ``--guided`` the guided
one; unlike pretraining, no caption is dropped). The samples are the base's own, drawn with the
suite's evaluation sampler (ODE; ``--sample-guidance`` changes its CFG scale), or with ``--source
render`` the world's renders of the same prompts (right by construction; scored as rendered and
fitted through the VAE): what a clean supervised signal on these prompts can do at this adapter
size (``--full``: at full-parameter size). ``--model DIR`` checks a candidate base instead of the shipped one (docs/tiny_base.md).

    python benchmarks/probe_self_sft.py --task geneval [--source self|render] [--keep-at 1.0]

The defaults draw 3,840 images (a standard teacher's rollouts) and fit 600 steps of 32 (19,200
image-sigma pairs; a teacher trains 15,360 image-steps). Prints one JSON line: how many samples
were kept (per tag for GenEval), minutes, and base and adapter on the held-out prompts and noise
of probe_teacher.py (``--eval-limit`` test prompts x 2 images, noise seed 777): each score, the
per-image gain with its paired standard error and, for GenEval, the score's own gain
(``score_gain``, the tags' mean) with its stratified one; the same on up to as many of the
prompts with a kept sample (``fitted_prompts``: did it fit even those?). For GenEval also
``word_use``: probe_text_use.py's minimal-edit ratios (D1) of base and fitted model, to see
whether the fit made the denoiser read the relation, the colours' order, the count. ``--sigma-shift``
draws the fit's sigmas shifted as the sampler's schedule is (V2).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings
from opd_bench.presets import plan
from opd_bench.policy import ModelLoadError, Policy
from opd_bench.results_view import paired_gain
from opd_bench.rewards.base import call_reward
from opd_bench.rollout import rollout
from opd_bench.tiny.pretrain import logit_normal, shifted
from opd_bench.world.render import render_batch
from probe_args import held_out, probe_parser, summary, tag_score_gain
from probe_text_use import geneval_edit_ratios

CHUNK = 64  # images per sampling / encoding call


def evenly_spaced(prompts: list, count: int) -> list:
    """``count`` distinct items of ``prompts`` (all of them if fewer), evenly spaced, in order."""
    count = min(count, len(prompts))
    step = len(prompts) / max(1, count)
    return [prompts[int(i * step)] for i in range(count)]


class TrainedPrompts:
    """``spec`` whose test prompts are those the adapter was fitted on (at least one kept sample):
    did it fit even those?"""

    def __init__(self, spec, prompts: list):
        self.spec, self.trained = spec, prompts

    def __getattr__(self, name: str):
        return getattr(self.spec, name)

    def prompts(self, split: str = "test", limit: int | None = None) -> list:
        return evenly_spaced(self.trained, limit or len(self.trained))


@torch.no_grad()
def kept_samples(policy, spec, reward, prompts, images_per_prompt: int, source: str, keep_at: float, seed: int,
                 settings: SamplerSettings):
    """(latents of the kept samples, their prompt indices, the reward of every drawn sample).

    ``source``: "self" draws with ``policy`` and ``settings``; "render" draws the world's renders
    (scored as rendered; what is fitted is their VAE latent)."""
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(images_per_prompt)]
    latents, owners, scores = [], [], []
    for start in range(0, len(jobs), CHUNK):
        chunk = jobs[start:start + CHUNK]
        batch = [p for _, p in chunk]
        if source == "self":
            trajectory = rollout(policy, batch, num_steps=settings.num_steps, noise_level=settings.noise_level,
                                 guidance_scale=settings.guidance_scale, seed=seed, keep={"images"}, sample_offset=start)
            final, images = trajectory.final, trajectory.images
        else:
            images = render_batch([p.metadata for p in batch], [seed * 1_000_003 + start + k for k in range(len(batch))])
            final = policy.encode_images(images)
        chunk_scores = call_reward(reward, spec.name, images, [p.text for p in batch], [p.metadata for p in batch]).scores
        scores.extend(chunk_scores.tolist())
        keep = chunk_scores >= keep_at
        latents.append(final[keep].float().cpu())
        owners.extend(i for (i, _), k in zip(chunk, keep.tolist()) if k)
    return torch.cat(latents), torch.tensor(owners), scores


def fine_tune(policy, adapter: str, latents, owners, embeds, *, steps: int, batch: int, lr: float, seed: int,
              guidance: float = 1.0, sigma_shift: float = 1.0) -> list[float]:
    """The pretraining loss on the kept latents, through adapter ``adapter``; the loss every 50 steps.

    ``guidance`` > 1 fits the guided velocity (unconditional half detached, as GRPO trains) instead
    of the conditional one: samples drawn with guidance, fitted by the conditional velocity and then
    drawn with guidance again, would be guided twice."""
    params = policy.parameters(adapter)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with policy.use(adapter):
        for step in range(steps):
            index = torch.randint(len(latents), (batch,), generator=generator)
            x0 = latents[index].to(policy.device, policy.dtype)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            sigma = shifted(logit_normal(batch, generator), sigma_shift).to(x0)
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            velocity = policy.velocity(noisy, sigma, embeds.select(owners[index]), guidance, detach_uncond=True)
            loss = F.mse_loss(velocity.float(), (noise - x0).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                losses.append(round(loss.item(), 4))
    return losses


def main() -> None:
    teacher = plan("standard").teacher
    parser = probe_parser(__doc__)
    parser.add_argument("--task", required=True, choices=["geneval", "ocr"])
    parser.add_argument("--model", default="tiny",
                        help="the base: the shipped tiny model, or a candidate's pipeline folder (docs/tiny_base.md)")
    parser.add_argument("--source", choices=["self", "render"], default="self",
                        help="self: the base's own ODE samples, filtered by the reward; render: the world's renders")
    parser.add_argument("--keep-at", type=float, default=1.0, help="keep the samples the reward scores at least this")
    parser.add_argument("--prompts", type=int, default=960, help="evenly spaced train prompts")
    parser.add_argument("--images", type=int, default=4, help="samples drawn per prompt")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=teacher.lr)
    parser.add_argument("--rank", type=int, default=teacher.lora_rank)
    parser.add_argument("--alpha", type=float, default=teacher.lora_alpha)
    parser.add_argument("--full", action="store_true",
                        help="fine-tune a full copy of the transformer instead of a LoRA adapter (--rank, --alpha unused)")
    parser.add_argument("--sample-guidance", type=float, default=None,
                        help="the CFG scale the base draws its own samples with (default: the evaluation's)")
    parser.add_argument("--sigma-shift", type=float, default=1.0,
                        help="shift the fit's logit-normal sigmas as the sampler's schedule is shifted (pretraining: 1)")
    parser.add_argument("--guided", action="store_true",
                        help="fit the guided velocity (the evaluation's CFG scale) instead of the conditional one")
    args = parser.parse_args()
    if args.overrides:
        parser.error("--set does not apply here (no trainer config); use --lr, --rank, --alpha, --steps")
    if args.sigma_shift <= 0:
        parser.error(f"--sigma-shift must be > 0 (1: the pretraining's unshifted sigmas), got {args.sigma_shift}")
    torch.set_num_threads(args.threads)

    suite = suites.get("tiny")
    spec = suite.benchmark(args.task)
    try:
        policy = Policy.from_pretrained(suites.resolve_model(args.model))
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    settings = SamplerSettings.of_suite(suite)
    prompts = evenly_spaced(spec.prompts("train"), args.prompts)
    reward = spec.build_reward()

    started = time.perf_counter()
    drawing = settings if args.sample_guidance is None else replace(settings, guidance_scale=args.sample_guidance)
    latents, owners, drawn = kept_samples(policy, spec, reward, prompts, args.images, args.source, args.keep_at,
                                          seed=1234 + args.seed, settings=drawing)
    if not len(latents):
        raise SystemExit(f"no sample scored >= {args.keep_at}; lower --keep-at or draw more with --images")
    tags = Counter(prompts[i].metadata.get("tag", spec.name) for i in owners.tolist())
    sample_minutes = (time.perf_counter() - started) / 60
    embeds = policy.encode([p.text for p in prompts])
    # the velocity fitted: the conditional one, or (--guided) the one the evaluation draws with
    fit_guidance = settings.guidance_scale if args.guided else 1.0
    if args.full:
        policy.add_full_copy("sft")
    else:
        policy.add_adapter("sft", rank=args.rank, alpha=args.alpha, seed=args.seed)
    started = time.perf_counter()
    losses = fine_tune(policy, "sft", latents, owners, embeds, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                       guidance=fit_guidance, sigma_shift=args.sigma_shift)
    train_minutes = (time.perf_counter() - started) / 60

    rewards = {"main": reward}

    def compare(view) -> dict:
        """Base and adapter on ``view``'s first ``--eval-limit`` test prompts, same noise: the score
        of each, the gain per image and, for a score that averages tags (GenEval), the score's gain."""
        result = {name: held_out(policy, name, view, settings, rewards, args.eval_limit) for name in (None, "sft")}
        after, before = result["sft"]["per_image"][spec.name], result[None]["per_image"][spec.name]
        gain, se = paired_gain(after, before)
        out = {"base": summary(result[None]), "sft": summary(result["sft"]), "gain": round(gain, 4), "se": round(se, 4)}
        if "per_tag" in result[None]:
            score_gain, score_se = tag_score_gain(after, before, view, args.eval_limit)
            out["score_gain"] = round(score_gain, 4)
            out["score_se"] = None if score_se is None else round(score_se, 4)
        return out

    held = compare(spec)
    # the same on prompts it was fitted on (other noise than the samples'): did it fit even those?
    fitted_prompts = [prompts[i] for i in owners.unique().tolist()]
    fit = compare(TrainedPrompts(spec, fitted_prompts))
    word_use = {}
    if args.task == "geneval":  # does the fit make the denoiser read the words the hard tags turn on?
        for name in (None, "sft"):
            with policy.use(name):
                word_use[name or "base"] = {tag: {str(s): round(r, 3) for s, r in ratios.items()}
                                            for tag, ratios in geneval_edit_ratios(policy).items()}
    print(json.dumps({"task": args.task, "model": args.model, "source": args.source, "keep_at": args.keep_at,
                      "seed": args.seed, "prompts": args.prompts, "images": args.images, "steps": args.steps,
                      "batch": args.batch, "lr": args.lr, "sample_guidance": drawing.guidance_scale, "sigma_shift": args.sigma_shift,
                      "guided": args.guided, "fit_guidance": fit_guidance, "full": args.full, "rank": args.rank, "alpha": args.alpha,
                      "threads": args.threads, "drawn_reward": round(sum(drawn) / len(drawn), 4),
                      "kept": len(latents), "kept_per_tag": dict(tags), "prompts_fitted": len(fitted_prompts),
                      "sample_minutes": round(sample_minutes, 2), "train_minutes": round(train_minutes, 2),
                      "loss": losses, **held, "fitted_prompts": fit,
                      **({"word_use": word_use} if word_use else {})}))


if __name__ == "__main__":
    main()
