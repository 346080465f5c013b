import math

import pytest
import torch

from opd_bench.sde import flow_step, sde_std, step_kl


def _inputs(shape=(3, 4, 5, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _reference_log_density(x_next, x, v, s, s_next, a, s_max):
    """The Gaussian log-density of PAPER.md section 1, computed independently in float64."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    dt = s_next - s
    std_s = a * math.sqrt(s / (1 - (s_max if s >= 1 else s)))
    mean = x * (1 + std_s**2 * dt / (2 * s)) + v * (1 + std_s**2 * (1 - s) / (2 * s)) * dt
    normal = torch.distributions.Normal(mean, std_s * math.sqrt(-dt))
    return normal.log_prob(x_next).flatten(1)


@pytest.mark.parametrize("s, s_next", [(0.8, 0.6), (1.0, 0.9), (0.3, 0.0)])
def test_log_prob_is_the_gaussian_density(s, s_next):
    x, v = _inputs()
    out = flow_step(x, v, s, s_next, 0.7, generator=torch.Generator().manual_seed(1))
    reference = _reference_log_density(out.prev_sample, x, v, s, s_next, 0.7, s_next)
    torch.testing.assert_close(out.log_prob.double(), reference.mean(1), rtol=1e-5, atol=1e-5)
    summed = flow_step(x, v, s, s_next, 0.7, prev_sample=out.prev_sample, reduce="sum").log_prob
    torch.testing.assert_close(summed.double(), reference.sum(1), rtol=1e-5, atol=1e-3)


def test_the_sde_step_mean_and_std_by_hand():
    """One scalar step worked out on paper (PAPER.md section 1), so an error shared by the code and
    the reference density above cannot hide: x = 1, v = 0.5, s = 0.8 -> 0.6, a = 0.7.
    std_s = 0.7 sqrt(0.8 / 0.2) = 1.4, dt = -0.2;
    mean = 1 (1 + 1.96 (-0.2) / 1.6) + 0.5 (1 + 1.96 (0.2) / 1.6) (-0.2) = 0.755 - 0.1245 = 0.6305;
    the step's std 1.4 sqrt(0.2) = 0.6260990."""
    out = flow_step(torch.ones(1, 1), torch.full((1, 1), 0.5), 0.8, 0.6, 0.7, prev_sample=torch.ones(1, 1))
    torch.testing.assert_close(out.mean, torch.full((1, 1), 0.6305))
    torch.testing.assert_close(out.std, torch.tensor([0.6260990]))
    torch.testing.assert_close(out.dt, torch.tensor([-0.2]))


def test_sigma_one_uses_the_largest_sigma_below_one():
    x, v = _inputs()
    default = flow_step(x, v, 1.0, 0.9, 0.7, prev_sample=x)
    explicit = flow_step(x, v, 1.0, 0.9, 0.7, prev_sample=x, sigma_max=0.9)
    other = flow_step(x, v, 1.0, 0.9, 0.7, prev_sample=x, sigma_max=0.95)
    torch.testing.assert_close(default.std, explicit.std)
    assert not torch.allclose(default.std, other.std)
    expected = 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1)
    torch.testing.assert_close(default.std, torch.full((3,), expected))


def test_ode_step_is_deterministic_euler():
    x, v = _inputs()
    a = flow_step(x, v, 0.5, 0.25, 0.0, generator=torch.Generator().manual_seed(0))
    b = flow_step(x, v, 0.5, 0.25, 0.0, generator=torch.Generator().manual_seed(99))
    torch.testing.assert_close(a.prev_sample, x - 0.25 * v)
    torch.testing.assert_close(a.prev_sample, b.prev_sample)
    torch.testing.assert_close(a.mean, a.prev_sample)
    assert torch.all(a.std == 0)
    assert torch.isnan(a.log_prob).all()  # a point mass has no density


def test_sde_mean_reduces_to_euler_as_noise_vanishes():
    x, v = _inputs()
    tiny_noise = flow_step(x, v, 0.5, 0.25, 1e-4, prev_sample=x)
    torch.testing.assert_close(tiny_noise.mean, x - 0.25 * v, rtol=1e-4, atol=1e-4)


def test_scoring_a_given_sample_reproduces_its_log_prob():
    x, v = _inputs()
    drawn = flow_step(x, v, 0.7, 0.5, 0.7, generator=torch.Generator().manual_seed(3))
    rescored = flow_step(x, v, 0.7, 0.5, 0.7, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob)
    torch.testing.assert_close(rescored.prev_sample, drawn.prev_sample)


def test_per_sample_sigmas_match_scalar_calls():
    x, v = _inputs()
    sigmas, nexts = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    batched = flow_step(x, v, sigmas, nexts, 0.5, prev_sample=x)
    for i in range(3):
        single = flow_step(x[i : i + 1], v[i : i + 1], float(sigmas[i]), float(nexts[i]), 0.5, prev_sample=x[i : i + 1])
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 64, 32), (2, 7)])
def test_any_latent_shape(shape):
    x, v = _inputs(shape)
    out = flow_step(x, v, 0.6, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == shape and out.log_prob.shape == (2,) and out.std.shape == (2,)


def test_bfloat16_inputs():
    x, v = _inputs(dtype=torch.bfloat16)
    out = flow_step(x, v, 0.6, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.bfloat16 and out.mean.dtype == torch.float32
    # the mean is the float32 one, not rounded to bf16: OPD's loss measures gaps between two means
    # that bf16 would quantise to whole steps of ~0.008
    exact = flow_step(x.float(), v.float(), 0.6, 0.4, 0.7, prev_sample=out.prev_sample.float())
    assert torch.equal(out.mean, exact.mean) and not torch.equal(out.mean, out.mean.bfloat16().float())
    assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()
    rescored = flow_step(x, v, 0.6, 0.4, 0.7, prev_sample=out.prev_sample)
    torch.testing.assert_close(rescored.log_prob, out.log_prob)
    kl = step_kl(out.mean, x, out.std)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all()


def test_bad_inputs_are_refused():
    x, v = _inputs()
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        flow_step(x, v, 0.4, 0.6, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        flow_step(x, v, 0.6, 0.4, -1)
    with pytest.raises(ValueError, match="differ"):
        flow_step(x, v[:1], 0.6, 0.4, 0.7)
    with pytest.raises(ValueError, match="pass dt"):
        step_kl(x, v, 0.1, weighting="reference")
    with pytest.raises(ValueError, match="weighting"):
        step_kl(x, v, 0.1, weighting="exact-ish")


def test_step_kl_is_zero_for_equal_means():
    x, _ = _inputs()
    assert torch.all(step_kl(x, x.clone(), 0.3) == 0)
    assert torch.all(step_kl(x, x.clone(), 0.0) == 0)


def test_step_kl_matches_monte_carlo_estimate():
    """E_{x' ~ p_a}[log p_a(x') - log p_b(x')] with both transitions from the same state."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 3)
    v_a, v_b = torch.randn_like(x), torch.randn_like(x)
    draws = 20000
    xs = x.expand(draws, -1, -1, -1)
    a = flow_step(xs, v_a.expand_as(xs), 0.7, 0.55, 0.8, generator=torch.Generator().manual_seed(5), reduce="sum")
    b = flow_step(xs, v_b.expand_as(xs), 0.7, 0.55, 0.8, prev_sample=a.prev_sample, reduce="sum")
    monte_carlo = (a.log_prob - b.log_prob).double()
    closed = step_kl(a.mean[:1], b.mean[:1], a.std[:1], reduce="sum").double()
    standard_error = monte_carlo.std() / math.sqrt(draws)
    assert abs(monte_carlo.mean() - closed[0]) < 4 * standard_error
    per_dim = step_kl(a.mean[:1], b.mean[:1], a.std[:1], reduce="mean")
    torch.testing.assert_close(per_dim * x[0].numel(), closed.float())


def test_step_kl_weightings_and_ode_limit():
    mean_a, mean_b = _inputs()
    std, dt = torch.tensor([0.2, 0.2, 0.0]), torch.tensor([-0.1, -0.1, -0.1])
    squared = ((mean_a - mean_b) ** 2).flatten(1).sum(1)
    exact = step_kl(mean_a, mean_b, std, reduce="sum")
    reference = step_kl(mean_a, mean_b, std, weighting="reference", dt=dt, reduce="sum")
    torch.testing.assert_close(exact[:2], squared[:2] / (2 * 0.04))
    torch.testing.assert_close(reference[:2], squared[:2] * 0.1 / (2 * 0.04))  # 1 / (2 std_s^2)
    torch.testing.assert_close(exact[2], squared[2] / 2)  # mean matching on the ODE step
    torch.testing.assert_close(reference[2], squared[2] / 2)


def test_step_kl_gradient_is_analytic():
    """d/dv of w ||mu(v) - mu_T||^2 equals 2 w c_s (mu - mu_T), c_s = (1 + std_s^2 (1-s)/(2s)) dt."""
    x, v_teacher = _inputs()
    v = torch.randn_like(x, requires_grad=True)
    s, s_next, a = 0.6, 0.45, 0.7
    student = flow_step(x, v, s, s_next, a, prev_sample=x)
    teacher = flow_step(x, v_teacher, s, s_next, a, prev_sample=x)
    step_kl(student.mean, teacher.mean.detach(), student.std, reduce="sum").sum().backward()
    std_s, dt = sde_std(torch.tensor(s), a, torch.tensor(s_next)), s_next - s
    c_s = (1 + std_s**2 * (1 - s) / (2 * s)) * dt
    weight = 1 / (2 * float(student.std[0]) ** 2)
    expected = 2 * weight * c_s * (student.mean - teacher.mean).detach()
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-5)
    # And the affine identity behind it: mu_theta - mu_T = c_s (v_theta - v_T).
    torch.testing.assert_close((student.mean - teacher.mean).detach(), c_s * (v - v_teacher).detach(), rtol=1e-4, atol=1e-6)
