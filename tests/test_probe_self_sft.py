"""The fine-tuning probe behind B1-B16 (issue 11): it keeps exactly the samples its reward accepts, the
latents it keeps are the samples' own (the base's, or the renders' through the VAE), and its loss
fits each kept latent to its own prompt through the adapter alone."""

import pytest
import torch

from opd_bench import suites
from opd_bench.evaluate import SamplerSettings
from opd_bench.rewards import RewardOutput
from opd_bench.rollout import Prompt, rollout


def red_only(images, prompts, metadata):
    """A reward that accepts the images of prompts that name red."""
    return RewardOutput(torch.tensor([float("red" in p) for p in prompts]))


class Bench:
    name = "red"


@pytest.fixture()
def probe(benchmark_script, monkeypatch):
    module = benchmark_script("probe_self_sft")
    monkeypatch.setattr(module, "CHUNK", 4)  # several chunks: each must draw its own samples' noise
    return module


def test_kept_samples_are_the_ones_the_reward_accepts_with_their_own_noise(policy, probe):
    prompts = [Prompt("a red square"), Prompt("a blue circle"), Prompt("a red star")]
    settings = SamplerSettings(num_steps=2, guidance_scale=2.0)
    latents, owners, drawn = probe.kept_samples(policy, Bench(), red_only, prompts, 2, "self", 1.0, seed=0, settings=settings)
    assert owners.tolist() == [0, 0, 2, 2]
    assert drawn == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # the kept latents are the final states of samples 0, 1, 4, 5 of the whole job drawn at once
    whole = rollout(policy, [p for p in prompts for _ in range(2)], num_steps=2, noise_level=0.0,
                    guidance_scale=2.0, seed=0, keep=())
    assert torch.allclose(latents, whole.final[[0, 1, 4, 5]].float(), atol=1e-5)
    _, everything, _ = probe.kept_samples(policy, Bench(), red_only, prompts, 2, "self", 0.0, seed=0, settings=settings)
    assert everything.tolist() == [0, 0, 1, 1, 2, 2]


def test_render_latents_decode_back_to_what_the_vae_reconstructs(policy, probe):
    vae = policy.pipeline.vae
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.5)  # a scale and shift to get wrong
    prompts = suites.get("tiny").benchmark("geneval").prompts("train")[:3]
    latents, owners, _ = probe.kept_samples(policy, Bench(), lambda *a: RewardOutput(torch.ones(len(a[1]))), prompts, 2,
                                            "render", 1.0, seed=0, settings=SamplerSettings())
    assert owners.tolist() == [0, 0, 1, 1, 2, 2]
    from opd_bench.world.render import render_batch

    images = render_batch([p.metadata for p in prompts for _ in range(2)], [k for k in range(6)])
    with torch.no_grad():
        reconstructed = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        assert torch.allclose(policy.decode(latents), reconstructed, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_fine_tune_fits_each_latent_to_its_own_prompt_through_the_adapter_only(policy, probe, guidance):
    generator = torch.Generator().manual_seed(0)
    shape = policy.latent_shape(1)[1:]
    latents = torch.stack([torch.full(shape, 1.5), torch.full(shape, -1.5)])  # two images only the prompt tells apart
    owners = torch.tensor([1, 0])  # latent 0 shows prompt 1
    embeds = policy.encode(["a red square", "a blue circle"])
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.tensor([0.2, 0.8]).view(-1, 1, 1, 1)

    def loss(adapter, prompt_of) -> float:  # the pretraining loss on fixed noise and sigmas
        with torch.no_grad(), policy.use(adapter):
            noisy = (1 - sigma) * latents + sigma * noise  # rectified flow: sigma 1 is pure noise
            velocity = policy.velocity(noisy, sigma.flatten(), embeds.select(prompt_of), guidance)
            return torch.nn.functional.mse_loss(velocity, noise - latents).item()

    before = loss(None, owners)
    policy.add_adapter("sft", rank=4, alpha=8, seed=0)
    probe.fine_tune(policy, "sft", latents, owners, embeds, steps=100, batch=4, lr=1e-2, seed=0, guidance=guidance)
    fitted = loss("sft", owners)  # 3.57 -> 2.56 on the fixture, at either guidance
    assert fitted < 0.8 * before
    assert fitted < 0.9 * loss("sft", owners.flip(0))  # each latent fitted to its own prompt, not the other's
    assert loss(None, owners) == before  # the base is untouched
