"""The linear schedule and the quantities the core derives from it, against closed forms in float64.

The expected values are computed here with Python's math module, independently of torch and of
ddpmkit's own derivation (Ho et al. 2020, eqs. 4, 6, 7).
"""

from __future__ import annotations

import math

import pytest
import torch

import ddpmkit
from ddpmkit import ConfigError

T = 1000
BETA_START, BETA_END = 1e-4, 0.02


def beta(t: int, T: int = T, b0: float = BETA_START, b1: float = BETA_END) -> float:
    """beta_t for 0-based t: linear from b0 (t = 0) to b1 (t = T - 1)."""
    return b0 + (b1 - b0) * t / (T - 1) if T > 1 else b0


def alpha_bar(t: int, T: int = T, b0: float = BETA_START, b1: float = BETA_END) -> float:
    """abar_t = prod_{s <= t} (1 - beta_s); abar_{-1} = 1."""
    return math.prod(1.0 - beta(s, T, b0, b1) for s in range(t + 1))


@pytest.fixture(scope="module")
def schedule():
    return ddpmkit.create_schedule("linear")


SOME_T = [0, 1, 2, 10, 500, 998, 999]


def test_defaults_are_the_tutorials(schedule):
    assert schedule.num_timesteps == T
    assert schedule.options.beta_start == BETA_START
    assert schedule.options.beta_end == BETA_END
    assert schedule.betas.shape == (T,)


def test_betas_endpoints_and_linear(schedule):
    b = schedule.betas.double()
    assert b[0].item() == pytest.approx(BETA_START, rel=1e-6)
    assert b[-1].item() == pytest.approx(BETA_END, rel=1e-6)
    for t in SOME_T:
        assert b[t].item() == pytest.approx(beta(t), rel=1e-6, abs=1e-12)
    # constant increments
    diffs = b.diff()
    assert torch.allclose(diffs, torch.full_like(diffs, (BETA_END - BETA_START) / (T - 1)), rtol=1e-3)


def test_alphas_and_cumprod(schedule):
    for t in SOME_T:
        assert schedule.alphas[t].item() == pytest.approx(1 - beta(t), rel=1e-7)
        ab = alpha_bar(t)
        assert schedule.alphas_cumprod[t].item() == pytest.approx(ab, rel=1e-5)
        assert schedule.sqrt_alphas_cumprod[t].item() == pytest.approx(math.sqrt(ab), rel=1e-5)
        assert schedule.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 - ab), rel=1e-5)
        ab_prev = alpha_bar(t - 1) if t > 0 else 1.0
        assert schedule.alphas_cumprod_prev[t].item() == pytest.approx(ab_prev, rel=1e-5)
    # well-known values of this schedule: abar_0 = 1 - 1e-4, abar_999 ~ 4.04e-5
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert schedule.alphas_cumprod[999].item() == pytest.approx(4.0358e-5, rel=1e-3)
    # strictly decreasing
    assert (schedule.alphas_cumprod.diff() < 0).all()


def test_posterior_variance(schedule):
    # eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, 0 at the first step
    assert schedule.posterior_variance[0].item() == 0.0
    for t in SOME_T[1:]:
        expected = (1 - alpha_bar(t - 1)) / (1 - alpha_bar(t)) * beta(t)
        assert schedule.posterior_variance[t].item() == pytest.approx(expected, rel=1e-5)
    # 0 <= beta_tilde_t <= beta_t
    assert (schedule.posterior_variance <= schedule.betas).all()
    assert (schedule.posterior_variance >= 0).all()


def test_posterior_mean_coefficients(schedule):
    # eq. 7: mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    for t in SOME_T:
        ab, ab_prev, b = alpha_bar(t), (alpha_bar(t - 1) if t > 0 else 1.0), beta(t)
        c1 = math.sqrt(ab_prev) * b / (1 - ab)
        c2 = math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab)
        assert schedule.posterior_mean_coef1[t].item() == pytest.approx(c1, rel=1e-5)
        assert schedule.posterior_mean_coef2[t].item() == pytest.approx(c2, abs=1e-7, rel=1e-5)
    # at t = 0 the posterior mean is x0 itself
    assert schedule.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-6)
    assert schedule.posterior_mean_coef2[0].item() == 0.0


