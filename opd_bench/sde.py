"""Flow-matching step math: one sampler step and the closed-form per-step KL.

Pure tensor functions, no model code (the diffusers split: schedulers apart from models).

Convention (SD3 / FLUX): ``x_s = (1 - s) x_0 + s eps`` with ``s = 1`` pure noise; the network
predicts the velocity ``v``; a step goes from ``sigma`` to ``sigma_next < sigma``, ``dt < 0``.

* ``noise_level == 0``: the Euler (ODE) step ``x' = x + v dt``; ``std == 0``.
* ``noise_level = a > 0``: the Flow-GRPO SDE with the same marginals,
  ``std_s = a sqrt(s / (1 - s))``,
  ``mean = x (1 + std_s^2 dt / (2 s)) + v (1 + std_s^2 (1 - s) / (2 s)) dt``,
  ``x' = mean + std_s sqrt(-dt) eps``.

Reductions: ``log_prob`` and ``step_kl`` reduce over every non-batch dimension. ``reduce="mean"``
(the default) averages over dimensions, as Flow-GRPO does for its ratios, so magnitudes do
not depend on the resolution; ``reduce="sum"`` gives the true log-density / KL.

All arithmetic runs in float32 (bfloat16 inputs are upcast); ``prev_sample`` and ``mean`` come
back in the input dtype, ``log_prob`` and ``std`` in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch

Reduce = Literal["mean", "sum"]
Weighting = Literal["step", "reference"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{s'}, input dtype
    mean: torch.Tensor  # mean of the transition, float32 even for bf16 inputs: OPD's loss and the KL
    # measure gaps between two means of a few bf16 steps, which rounding would quantise
    std: torch.Tensor  # [B] float32: std_s * sqrt(-dt); 0 on ODE steps
    log_prob: torch.Tensor  # [B] float32; NaN on ODE steps (a point mass has no density)
    dt: torch.Tensor  # [B] float32, sigma_next - sigma (< 0)

    def select(self, index) -> "StepOutput":
        """The samples ``index`` (a slice or indices) of this output; every field is per sample."""
        return StepOutput(*(getattr(self, f.name)[index] for f in fields(self)))


def _per_sample(value, batch: int, device) -> torch.Tensor:
    """A scalar or [B] tensor of sigmas -> float32 [B]."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got {tuple(value.shape)}")
    return value


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.ndim - 1)))


def _reduce(x: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    dims = tuple(range(1, x.ndim))
    if reduce == "mean":
        return x.mean(dim=dims)
    if reduce == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sde_std(sigma: torch.Tensor, noise_level: float, sigma_max: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's ``std_s = a sqrt(s / (1 - s))``; at ``s = 1`` the denominator uses ``sigma_max``."""
    denominator = 1 - torch.where(sigma >= 1, sigma_max, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def flow_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    *,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
    sigma_max=None,
    noise: torch.Tensor | None = None,
    reduce: Reduce = "mean",
) -> StepOutput:
    """One step from ``sigma`` to ``sigma_next`` (scalars or per-sample ``[B]``).

    ``prev_sample`` given: score it instead of drawing one (ratios on stored trajectories).
    ``noise`` given: use it as the standard normal draw (else drawn from ``generator``).
    ``sigma_max``: the schedule's largest sigma below 1, used for ``std_s`` at ``sigma == 1``;
    by default ``sigma_next``, which is that value on the first step of a decreasing schedule.
    """
    if sample.shape != velocity.shape:
        raise ValueError(f"sample {tuple(sample.shape)} and velocity {tuple(velocity.shape)} differ")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    batch, device, dtype = sample.shape[0], sample.device, sample.dtype
    s = _per_sample(sigma, batch, device)
    s_next = _per_sample(sigma_next, batch, device)
    dt = s_next - s
    if bool((dt >= 0).any()):
        raise ValueError("flow_step needs sigma_next < sigma (sampling runs from noise, sigma=1, to data)")
    x = sample.float()
    v = velocity.float()

    if noise_level == 0:
        mean = x + v * _expand(dt, x)
        std = torch.zeros(batch, device=device)
        new = mean if prev_sample is None else prev_sample.float()
        log_prob = torch.full((batch,), math.nan, device=device)
        return StepOutput(new.to(dtype), mean, std, log_prob, dt)

    s_max = s_next if sigma_max is None else _per_sample(sigma_max, batch, device)
    std_s = sde_std(s, noise_level, s_max)
    std_s_, dt_, s_ = _expand(std_s, x), _expand(dt, x), _expand(s, x)
    mean = x * (1 + std_s_**2 * dt_ / (2 * s_)) + v * (1 + std_s_**2 * (1 - s_) / (2 * s_)) * dt_
    std = std_s * torch.sqrt(-dt)
    std_ = _expand(std, x)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        new = mean + std_ * noise.float()
    else:
        new = prev_sample.float()
    # The density of the sample actually returned (after the dtype round trip), so that
    # re-scoring a stored bf16 trajectory reproduces the same log-probs.
    new = new.to(dtype).float()
    log_density = -((new - mean) ** 2) / (2 * std_**2) - torch.log(std_) - _LOG_SQRT_2PI
    return StepOutput(new.to(dtype), mean, std, _reduce(log_density, reduce), dt)


def step_kl(
    mean_a: torch.Tensor,
    mean_b: torch.Tensor,
    std,
    *,
    weighting: Weighting = "step",
    dt=None,
    reduce: Reduce = "mean",
) -> torch.Tensor:
    """Per-sample ``KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = w ||mean_a - mean_b||^2``.

    ``weighting="step"``: ``w = 1 / (2 std^2)`` with the step's own variance (the exact KL).
    ``weighting="reference"``: ``w = 1 / (2 std_s^2) = -dt / (2 std^2)``, the reference
    implementation's per-step reweighting; needs ``dt``.
    Deterministic (ODE) steps, ``std == 0``: the KL is degenerate and both weightings use the
    mean-matching limit ``w = 1/2``. Returns float32 ``[B]``; gradients flow to both means.
    """
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"means differ in shape: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    batch, device = mean_a.shape[0], mean_a.device
    std = _per_sample(std, batch, device)
    if weighting == "step":
        variance = std**2
    elif weighting == "reference":
        if dt is None:
            raise ValueError("weighting='reference' divides by std_s^2 = std^2 / -dt: pass dt=")
        variance = std**2 / -_per_sample(dt, batch, device)
    else:
        raise ValueError(f"weighting must be 'step' or 'reference', got {weighting!r}")
    ode = std == 0
    weight = torch.where(ode, torch.full_like(std, 0.5), 1 / (2 * torch.where(ode, 1.0, variance)))
    squared = (mean_a.float() - mean_b.float()) ** 2
    return weight * _reduce(squared, reduce)
