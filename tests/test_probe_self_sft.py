"""The fine-tuning probe behind B1-B12 (issue 11): it keeps exactly the samples its reward accepts, and
its loss fits the kept latents through the adapter alone."""

import torch

from opd_bench.evaluate import SamplerSettings
from opd_bench.rewards import RewardOutput
from opd_bench.rollout import Prompt


class RedOnly:
    """A benchmark stand-in whose reward accepts the images of prompts that name red."""

    name = "red"

    def build_reward(self):
        return lambda images, prompts, metadata: RewardOutput(torch.tensor([float("red" in p) for p in prompts]))


def test_kept_samples_are_the_ones_the_reward_accepts(policy, benchmark_script):
    probe = benchmark_script("probe_self_sft")
    prompts = [Prompt("a red square"), Prompt("a blue circle"), Prompt("a red star")]
    settings = SamplerSettings(num_steps=2, guidance_scale=2.0)
    latents, owners, drawn = probe.kept_samples(policy, RedOnly(), prompts, 2, "self", 1.0, seed=0, settings=settings)
    assert owners.tolist() == [0, 0, 2, 2]
    assert drawn == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert latents.shape == (4, *policy.latent_shape(1)[1:])
    everything, owners_all, _ = probe.kept_samples(policy, RedOnly(), prompts, 2, "self", 0.0, seed=0, settings=settings)
    assert owners_all.tolist() == [0, 0, 1, 1, 2, 2]
    # the kept latents are the samples' own: drawing the same noise again gives them back
    assert torch.equal(everything[[0, 1, 4, 5]], latents)


def test_fine_tune_fits_the_kept_latents_through_the_adapter_only(policy, benchmark_script):
    probe = benchmark_script("probe_self_sft")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *policy.latent_shape(1)[1:], generator=generator)
    owners = torch.tensor([0, 1])
    embeds = policy.encode(["a red square", "a blue circle"])
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.tensor([0.5, 0.5])

    def loss(adapter) -> float:  # the pretraining loss on fixed noise and sigma
        with torch.no_grad(), policy.use(adapter):
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
            return torch.nn.functional.mse_loss(policy.velocity(noisy, sigma, embeds), noise - latents).item()

    before = loss(None)
    policy.add_adapter("sft", rank=4, alpha=8, seed=0)
    probe.fine_tune(policy, "sft", latents, owners, embeds, steps=40, batch=4, lr=1e-2, seed=0)
    after = loss("sft")  # 2.38 -> 2.10 on the fixture
    assert after < 0.95 * before
    assert loss(None) == before  # the base is untouched
