"""VP diffusion (Eq. 30-31), the target-only X_0 loss (Eq. 19), and evidence clamping (Eq. 35)."""

import pytest
import torch

from completion.diffusion import VPSchedule, reverse_step, sample, sample_many, x0_loss

SCHEDULE = VPSchedule(num_steps=100)


def oracle(x0):
    """A perfect X_0 denoiser for the tensor x0."""
    return lambda x_t, t: x0.expand_as(x_t)


def problem(seed=0, shape=(3, 2, 6, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    evidence = (torch.rand(shape, generator=g) > 0.6).float()
    return x0, evidence


def test_schedule_is_the_variance_preserving_product_of_linear_betas():
    s = VPSchedule(num_steps=10, beta_start=0.1, beta_end=0.1)
    assert torch.allclose(s.alphas_cumprod, 0.9 ** torch.arange(1, 11, dtype=torch.float64))
    x0, noise = torch.ones(2, 3), torch.full((2, 3), 2.0)
    x_t = s.q_sample(x0, torch.tensor([0, 9]), noise)
    assert torch.allclose(x_t[0], torch.full((3,), 0.9**0.5 + 2 * 0.1**0.5))
    assert torch.allclose(x_t[1], torch.full((3,), 0.9**5 + 2 * (1 - 0.9**10) ** 0.5))


def test_timesteps_descend_from_the_last_step_to_zero():
    assert SCHEDULE.timesteps(100) == list(range(99, -1, -1))
    seq = SCHEDULE.timesteps(20)
    assert len(seq) == 20 and seq[0] == 99 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    with pytest.raises(ValueError):
        SCHEDULE.timesteps(101)


def test_the_eta_one_step_is_the_ddpm_posterior():
    s = SCHEDULE
    t = torch.arange(1, s.num_steps)
    abar, abar_prev, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    x_t, x0 = torch.randn(len(t), dtype=torch.float64), torch.randn(len(t), dtype=torch.float64)
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar)
    var = (1 - abar_prev) / (1 - abar) * beta
    zero, one = torch.zeros(len(t), dtype=torch.float64), torch.ones(len(t), dtype=torch.float64)
    assert torch.allclose(reverse_step(x_t, x0, abar, abar_prev, 1.0, zero), mean)
    step_sd = reverse_step(x_t, x0, abar, abar_prev, 1.0, one) - reverse_step(x_t, x0, abar, abar_prev, 1.0, zero)
    assert torch.allclose(step_sd**2, var)


def test_x0_loss_counts_only_target_entries():
    x0 = torch.zeros(1, 1, 2, 2)
    x0_hat = torch.tensor([[[[1.0, 2.0], [3.0, 100.0]]]])
    target = torch.tensor([[[[True, True], [True, False]]]])
    assert x0_loss(x0_hat, x0, target).item() == pytest.approx((1 + 4 + 9) / 3)


@pytest.mark.parametrize("steps,eta", [(None, None), (10, 0.0), (10, 1.0)])
def test_evidence_comes_back_bit_identical_and_an_oracle_is_recovered(steps, eta):
    x0, evidence = problem()
    out = sample(oracle(x0), x0 * evidence, evidence, SCHEDULE, steps, eta,
                 torch.Generator().manual_seed(1))
    assert torch.equal(out[evidence.bool()], x0[evidence.bool()])
    assert torch.allclose(out, x0, atol=1e-5)


def test_evidence_is_clamped_at_every_step():
    x0, evidence = problem()
    seen = []

    def spy(x_t, t):
        seen.append((x_t.clone(), t[0].item()))
        return torch.zeros_like(x_t)

    sample(spy, x0 * evidence, evidence, SCHEDULE, steps=5, generator=torch.Generator().manual_seed(2))
    assert [t for _, t in seen] == SCHEDULE.timesteps(5)
    for x_t, t in seen:  # the denoiser sees evidence entries drawn from q(x_t | x0)
        a = SCHEDULE.alphas_cumprod[t].item()
        residual = (x_t - a**0.5 * x0)[evidence.bool()] / (1 - a) ** 0.5
        assert residual.mean().item() == pytest.approx(0.0, abs=0.35)
        assert residual.std().item() == pytest.approx(1.0, abs=0.35)


def test_same_seed_same_samples_and_samples_differ_from_each_other():
    x0, evidence = problem()
    denoise = lambda x_t, t: 0.5 * x_t  # noqa: E731
    a = sample_many(denoise, x0 * evidence, evidence, SCHEDULE, 4, 10, 1.0, torch.Generator().manual_seed(3))
    b = sample_many(denoise, x0 * evidence, evidence, SCHEDULE, 4, 10, 1.0, torch.Generator().manual_seed(3))
    assert a.shape == (4, *x0.shape) and torch.equal(a, b)
    free = ~evidence.bool()
    assert not torch.allclose(a[0][free], a[1][free])


def test_the_v_estimate_follows_x_t_at_low_noise_and_the_output_at_high_noise():
    from completion.diffusion import x0_estimate

    x_t, v = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0, 10, 50, 98, 99])
    a = SCHEDULE.abar(t, x_t)
    v_est = x0_estimate(v, x_t, t, SCHEDULE, "v")
    assert torch.allclose(v_est, a.sqrt() * x_t - (1 - a).sqrt() * v)
    assert torch.equal(x0_estimate(v, x_t, t, SCHEDULE, "x0"), v)
    # a noisy sample that is exactly sqrt(a) x0 + sqrt(1 - a) eps has v = sqrt(a) eps - sqrt(1 - a) x0
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    noisy = SCHEDULE.q_sample(x0, t, eps)
    assert torch.allclose(x0_estimate(a.sqrt() * eps - (1 - a).sqrt() * x0, noisy, t, SCHEDULE, "v"), x0, atol=1e-5)
