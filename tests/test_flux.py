"""The FLUX.1 backend of ``Policy``, on the tiny offline FLUX pipeline (``opd_bench.tiny.build_flux``)."""

from dataclasses import replace

import pytest
import torch

from opd_bench import rewards
from opd_bench.policy import ModelLoadError, Policy, _resolution_shift, pack_latents, unpack_latents
from opd_bench.rollout import Prompt, rollout
from opd_bench.tiny.build_flux import TinyFluxConfig, build_flux_pipeline, save_tiny_flux

PROMPTS = [Prompt("a photo of a red circle", "red"), Prompt('a sign that says "AB3"', "red")]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), seed=0)


@pytest.fixture()
def flux(flux_dir):
    torch.manual_seed(0)
    return Policy.from_pretrained(str(flux_dir))


def _state(policy, batch=2, sigma=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(policy.latent_shape(batch), generator=g)
    return x, sigma, policy.encode([p.text for p in PROMPTS][:batch])


def _count_calls(module):
    """Record the batch size of every forward of ``module``."""
    calls = []
    hook = module.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    return calls, hook


def test_tiny_flux_round_trips_and_keeps_the_state_unpacked(flux_dir, flux):
    in_memory = Policy(build_flux_pipeline(seed=0))
    x, sigma, _ = _state(flux)
    assert x.shape == (2, 16, 16, 16) and flux.default_size() == (64, 64)
    assert flux.max_sequence_length == 16  # the tiny T5 tokenizer's length (512 on FLUX.1)
    with torch.no_grad():
        a = in_memory.velocity(x, sigma, in_memory.encode(["a red circle", "a blue star"]), 3.5)
        b = flux.velocity(x, sigma, flux.encode(["a red circle", "a blue star"]), 3.5)
    assert b.shape == x.shape
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="multiples of 8"):
        flux.latent_shape(1, 60, 64)


def test_pack_and_schedule_match_diffusers(flux):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    x = torch.randn(2, 16, 6, 8)
    torch.testing.assert_close(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 8), rtol=0, atol=0)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    config = flux.pipeline.scheduler.config
    for seq_len in (64, 256, 1024, 4096):
        assert _resolution_shift(seq_len, config) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))


def test_velocity_is_the_diffusers_transformer_on_packed_inputs(flux):
    from diffusers import FluxPipeline

    x, sigma, cond = _state(flux)
    pipe = flux.pipeline
    _, _, text_ids = pipe.encode_prompt([p.text for p in PROMPTS], device="cpu", max_sequence_length=16)
    with torch.no_grad():
        mine = flux.velocity(x, sigma, cond, guidance_scale=3.5)
        theirs = flux.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 2, 16, 16, 16),
            timestep=torch.full((2,), sigma),
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
            return_dict=False,
        )[0]
    torch.testing.assert_close(mine, FluxPipeline._unpack_latents(theirs, 64, 64, 4))


def test_ode_rollout_equals_the_flux_pipeline(flux):
    """Schedule (dynamic shift, 1..1/N sigmas), timestep convention, guidance and packing, end to end."""
    t = rollout(flux, PROMPTS[:1], num_steps=4, noise_level=0.0, guidance_scale=3.5, seed=2, keep={"latents"})
    packed = pack_latents(t.latents[:, 0])
    out = flux.pipeline(
        PROMPTS[0].text, height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
        latents=packed, max_sequence_length=16, output_type="latent",
    ).images
    torch.testing.assert_close(t.sigmas[:-1], flux.pipeline.scheduler.sigmas[:-1])
    torch.testing.assert_close(t.final, unpack_latents(out, 16, 16), rtol=1e-4, atol=1e-4)


def test_rollout_is_deterministic_with_one_forward_per_sample(flux):
    calls, hook = _count_calls(flux.transformer)
    a = rollout(flux, PROMPTS, images_per_prompt=2, num_steps=3, seed=3, keep={"latents", "images"})
    hook.remove()
    b = rollout(flux, PROMPTS, images_per_prompt=2, num_steps=3, seed=3, keep={"latents", "images"})
    c = rollout(flux, PROMPTS, images_per_prompt=2, num_steps=3, seed=4, keep={"latents"})
    assert a.latents.shape == (4, 4, 16, 16, 16) and a.images.shape == (4, 3, 64, 64)
    assert 0 <= a.images.min() and a.images.max() <= 1 and torch.isfinite(a.log_probs).all()
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert not torch.allclose(a.latents[:, 1:], c.latents[:, 1:])
    # guidance-distilled: the scale is an input, so one forward of the 4 samples per step, counted once each
    assert calls == [4, 4, 4]
    assert flux.forward_counts[None] == 3 * 4 * 3


