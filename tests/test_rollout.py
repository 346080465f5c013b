import pytest
import torch

from opd_bench.rollout import Prompt, rollout
from opd_bench.sde import flow_step

PROMPTS = [Prompt("a photo of a red circle", "geneval", {"tag": "colors"}), Prompt('a sign that says "A1"', "ocr")]


def test_same_seed_same_trajectory_other_seed_other(policy):
    a = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=4, seed=3, keep={"latents", "images"})
    b = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=4, seed=3, keep={"latents", "images"})
    c = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=4, seed=4, keep={"latents"})
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert torch.equal(a.log_probs, b.log_probs)
    assert not torch.allclose(a.latents[:, 1:], c.latents[:, 1:])


def test_trajectory_layout_and_bookkeeping(policy):
    t = rollout(policy, PROMPTS, images_per_prompt=3, num_steps=5, keep={"latents", "means", "images"})
    assert len(t) == 6 and t.num_steps == 5
    assert t.latents.shape[:2] == (6, 6) and t.means.shape[:2] == (6, 5)
    assert t.images.shape == (6, 3, 64, 64) and 0 <= t.images.min() and t.images.max() <= 1
    assert t.log_probs.shape == t.stds.shape == (6, 5) and torch.isfinite(t.log_probs).all()
    assert t.sigmas.shape == (6,) and t.sigmas[0] == 1 and t.sigmas[-1] == 0
    assert t.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert t.tasks == ["geneval"] * 3 + ["ocr"] * 3 and t.metadata[0] == {"tag": "colors", "task": "geneval"}  # the task travels to the rewards
    assert torch.equal(t.latents[:, -1], t.final)


def test_stored_log_probs_rescore_through_flow_step(policy):
    t = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=4, seed=1, keep={"latents"})
    sigma_max = float(t.sigmas[1])
    for i in range(t.num_steps):
        with torch.no_grad():
            velocity = policy.velocity(t.latents[:, i], t.sigmas[i], t.embeds, t.guidance_scale)
        step = flow_step(
            t.latents[:, i], velocity, t.sigmas[i], t.sigmas[i + 1], t.noise_levels[i],
            prev_sample=t.latents[:, i + 1], sigma_max=sigma_max,
        )
        torch.testing.assert_close(step.log_prob, t.log_probs[:, i], rtol=1e-4, atol=1e-4)


def test_step_at_rescores_the_stored_steps_on_policy(policy):
    """What GRPO's ratio divides by: step_at's defaults (sigma_max, the next state, guidance) give
    the rollout's own log-probs, so an untrained policy's ratio is 1 at every step, step 0 too."""
    from opd_bench.rl import step_at

    t = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=4, seed=2, guidance_scale=4.5, keep={"latents"})
    index = torch.tensor([0, 1, 2, 3, 0, 3])
    step = torch.tensor([0, 0, 1, 2, 3, 3])
    with torch.no_grad():
        again = step_at(policy, t, index, step, guidance_scale=t.guidance_scale, detach_uncond=True)
    torch.testing.assert_close(again.log_prob, t.log_probs[index, step], rtol=1e-4, atol=1e-4)
    mixed = rollout(policy, PROMPTS, num_steps=3, noise_level=[0.7, 0.0, 0.7], seed=0, keep={"latents"})
    with pytest.raises(ValueError, match="share a noise level"):
        step_at(policy, mixed, torch.tensor([0, 0]), torch.tensor([0, 1]), guidance_scale=mixed.guidance_scale)


def test_ode_rollout_is_deterministic_and_follows_euler(policy):
    a = rollout(policy, PROMPTS, num_steps=3, noise_level=0.0, seed=0, keep={"latents"})
    b = rollout(policy, PROMPTS, num_steps=3, noise_level=0.0, seed=0, keep={"latents"})
    assert torch.equal(a.latents, b.latents) and torch.all(a.stds == 0)
    with torch.no_grad():
        v = policy.velocity(a.latents[:, 0], a.sigmas[0], a.embeds, a.guidance_scale)
    torch.testing.assert_close(a.latents[:, 1], a.latents[:, 0] + v * (a.sigmas[1] - a.sigmas[0]))


def test_per_step_noise_levels(policy):
    t = rollout(policy, PROMPTS, num_steps=3, noise_level=[0.7, 0.0, 0.7], keep=())
    assert (t.stds[:, 0] > 0).all() and (t.stds[:, 1] == 0).all() and (t.stds[:, 2] > 0).all()
    with pytest.raises(ValueError, match="3 entries for 4 steps"):
        rollout(policy, PROMPTS, num_steps=4, noise_level=[0.7, 0.0, 0.7])


def test_keep_only_what_is_asked(policy):
    t = rollout(policy, PROMPTS, num_steps=2, keep=())
    assert t.latents is None and t.means is None and t.images is None and t.final is not None
    with pytest.raises(ValueError, match="unknown entries"):
        rollout(policy, PROMPTS, num_steps=2, keep={"everything"})


def test_a_sample_does_not_depend_on_its_batch(policy):
    both = rollout(policy, PROMPTS, num_steps=3, seed=7, keep=())
    alone = rollout(policy, PROMPTS[:1], num_steps=3, seed=7, keep=())
    torch.testing.assert_close(both.final[:1], alone.final, rtol=1e-4, atol=1e-5)


def test_select_takes_a_sub_batch(policy):
    t = rollout(policy, PROMPTS, images_per_prompt=2, num_steps=2, keep={"latents", "images"})
    sub = t.select([3, 0])
    assert sub.prompts == [t.prompts[3], t.prompts[0]] and sub.group.tolist() == [1, 0]
    assert torch.equal(sub.latents[0], t.latents[3]) and len(sub.embeds) == 2
    assert torch.equal(sub.sigmas, t.sigmas)


def test_prompts_as_strings_and_records(policy):
    t = rollout(policy, ["plain text", {"prompt": "a record", "task": "pref", "id": 3}], num_steps=1, keep=())
    assert t.tasks == ["", "pref"] and t.metadata[1]["id"] == 3
