"""The ddpm ancestral sampler against an analytic target.

For data x0 ~ N(mu, s^2) per pixel, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is Gaussian too, and the
exact epsilon predictor is E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t).
Sampling with it must give back N(mu, s^2).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.interfaces import Denoiser

MU, S = 0.3, 0.2
SHAPE = (64, 1, 32, 32)
N = math.prod(SHAPE)  # 65,536 independent pixels
SE_MEAN = S / math.sqrt(N)  # 7.8e-4
SE_STD = S / math.sqrt(2 * N)  # 5.5e-4 (Gaussian data)


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianEps(Denoiser):
    """The exact epsilon predictor for x0 ~ N(mu, s^2), from abar computed here in float64."""

    def __init__(self, alphas_cumprod: np.ndarray, mu: float, s: float) -> None:
        super().__init__(image_shape=(1, 32, 32), num_timesteps=len(alphas_cumprod))
        self.register_buffer("abar", torch.tensor(alphas_cumprod, dtype=torch.float64))
        self.mu, self.s = mu, s
        self.calls: list[int] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        ab = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t.double() - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        return eps.to(x_t.dtype)


class ConstantX0Eps(Denoiser):
    """Predicts the epsilon that implies x0 = value everywhere (a delta target, possibly outside [-1, 1])."""

    def __init__(self, alphas_cumprod: np.ndarray, value: float) -> None:
        super().__init__(image_shape=(1, 8, 8), num_timesteps=len(alphas_cumprod))
        self.register_buffer("abar", torch.tensor(alphas_cumprod, dtype=torch.float64))
        self.value = value

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.abar[t].view(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * self.value) / (1 - ab).sqrt()).to(x_t.dtype)


def linear_abar(T: int, b0: float = 1e-4, b1: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    return betas, np.cumprod(1 - betas)


def reverse_chain_moments(T: int, mu: float, s: float, variance: str, mu_model: float | None = None):
    """Exact mean and std of the sampler's output with the Gaussian predictor, computed in float64.

    Every step is affine in x plus independent noise, so x stays Gaussian: starting from N(0, 1),
    x <- A x + B + sigma z with A = (1 - k c) / sqrt(alpha), B = k c sqrt(abar) mu / sqrt(alpha),
    k = beta / sqrt(1 - abar), c = sqrt(1 - abar) / (abar s^2 + 1 - abar). This is independent of the
    sampler's code and tells how far the T-step discretisation is from N(mu, s^2).
    """
    mu_model = mu if mu_model is None else mu_model
    betas, abar = linear_abar(T)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    sig2 = betas if variance == "beta" else betas * (1 - abar_prev) / (1 - abar)
    m, v = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        alpha = 1 - betas[t]
        k = betas[t] / math.sqrt(1 - abar[t])
        c = math.sqrt(1 - abar[t]) / (abar[t] * s * s + 1 - abar[t])
        A = (1 - k * c) / math.sqrt(alpha)
        B = k * c * math.sqrt(abar[t]) * mu_model / math.sqrt(alpha)
        m, v = A * m + B, A * A * v + (sig2[t] if t > 0 else 0.0)
    return m, math.sqrt(v)


@functools.cache
def draw(variance: str, *, mu_model: float = MU, clip: bool = False, seed: int = 0, shape=SHAPE, T: int = 1000):
    """Sample with the exact predictor (cached: several tests look at the same draw; do not modify it)."""
    schedule = ddpmkit.create_schedule("linear", num_timesteps=T)
    _, abar = linear_abar(T)
    sampler = ddpmkit.create_sampler("ddpm", variance=variance, clip_denoised=clip)
    denoiser = GaussianEps(abar, mu_model, S)
    x = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(seed))
    return x, denoiser


# The discretisation of the reverse process (T = 1000, linear betas) is not exact even with the exact
# predictor. Its bias, from reverse_chain_moments: mean -5e-7 for both options; std +0.00093 with
# sigma^2 = beta and -0.0037 with sigma^2 = beta-tilde (the posterior variance under-disperses a
# distribution of width s = 0.2). The latter exceeds 5 standard errors of the sample std (0.0028), so
# each check compares with N(mu, s^2) within 5 SE + |bias|, and, tighter, with the chain's exact moments
# within 5 SE. Clamping to [-1, 1] cuts 3.5 s above mu: its effect (~1e-5) is negligible.
@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("clip", [False, True])
def test_recovers_gaussian_target(variance, clip):
    x, denoiser = draw(variance, clip=clip)
    assert x.shape == SHAPE
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    mean, std = x.double().mean().item(), x.double().std().item()

    chain_mean, chain_std = reverse_chain_moments(1000, MU, S, variance)
    bias_mean, bias_std = chain_mean - MU, chain_std - S
    assert abs(bias_mean) < 1e-5 and abs(bias_std) < 0.005  # the discretisation is close to exact

    assert abs(mean - chain_mean) < 5 * SE_MEAN, (mean, chain_mean)
    assert abs(std - chain_std) < 5 * SE_STD, (std, chain_std)
    assert abs(mean - MU) < 5 * SE_MEAN + abs(bias_mean), (mean, MU)
    assert abs(std - S) < 5 * SE_STD + abs(bias_std), (std, S)
    # one denoiser call per step, t from T-1 down to 0
    assert denoiser.calls == list(range(999, -1, -1))


def test_variance_options_differ_as_predicted():
    """beta gives a wider result than beta-tilde by ~0.0046: the option is really applied."""
    std_beta = draw("beta")[0].double().std().item()
    std_post = draw("posterior")[0].double().std().item()
    predicted = reverse_chain_moments(1000, MU, S, "beta")[1] - reverse_chain_moments(1000, MU, S, "posterior")[1]
    # same seed, same noise: the sampling error largely cancels in the difference
    assert std_beta - std_post == pytest.approx(predicted, abs=5 * SE_STD)


def test_wrong_predictor_is_detected():
    """The check above has teeth: a predictor for mu + 0.02 moves the sample mean far beyond the tolerance."""
    x, _ = draw("beta", mu_model=MU + 0.02)
    mean = x.double().mean().item()
    shifted_mean, _ = reverse_chain_moments(1000, MU, S, "beta", mu_model=MU + 0.02)
    assert abs(shifted_mean - MU) > 0.019
    assert abs(mean - MU) > 5 * 5 * SE_MEAN  # 0.02 is 25 standard errors away
    assert abs(mean - shifted_mean) < 5 * SE_MEAN


def test_missing_noise_or_wrong_sign_would_fail():
    """Recompute the recursion the way a broken sampler would, with the same tensors the real one uses."""
    schedule = ddpmkit.create_schedule("linear")
    _, abar = linear_abar(1000)
    denoiser = GaussianEps(abar, MU, S)
    g = torch.Generator().manual_seed(0)
    shape = (16, 1, 32, 32)
    for broken in ("no-noise", "wrong-sign"):
        x = torch.randn(shape, generator=g)
        for t in range(999, -1, -1):
            eps = denoiser(x, torch.full((shape[0],), t))
            sign = -1.0 if broken == "wrong-sign" else 1.0
            x = (x - sign * schedule.betas[t] / schedule.sqrt_one_minus_alphas_cumprod[t] * eps) / schedule.alphas[
                t
            ].sqrt()
            if t > 0 and broken != "no-noise":
                x = x + schedule.betas[t].sqrt() * torch.randn(shape, generator=g)
        x = x.clamp(-1, 1).double()
        n = x.numel()
        off_mean = abs(x.mean().item() - MU) > 5 * S / math.sqrt(n) + 1e-5
        off_std = abs(x.std().item() - S) > 5 * S / math.sqrt(2 * n) + 0.005
        assert off_mean or off_std, broken


def small(T: int = 20):
    schedule = ddpmkit.create_schedule("linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2)
    abar = schedule.alphas_cumprod.double().numpy()
    return schedule, GaussianEps(abar, MU, S)


def test_equal_seeds_equal_output_different_seeds_differ():
    schedule, denoiser = small()
    sampler = ddpmkit.create_sampler("ddpm")
    shape = (4, 1, 8, 8)
    a = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(123))
    b = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(123))
    c = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the global RNG plays no part
    torch.manual_seed(0)
    d = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(123))
    torch.manual_seed(999)
    e = sampler.sample(denoiser, schedule, shape, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, d) and torch.equal(a, e)


def test_callback_sees_every_step():
    schedule, denoiser = small(T=20)
    sampler = ddpmkit.create_sampler("ddpm")
    seen = []

    def callback(index, t, x):
        assert isinstance(x, torch.Tensor) and x.shape == (3, 1, 8, 8)
        seen.append((index, t, x.clone()))

    out = sampler.sample(
        denoiser, schedule, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), callback=callback
    )
    assert [i for i, _, _ in seen] == list(range(20))
    assert [t for _, t, _ in seen] == list(range(19, -1, -1))
    # the last x the callback sees is the result (before clamping, which does nothing here)
    assert torch.allclose(seen[-1][2].clamp(-1, 1), out)


def test_a_callback_that_takes_x0_gets_each_steps_clean_image_estimate():
    """k-diffusion's habit: the step's x0 estimate goes to callbacks that ask for it; at the last DDPM step
    (no noise, abar_prev = 1) the sample is that estimate."""
    schedule, denoiser = small(T=20)
    sampler = ddpmkit.create_sampler("ddpm")
    seen = []
    out = sampler.sample(
        denoiser,
        schedule,
        (3, 1, 8, 8),
        generator=torch.Generator().manual_seed(0),
        callback=lambda index, t, x, x0: seen.append((x.clone(), x0.clone())),
    )
    assert len(seen) == 20 and all(x0.shape == (3, 1, 8, 8) for _, x0 in seen)
    assert torch.allclose(seen[-1][0], seen[-1][1]) and torch.allclose(seen[-1][1].clamp(-1, 1), out)
    assert not torch.allclose(seen[0][0], seen[0][1])  # early on, x_t is mostly noise, not its estimate
    from ddpmkit.diffusion import takes_x0

    assert takes_x0(lambda i, t, x, **kw: None) and not takes_x0(lambda i, t, x: None) and not takes_x0(print)


def test_output_is_within_minus_one_one():
    T = 20
    schedule = ddpmkit.create_schedule("linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2)
    abar = schedule.alphas_cumprod.double().numpy()
    for value in (5.0, -5.0):
        out = ddpmkit.create_sampler("ddpm").sample(
            ConstantX0Eps(abar, value), schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)
        )
        assert out.min().item() >= -1.0 and out.max().item() <= 1.0
        assert torch.allclose(out, torch.full_like(out, math.copysign(1.0, value)))


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_clip_denoised(variance):
    """With a predictor implying x0 = 5, clipping makes every step aim at x0 = 1: the final x is exactly 1
    (coef1_0 = 1, coef2_0 = 0); without clipping the chain ends at 5 (seen through the callback)."""
    T = 20
    schedule = ddpmkit.create_schedule("linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2)
    abar = schedule.alphas_cumprod.double().numpy()
    denoiser = ConstantX0Eps(abar, 5.0)
    last = {}
    for clip in (False, True):
        sampler = ddpmkit.create_sampler("ddpm", variance=variance, clip_denoised=clip)
        sampler.sample(
            denoiser,
            schedule,
            (2, 1, 8, 8),
            generator=torch.Generator().manual_seed(0),
            callback=lambda i, t, x, clip=clip: last.__setitem__(clip, x.clone()),
        )
    assert torch.allclose(last[False], torch.full_like(last[False], 5.0), atol=1e-3)
    assert torch.allclose(last[True], torch.ones_like(last[True]), atol=1e-5)


def test_sampler_options_are_validated():
    with pytest.raises(ddpmkit.ConfigError, match="variance"):
        ddpmkit.create_sampler("ddpm", variance="large")
    with pytest.raises(ddpmkit.ConfigError, match="clip_denoised"):
        ddpmkit.create_sampler("ddpm", clip_denoised="maybe")
    with pytest.raises(ddpmkit.ConfigError, match="temperature"):
        ddpmkit.create_sampler("ddpm", temperature=1.0)
    assert ddpmkit.create_sampler("ddpm").options.variance == "beta"
    assert ddpmkit.create_sampler("ddpm").options.clip_denoised is False


def test_runs_on_the_denoisers_device_with_a_parameterless_buffer():
    """The sampler finds the device from a buffer when there is no parameter; the result is on it."""
    schedule, denoiser = small()
    assert not list(denoiser.parameters())
    out = ddpmkit.create_sampler("ddpm").sample(denoiser, schedule, (1, 1, 8, 8), generator=torch.Generator())
    assert out.device == denoiser.abar.device