def test_schnell_like_flux_uses_batched_classifier_free_guidance():
    policy = Policy(build_flux_pipeline(seed=0, config=TinyFluxConfig(guidance_embeds=False)))
    x, sigma, cond = _state(policy)
    calls, hook = _count_calls(policy.transformer)
    with torch.no_grad():
        guided = policy.velocity(x, sigma, cond, guidance_scale=4.5)
        text = policy.velocity(x, sigma, cond)
        negative = type(cond)(cond.negative_embeds, cond.negative_pooled, cond.negative_embeds, cond.negative_pooled)
        uncond = policy.velocity(x, sigma, negative)
    hook.remove()
    assert calls == [4, 2, 2] and policy.forward_counts[None] == 8
    torch.testing.assert_close(guided, uncond + 4.5 * (text - uncond), rtol=1e-4, atol=1e-5)


def test_default_lora_targets_cover_flux_attention(flux):
    flux.add_adapter("student", rank=2)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in flux.transformer.named_modules() if n.endswith(".lora_A")}
    names = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    double = {f"transformer_blocks.0.attn.{m}" for m in names}
    single = {f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert adapted == double | single


def test_grpo_step_on_flux_changes_only_the_adapter(flux, tmp_path):
    from opd_bench.presets import plan
    from opd_bench.trainers.grpo import GRPOTrainer

    config = replace(plan("smoke").teacher, steps=1, eval_every=0, lr=1e-2, guidance_scale=3.5)
    reward = rewards.get("toy/color", target=(1, 0, 0))
    trainer = GRPOTrainer(config, policy=flux, prompts=PROMPTS, rewards={"red": reward}, run_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in flux.transformer.named_parameters()}
    trainer.train(progress=False)
    changed = {n for n, p in flux.transformer.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".student." in n for n in changed)
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def _gradients(policy, kind):
    """Gradient of a velocity loss w.r.t. a LoRA adapter (B made non-zero) or a full copy."""
    x, sigma, cond = _state(policy)
    if kind == "lora":
        policy.add_adapter("student", rank=4, seed=1)
        with torch.no_grad():
            for p in policy.parameters("student"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    else:
        policy.add_full_copy("student")
    with policy.use("student"):
        policy.velocity(x, sigma, cond, 3.5).square().mean().backward()
    return [p.grad for p in policy.parameters("student")]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradient(flux_dir, kind, monkeypatch):
    plain = _gradients(Policy.from_pretrained(str(flux_dir)), kind)
    checkpoint, blocks = torch.utils.checkpoint.checkpoint, []
    counting = lambda fn, *a, **k: (blocks.append(1), checkpoint(fn, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    checkpointed = _gradients(Policy.from_pretrained(str(flux_dir), gradient_checkpointing=True), kind)
    assert len(blocks) == 2  # the double- and the single-stream block really were checkpointed
    assert all(g is not None for g in checkpointed) and any(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_offloaded_text_encoders_visit_the_device_only_inside_encode(flux_dir, tiny_dir, family, monkeypatch):
    folder = flux_dir if family == "flux" else tiny_dir
    reference = Policy.from_pretrained(str(folder)).encode(["a red circle"])
    policy = Policy.from_pretrained(str(folder), offload_text_encoders=True)
    encoders = policy._text_encoders()
    moves = []
    for encoder in encoders:  # on a CPU-only machine the devices cannot tell; record the moves instead
        original = encoder.to
        monkeypatch.setattr(encoder, "to", lambda *a, _to=original, **k: (moves.append(str(a[0])), _to(*a, **k))[1])
    cond = policy.encode(["a red circle"])
    assert moves == [str(policy.device)] * len(encoders) + ["cpu"] * len(encoders)
    assert all(p.device.type == "cpu" for e in encoders for p in e.parameters())
    torch.testing.assert_close(cond.embeds, reference.embeds)
    torch.testing.assert_close(cond.pooled, reference.pooled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_on_a_gpu_keeps_encoders_on_the_cpu(flux_dir):
    policy = Policy.from_pretrained(str(flux_dir), device="cuda", dtype=torch.bfloat16, offload_text_encoders=True)
    on_cpu = lambda: all(p.device.type == "cpu" for e in policy._text_encoders() for p in e.parameters())  # noqa: E731
    assert on_cpu() and policy.device.type == "cuda"
    cond = policy.encode(["a red circle"])
    assert on_cpu() and cond.embeds.device.type == "cuda"
    t = rollout(policy, PROMPTS, num_steps=2, guidance_scale=3.5, keep={"images"})
    assert torch.isfinite(t.log_probs).all() and t.images.shape == (2, 3, 64, 64)


def test_bfloat16_rollout(flux_dir):
    policy = Policy.from_pretrained(str(flux_dir), dtype=torch.bfloat16)
    t = rollout(policy, PROMPTS, num_steps=2, guidance_scale=3.5, keep={"latents", "images"})
    assert t.latents.dtype == torch.bfloat16 and torch.isfinite(t.log_probs).all()
    assert t.images.dtype == torch.float32 and torch.isfinite(t.images).all()


def test_flux_load_errors(flux_dir):
    with pytest.raises(ModelLoadError, match="drop_t5 is for SD3 only"):
        Policy.from_pretrained(str(flux_dir), drop_t5=True)
