"""The one rollout function every trainer and evaluator uses.

``rollout(policy, prompts, ...)`` samples ``images_per_prompt`` trajectories per prompt with the
current adapter of ``policy`` and records what the trainers need: the states at every step,
per-step means, stds and log-probs, and the decoded images.

Noise is drawn per sample from its own generator seeded by ``(seed, sample index)``, on the CPU,
so a sample's trajectory depends only on the seed and its position, not on the batch it shares
or on the device; the same seed gives the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch

from opd_bench.benchmarks import Prompt  # defined there, torch-free, so listing suites loads no torch; re-exported here
from opd_bench.policy import Policy, PromptEmbeds
from opd_bench.sde import flow_step

KEEP_DEFAULT = frozenset({"latents", "images"})
KEEP_CHOICES = frozenset({"latents", "means", "images"})


@dataclass
class Trajectory:
    """A batch of sampled trajectories; per-sample tensors have the batch first.

    ``latents[:, i]`` is the state at ``sigmas[i]``; step ``i`` goes from ``sigmas[i]`` to
    ``sigmas[i + 1]`` and has ``means[:, i]``, ``stds[:, i]``, ``log_probs[:, i]``.
    """

    prompts: list[str]
    tasks: list[str]
    metadata: list[dict]
    group: torch.Tensor  # [B] index of the prompt each sample came from
    sigmas: torch.Tensor  # [T + 1]
    noise_levels: list[float]  # [T]
    guidance_scale: float
    seed: int
    final: torch.Tensor  # [B, C, h, w] the last state (clean latents)
    stds: torch.Tensor  # [B, T]
    log_probs: torch.Tensor  # [B, T] (mean over dimensions; NaN on deterministic steps)
    latents: torch.Tensor | None = None  # [B, T + 1, C, h, w]
    means: torch.Tensor | None = None  # [B, T, C, h, w]
    images: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1]
    embeds: PromptEmbeds | None = None  # the text conditioning, reused by trainers

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return len(self.noise_levels)

    def select(self, index: Sequence[int] | torch.Tensor) -> "Trajectory":
        """The sub-batch at ``index`` (for micro-batches and per-task splits)."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = index.tolist()
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("prompts", "tasks", "metadata"):
                value = [value[i] for i in picked]
            elif f.name == "embeds" and value is not None:
                value = value.select(index.to(value.embeds.device))
            elif isinstance(value, torch.Tensor) and f.name not in ("sigmas",):
                value = value[index.to(value.device)]
            values[f.name] = value
        return Trajectory(**values)


def _noise_schedule(noise_level: float | Sequence[float], num_steps: int) -> list[float]:
    if isinstance(noise_level, (int, float)):
        return [float(noise_level)] * num_steps
    levels = [float(a) for a in noise_level]
    if len(levels) != num_steps:
        raise ValueError(f"noise_level has {len(levels)} entries for {num_steps} steps")
    return levels


def _generators(seed: int, count: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + offset + i) for i in range(count)]


def _randn(generators: list[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


@torch.no_grad()
def rollout(
    policy: Policy,
    prompts: Iterable[Prompt | str | dict],
    *,
    images_per_prompt: int = 1,
    num_steps: int = 10,
    noise_level: float | Sequence[float] = 0.7,
    guidance_scale: float = 4.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    keep: Iterable[str] = KEEP_DEFAULT,
    embeds: PromptEmbeds | None = None,
    sample_offset: int = 0,
) -> Trajectory:
    """Sample trajectories with the policy's active adapter.

    ``noise_level``: one value for every step or one per step (0 = deterministic Euler step).
    ``keep``: which large tensors to return: ``latents`` (every state), ``means``, ``images``.
    ``embeds``: precomputed embeddings of ``prompts`` (one row per prompt), if the caller has them.
    ``sample_offset``: index of the first sample in a larger job split into chunks, so that
    sample ``i`` of the job gets the same noise whatever the chunking.
    """
    prompts = [Prompt.coerce(p) for p in prompts]
    keep = frozenset(keep)
    if not prompts:
        raise ValueError("rollout needs at least one prompt")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if keep - KEEP_CHOICES:
        raise ValueError(f"keep has unknown entries {sorted(keep - KEEP_CHOICES)}; choose from {sorted(KEEP_CHOICES)}")
    levels = _noise_schedule(noise_level, num_steps)

    if embeds is None:
        embeds = policy.encode([p.text for p in prompts])
    cond = embeds.repeat_interleave(images_per_prompt)
    batch = len(prompts) * images_per_prompt
    shape = policy.latent_shape(batch, height, width)
    sigmas = policy.sigmas(num_steps, shape)
    below_one = sigmas[sigmas < 1]
    sigma_max = float(below_one.max()) if len(below_one) else None

    generators = _generators(seed, batch, sample_offset)
    x = _randn(generators, shape[1:]).to(policy.device, policy.dtype)
    states, means, stds, log_probs = [x], [], [], []
    for i in range(num_steps):
        velocity = policy.velocity(x, sigmas[i], cond, guidance_scale)
        noise = _randn(generators, shape[1:]).to(policy.device) if levels[i] > 0 else None
        step = flow_step(x, velocity, sigmas[i], sigmas[i + 1], levels[i], noise=noise, sigma_max=sigma_max)
        x = step.prev_sample
        if "latents" in keep:
            states.append(x)
        if "means" in keep:
            means.append(step.mean.to(x.dtype))  # stored like the states
        stds.append(step.std)
        log_probs.append(step.log_prob)

    group = torch.arange(len(prompts)).repeat_interleave(images_per_prompt)
    return Trajectory(
        prompts=[prompts[g].text for g in group.tolist()],
        tasks=[prompts[g].task for g in group.tolist()],
        metadata=[prompts[g].metadata for g in group.tolist()],
        group=group,
        sigmas=sigmas,
        noise_levels=levels,
        guidance_scale=guidance_scale,
        seed=seed,
        final=x,
        stds=torch.stack(stds, dim=1).cpu(),
        log_probs=torch.stack(log_probs, dim=1).cpu(),
        latents=torch.stack(states, dim=1) if "latents" in keep else None,
        means=torch.stack(means, dim=1) if "means" in keep else None,
        images=policy.decode(x) if "images" in keep else None,
        embeds=cond,
    )