def test_posterior_mean_is_consistent_with_eq_11(schedule):
    """With x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar), mu_tilde equals (x_t - beta/sqrt(1-abar) eps) / sqrt(alpha)."""
    s = schedule
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(16, generator=g, dtype=torch.float64)
    eps = torch.randn(16, generator=g, dtype=torch.float64)
    for t in [1, 10, 500, 999]:
        ab, b = alpha_bar(t), beta(t)
        x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        via_posterior = s.posterior_mean_coef1[t].double() * x0 + s.posterior_mean_coef2[t].double() * x_t
        via_eps = (x_t - b / math.sqrt(1 - ab) * eps) / math.sqrt(1 - b)
        assert torch.allclose(via_posterior, via_eps, rtol=1e-4, atol=1e-4)


def test_every_tensor_is_float32(schedule):
    names = [
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]
    for name in names:
        value = getattr(schedule, name)
        assert isinstance(value, torch.Tensor), name
        assert value.dtype == torch.float32, name
        assert value.shape == (T,), name
        assert torch.isfinite(value).all(), name


def test_derived_in_float64(schedule):
    """1 - abar_{t-1} at small t cancels catastrophically in float32 (about 1.6e-4 relative error in
    beta_tilde_2); derived in float64 and rounded once, every value is within float32 rounding (6e-8)."""
    for t in range(1, 11):
        expected = (1 - alpha_bar(t - 1)) / (1 - alpha_bar(t)) * beta(t)
        assert schedule.posterior_variance[t].item() == pytest.approx(expected, rel=1e-6)
        assert schedule.posterior_mean_coef2[t].item() == pytest.approx(
            math.sqrt(1 - beta(t)) * (1 - alpha_bar(t - 1)) / (1 - alpha_bar(t)), rel=1e-6
        )


def test_to_moves_every_tensor():
    s = ddpmkit.create_schedule("linear", num_timesteps=10)
    assert s.device == torch.device("cpu")
    assert s.to("cpu") is s
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    # the meta device exists everywhere: proves the tensors move without needing a GPU
    assert s.to("meta") is s
    assert s.device.type == "meta"
    names = [
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ]
    for name in names:
        assert getattr(s, name).device.type == "meta", name
        assert getattr(s, name).dtype == torch.float32, name


def test_custom_options():
    s = ddpmkit.create_schedule("linear", num_timesteps=50, beta_start=1e-3, beta_end=0.2)
    assert s.num_timesteps == 50
    for t in [0, 1, 25, 49]:
        assert s.betas[t].item() == pytest.approx(beta(t, 50, 1e-3, 0.2), rel=1e-6)
        assert s.alphas_cumprod[t].item() == pytest.approx(alpha_bar(t, 50, 1e-3, 0.2), rel=1e-5)


def test_single_step():
    s = ddpmkit.create_schedule("linear", num_timesteps=1)
    assert s.num_timesteps == 1
    assert s.betas.tolist() == pytest.approx([1e-4])
    assert s.alphas_cumprod.tolist() == pytest.approx([1 - 1e-4])
    assert s.alphas_cumprod_prev.tolist() == [1.0]
    assert s.posterior_variance.tolist() == [0.0]
    assert s.posterior_mean_coef1.tolist() == pytest.approx([1.0])
    assert s.posterior_mean_coef2.tolist() == [0.0]


@pytest.mark.parametrize(
    "options, names",
    [
        ({"beta_start": 0.02, "beta_end": 0.01}, ["beta_end", "beta_start"]),
        ({"beta_start": 0.01, "beta_end": 0.01}, ["beta_end", "beta_start"]),
        ({"beta_start": 1.0}, ["beta_start"]),
        ({"beta_start": 1.5, "beta_end": 2.0}, ["beta_start"]),
        ({"beta_end": 1.0}, ["beta_end"]),
        ({"beta_start": 0.0}, ["beta_start"]),
        ({"beta_start": -0.1}, ["beta_start"]),
        ({"num_timesteps": 0}, ["num_timesteps"]),
        ({"num_timesteps": -5}, ["num_timesteps"]),
        ({"num_timesteps": "many"}, ["num_timesteps"]),
        ({"bogus": 1}, ["bogus", "unknown"]),
    ],
)
def test_bad_options_raise_config_error_naming_the_option(options, names):
    with pytest.raises(ConfigError) as info:
        ddpmkit.create_schedule("linear", **options)
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert "Value error," not in message  # pydantic's internal prefix is not for users
    assert "\n" not in message


def test_unknown_schedule_lists_installed():
    with pytest.raises(ddpmkit.PluginError, match=r"unknown schedule 'cosine-nope'.*installed: .*linear"):
        ddpmkit.create_schedule("cosine-nope")
