import contextlib
import json
import re
import warnings

import pytest
import torch

from opd_bench.policy import ModelLoadError, Policy, resolve_dtype
from opd_bench.tiny import build_pipeline


def _state(policy, batch=2, sigma=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(policy.latent_shape(batch), generator=g)
    return x, sigma, policy.encode(["a photo of a red circle", 'a sign that says "AB3"'][:batch])


def test_tiny_pipeline_round_trips_through_save_and_load(tiny_dir):
    in_memory = Policy(build_pipeline(seed=0))
    loaded = Policy.from_pretrained(str(tiny_dir))
    x, sigma, _ = _state(loaded)
    for policy in (in_memory, loaded):
        policy.pipeline.transformer.eval()
    with torch.no_grad():
        a = in_memory.velocity(x, sigma, in_memory.encode(["a red circle", "a blue star"]), 4.5)
        b = loaded.velocity(x, sigma, loaded.encode(["a red circle", "a blue star"]), 4.5)
    torch.testing.assert_close(a, b)
    assert loaded.pipeline.text_encoder_3 is None


def test_tiny_pipelines_save_and_load_without_library_clutter(tmp_path, capfd, monkeypatch):
    """No warning for the T5 a tiny pipeline leaves out, no bars for a load that takes a blink;
    the libraries' own settings come back afterwards. A big model's load keeps its bars."""
    from diffusers.utils import logging as diffusers_logging

    from opd_bench import policy as policy_module
    from opd_bench.tiny import save_tiny

    diffusers_logging.enable_progress_bar()
    verbosity = diffusers_logging.get_verbosity()
    capfd.readouterr()
    Policy.from_pretrained(str(save_tiny(tmp_path / "tiny")))
    printed = capfd.readouterr().err
    assert "cannot be saved" not in printed and "Writing model shards" not in printed and "Loading" not in printed
    assert diffusers_logging.is_progress_bar_enabled() and diffusers_logging.get_verbosity() == verbosity
    monkeypatch.setattr(policy_module, "QUIET_LOAD_BYTES", 0)
    Policy.from_pretrained(str(tmp_path / "tiny"))
    assert "Loading pipeline components" in capfd.readouterr().err


def test_handmade_tokenizer_gives_distinct_words_distinct_ids(policy):
    tokenizer = policy.pipeline.tokenizer
    words = ["red", "blue", "circle", "square", "photo", "that", "to", "left", "right"]
    ids = [tokenizer(word).input_ids for word in words]
    assert all(len(i) == 3 for i in ids), "each listed word should be one token between BOS and EOS"
    assert len({i[1] for i in ids}) == len(words)
    unknown = tokenizer("zq7").input_ids  # falls back to characters, never to nothing
    assert len(unknown) > 3 and tokenizer.unk_token_id not in unknown[1:-1]


def test_a_prompt_the_tiny_tokenizers_would_cut_short_is_refused(policy):
    """Their unknown token is the end token: the text after an unknown character would be lost."""
    with pytest.raises(ValueError, match=r"prompt 'a café on a red square' holds characters its tokenizer cannot encode \('é'\)"):
        policy.encode(["a red square", "a café on a red square"])
    with pytest.raises(ValueError, match=re.escape("holds '<|endoftext|>', which would end it there")):
        policy.encode(["a red <|endoftext|> square"])
    assert policy.encode(['a sign that says "HI5"\tin red']).embeds.shape[0] == 1  # any printable ASCII, any space


def test_prompts_change_the_velocity(policy):
    x, sigma, _ = _state(policy, batch=1)
    with torch.no_grad():
        red = policy.velocity(x, sigma, policy.encode(["a red circle"]))
        blue = policy.velocity(x, sigma, policy.encode(["a blue square"]))
    assert not torch.allclose(red, blue)


def test_guidance_is_one_batched_forward_equal_to_separate_calls(policy):
    x, sigma, cond = _state(policy)
    calls = []
    hook = policy.transformer.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.no_grad():
        guided = policy.velocity(x, sigma, cond, guidance_scale=4.5)
        assert len(calls) == 1
        text = policy.velocity(x, sigma, cond)
        uncond_cond = type(cond)(cond.negative_embeds, cond.negative_pooled, cond.negative_embeds, cond.negative_pooled)
        uncond = policy.velocity(x, sigma, uncond_cond)
    hook.remove()
    torch.testing.assert_close(guided, uncond + 4.5 * (text - uncond), rtol=1e-4, atol=1e-5)


def test_adapters_switch_per_call_and_the_base_is_the_reference(policy):
    x, sigma, cond = _state(policy)
    with torch.no_grad():
        base = policy.velocity(x, sigma, cond)
    policy.add_adapter("student", rank=4, alpha=8)
    policy.add_adapter("teacher", rank=4, alpha=8, trainable=False)
    with torch.no_grad():
        for p in policy.parameters("teacher"):
            p.add_(0.5 * torch.randn_like(p))
        with policy.use("student"):
            student = policy.velocity(x, sigma, cond)
        with policy.use("teacher"):
            teacher = policy.velocity(x, sigma, cond)
        with policy.use(None):
            reference = policy.velocity(x, sigma, cond)
    torch.testing.assert_close(student, base)  # LoRA B starts at zero
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(teacher, base)
    assert policy.active_adapter is None


def test_only_the_trainable_adapter_gets_gradients_after_any_switch(policy):
    x, sigma, cond = _state(policy)
    policy.add_adapter("student", rank=4)
    policy.add_adapter("teacher", rank=4, trainable=False)
    with policy.use("teacher"), policy.use(None), policy.use("student"):
        pass
    with policy.use("student"):
        policy.velocity(x, sigma, cond).square().mean().backward()
    trained = {n for n, p in policy.transformer.named_parameters() if p.grad is not None}
    assert trained and all(".student." in n for n in trained)
    assert all(not p.requires_grad for p in policy.parameters("teacher"))
    frozen = [p for p in policy.pipeline.text_encoder.parameters()] + list(policy.pipeline.vae.parameters())
    assert all(not p.requires_grad for p in frozen)


def test_adapter_save_and_load_round_trip(policy, tiny_dir, tmp_path):
    x, sigma, cond = _state(policy)
    policy.add_adapter("teacher", rank=4)
    with torch.no_grad():
        for p in policy.parameters("teacher"):
            p.add_(0.1 * torch.randn_like(p))
        with policy.use("teacher"):
            expected = policy.velocity(x, sigma, cond)
    policy.save_adapter("teacher", tmp_path / "teacher")
    other = Policy.from_pretrained(str(tiny_dir))
    other.load_adapter("geneval", tmp_path / "teacher")
    with torch.no_grad(), other.use("geneval"):
        got = other.velocity(x, sigma, other.encode(["a photo of a red circle", 'a sign that says "AB3"']))
    torch.testing.assert_close(got, expected)
    assert all(not p.requires_grad for p in other.parameters("geneval"))


def test_a_bfloat16_base_trains_and_saves_float32_adapters(tiny_dir, tmp_path):
    policy = Policy.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    x, sigma, cond = _state(policy)
    policy.add_adapter("student", rank=4, seed=1)
    params = policy.parameters("student")
    assert policy.dtype == torch.bfloat16 and params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.Adam(params, lr=1e-5)
    for step in range(2):  # the second step moves lora_A (its gradient is zero while lora_B is)
        before = [p.detach().clone() for p in params]
        with policy.use("student"):
            velocity = policy.velocity(x.to(torch.bfloat16), sigma, cond, 4.5)
            velocity.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert velocity.dtype == torch.bfloat16
    lora_a = [(p, b) for (n, p), b in zip(_named(policy, "student"), before) if ".lora_A." in n]
    moved = torch.cat([(p != b).flatten() for p, b in lora_a]).float().mean()
    # steps of 1e-5 on weights of order 0.1 are below bfloat16's resolution there: they add up only in float32
    kept_in_bf16 = torch.cat([(p.bfloat16() != b.bfloat16()).flatten() for p, b in lora_a]).float().mean()
    assert moved > 0.9 and kept_in_bf16 < 0.2
    policy.save_adapter("student", tmp_path / "student")
    other = Policy.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    other.load_adapter("loaded", tmp_path / "student")
    assert all(torch.equal(a, b) for a, b in zip(other.parameters("loaded"), params))
    with torch.no_grad(), policy.use("student"), other.use("loaded"):
        torch.testing.assert_close(other.velocity(x.to(torch.bfloat16), sigma, cond, 4.5),
                                   policy.velocity(x.to(torch.bfloat16), sigma, cond, 4.5), rtol=0, atol=0)


def test_a_full_copy_trained_in_bfloat16_is_warned_about(tiny_dir, policy):
    with pytest.warns(UserWarning, match="'student' trains in bfloat16.*--dtype float32"):
        Policy.from_pretrained(str(tiny_dir), dtype=torch.bfloat16).add_full_copy("student")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.add_full_copy("student")  # float32: nothing to say


def _named(policy, adapter):
    return [(n, p) for n, p in policy.transformer.named_parameters() if f".{adapter}." in n]


def test_auto_precision_is_bfloat16_on_a_gpu_and_float32_on_the_cpu():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("float32", "cuda") == "float32"
    with pytest.raises(ValueError, match="float16.*not supported; use auto, float32, bfloat16"):
        resolve_dtype("float16", "cpu")


@contextlib.contextmanager
def _scaled_vae(policy, scaling_factor=2.0, shift_factor=0.5):
    """The VAE with a scale and shift that a formula could get the wrong way round (restored after)."""
    vae = policy.pipeline.vae
    saved = vae.config.scaling_factor, vae.config.shift_factor
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    try:
        yield vae
    finally:
        vae.register_to_config(scaling_factor=saved[0], shift_factor=saved[1])


def test_decode_undoes_the_vaes_scale_and_shift(policy):
    latents = torch.randn(policy.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with _scaled_vae(policy) as vae, torch.no_grad():
        images = policy.decode(latents)
        expected = (vae.decode(latents / 2.0 + 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected)


def test_bad_model_paths_get_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Policy.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        Policy.from_pretrained(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="supported"):
        Policy.from_pretrained(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Its model_index.json is damaged: rebuild the folder or copy it again") as info:
        Policy.from_pretrained(str(tmp_path))
    assert "hf download" not in str(info.value)  # a local folder is not fetched from the hub


def test_adapter_errors(policy, tmp_path):
    with pytest.raises(ValueError, match="no adapter 'ghost'"):
        with policy.use("ghost"):
            pass
    policy.add_adapter("student", rank=2)
    with pytest.raises(ValueError, match="already exists"):
        policy.add_adapter("student", rank=2)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        policy.load_adapter("teacher", tmp_path)


def test_char_tokens_keep_case_and_give_each_quoted_character_one_token(tmp_path):
    from opd_bench.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tmp_path, max_length=24, char_tokens=True)

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]

    # Caption words stay whole lower-case tokens; quoted capitals never merge into them ("ON" is not "on").
    assert pieces('a sign that says "ON7"') == ["a</w>", "sign</w>", "that</w>", "says</w>", '"</w>', "O</w>", "N</w>", "7</w>", '"</w>']
    # The same character is the same token in any string.
    assert pieces('"AB"')[1] == pieces('"BA"')[2] == pieces('"XA"')[2]
    # And the plain CLIP tokenizer lower-cases, which is what the option avoids.
    plain = build_tokenizer(tmp_path / "plain", max_length=24)
    assert plain.convert_ids_to_tokens(plain('"ON"').input_ids)[2] == "on</w>"


def test_an_adapter_equals_the_base_until_its_first_update(policy):
    """equals_base lets evaluations reuse the base's scores for a fresh adapter: peft adds exact
    zeros, so the velocity is the base's to the bit."""
    policy.add_adapter("fresh", rank=4, alpha=8, seed=0)
    cond = policy.encode(["a red circle", "a blue square"])
    latents = torch.randn(2, *policy.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with policy.use(None):
            base = policy.velocity(latents, 0.5, cond, guidance_scale=4.5)
        with policy.use("fresh"):
            fresh = policy.velocity(latents, 0.5, cond, guidance_scale=4.5)
    assert policy.equals_base(None) and policy.equals_base("fresh") and torch.equal(base, fresh)
    lora_b = [p for n, p in policy.transformer.named_parameters() if ".lora_B.fresh." in n]
    with torch.no_grad():
        lora_b[0][0, 0] = 1e-3  # one update later
    assert lora_b and not policy.equals_base("fresh")
    policy.add_full_copy("copy", trainable=False)
    assert not policy.equals_base("copy")


def test_encode_images_is_the_inverse_of_decode(policy):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with _scaled_vae(policy) as vae, torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean
        reconstructed = (vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
        latents = policy.encode_images(images)
        torch.testing.assert_close(latents, (mean - 0.5) * 2.0)  # the sampler's scaled and shifted states
        assert torch.allclose(policy.decode(latents), reconstructed, atol=1e-5)


def test_max_batch_cuts_no_grad_forwards_and_decodes_into_chunks_of_the_same_samples(tiny_dir):
    from opd_bench.rollout import Prompt, rollout

    whole, chunked = Policy.from_pretrained(str(tiny_dir)), Policy.from_pretrained(str(tiny_dir), max_batch=2)
    sizes, decoded = [], []
    forward, decode = chunked._backend.forward, type(chunked.pipeline.vae).decode

    def recording_forward(transformer, latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return forward(transformer, latents, *args, **kwargs)

    def recording_decode(vae, latents, *args, **kwargs):
        decoded.append(latents.shape[0])
        return decode(vae, latents, *args, **kwargs)

    chunked._backend.forward = recording_forward
    chunked.pipeline.vae.decode = recording_decode.__get__(chunked.pipeline.vae)
    prompts = [Prompt("a red circle"), Prompt("a blue star"), Prompt("two green squares")]
    options = dict(images_per_prompt=2, num_steps=3, noise_level=0.7, seed=1, keep={"latents", "images"})
    a, b = rollout(whole, prompts, **options), rollout(chunked, prompts, **options)
    assert sizes == [4, 4, 4] * 3 and decoded == [2, 2, 2]  # 6 samples: 3 chunks of 2 (x2 with guidance) per step
    torch.testing.assert_close(b.latents, a.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-5)
    assert chunked.forward_counts == whole.forward_counts == {None: 36}
    sizes.clear()  # with gradients (a training micro-batch, sized by its trainer) the batch stays whole
    chunked.velocity(b.latents[:, 0], torch.full((6,), 0.9), chunked.encode([p.text for p in prompts for _ in range(2)]), 4.5)
    assert sizes == [12]
    with pytest.raises(ValueError, match=r"max_batch must be an integer >= 1, or None for no limit; got 0"):
        Policy.from_pretrained(str(tiny_dir), max_batch=0)
