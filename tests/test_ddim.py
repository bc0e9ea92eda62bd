"""The built-in ddim sampler and cosine schedule against closed forms, and every sampler with x0/v denoisers.

On data x0 ~ N(mu, s^2) the exact predictor makes each DDIM step affine in x: at eta = 0 the output is
exactly A x_T + B per pixel, with A and B from a float64 recursion written here from Song et al.
(2021), eq. 12, independently of ddpmkit.diffusion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.diffusion import gaussian_reverse_moments
from ddpmkit.testing import GaussianOracle
from ddpmkit_plugins.ddim import spaced_timesteps

MU, S = 0.3, 0.2
SHAPE = (16, 1, 32, 32)
N = math.prod(SHAPE)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_spacings():
    assert spaced_timesteps(1000, 5, "leading") == [800, 600, 400, 200, 0]
    assert spaced_timesteps(1000, 5, "trailing") == [999, 799, 599, 399, 199]
    assert spaced_timesteps(1000, 5, "linspace") == [999, 749, 500, 250, 0]
    assert spaced_timesteps(10, 10, "leading") == list(range(9, -1, -1))
    assert spaced_timesteps(10, 10, "trailing") == list(range(9, -1, -1))
    for spacing in ("leading", "trailing", "linspace"):
        ts = spaced_timesteps(1000, 50, spacing)
        assert len(ts) == 50 and all(0 <= t < 1000 for t in ts) and ts == sorted(ts, reverse=True)


def ddim_affine(ts: list[int], abar: np.ndarray, mu: float, s: float) -> tuple[float, float]:
    """(A, B) with output = A x_T + B for deterministic DDIM over ``ts`` with the exact predictor."""
    A, B = 1.0, 0.0
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        ab, ab_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
        # eps_hat = c (x - sqrt(ab) mu), c = sqrt(1 - ab) / (ab s^2 + 1 - ab)
        c = math.sqrt(1 - ab) / (ab * s * s + 1 - ab)
        # x0_hat = (x - sqrt(1 - ab) eps_hat) / sqrt(ab); x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat
        k_x = (math.sqrt(ab_prev) * (1 - math.sqrt(1 - ab) * c) / math.sqrt(ab)) + math.sqrt(1 - ab_prev) * c
        k_0 = (
            math.sqrt(ab_prev) * math.sqrt(1 - ab) * c * math.sqrt(ab) * mu / math.sqrt(ab)
            - math.sqrt(1 - ab_prev) * c * math.sqrt(ab) * mu
        )
        A, B = k_x * A, k_x * B + k_0
    return A, B


@pytest.mark.parametrize("steps, spacing", [(10, "leading"), (50, "leading"), (50, "trailing"), (200, "linspace")])
def test_deterministic_ddim_is_exactly_the_closed_form(steps, spacing):
    schedule = ddpmkit.create_schedule("linear", num_timesteps=1000)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sampler = ddpmkit.create_sampler("ddim", steps=steps, spacing=spacing)
    oracle = GaussianOracle(schedule, MU, S, image_shape=SHAPE[1:])
    x = sampler.sample(oracle, schedule, SHAPE, generator=torch.Generator().manual_seed(5)).double()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)).double()
    A, B = ddim_affine(spaced_timesteps(1000, steps, spacing), abar, MU, S)
    want = (A * x_T + B).clamp(-1, 1)
    assert float((x - want).abs().max()) < 2e-4
    # and the pixel statistics are those of N(B, A^2): the core's moment propagation agrees
    mean, std = gaussian_reverse_moments(schedule, sampler.reverse_steps(schedule), MU, S)
    assert (mean, std) == pytest.approx((B, abs(A)), abs=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
@pytest.mark.parametrize(
    "name, options",
    [("ddpm", {}), ("ddpm", {"variance": "posterior"}), ("ddim", {"steps": 100}), ("ddim", {"steps": 20, "eta": 1.0})],
)
def test_samplers_recover_the_data_from_any_prediction_target(name, options, prediction):
    """The exact epsilon-, x0- or v-predictor of N(mu, s^2), sampled by ddpm or ddim, gives back the distribution:
    its moments match the exact answer for the sampler's steps within 5 standard errors (+ float32 rounding).
    That answer is N(mu, s^2) up to the discretisation: within 0.005 for ddpm's 1000 steps; few-step DDIM
    under-disperses this narrow target (std 0.188 at 100 steps, eta = 0; 0.129 at 20 steps, eta = 1)."""
    schedule = ddpmkit.create_schedule("linear", num_timesteps=1000)
    sampler = ddpmkit.create_sampler(name, **options)
    oracle = GaussianOracle(schedule, MU, S, image_shape=SHAPE[1:], prediction=prediction)
    x = sampler.sample(oracle, schedule, SHAPE, generator=torch.Generator().manual_seed(1)).double()
    exact_mean, exact_std = gaussian_reverse_moments(schedule, sampler.reverse_steps(schedule), MU, S)
    assert abs(float(x.mean()) - exact_mean) < 5 * S / math.sqrt(N) + 5e-4
    assert abs(float(x.std()) - exact_std) < 5 * S / math.sqrt(2 * N) + 5e-4
    assert abs(exact_mean - MU) < 0.005
    assert abs(exact_std - S) < (0.005 if name == "ddpm" else 0.075)


def test_ddim_refuses_more_steps_than_the_schedule_has():
    schedule = ddpmkit.create_schedule("linear", num_timesteps=20)
    with pytest.raises(ddpmkit.ConfigError, match="sampler.options.steps: 50 steps exceed the schedule's T = 20"):
        ddpmkit.create_sampler("ddim", steps=50).timesteps(schedule)


def test_cosine_schedule_is_nichol_and_dhariwal():
    """abar_t = f(t + 1) / f(0) (t counted from 0), f(u) = cos^2((u / T + s) / (1 + s) pi / 2), beta capped at 0.999."""
    T, s = 1000, 0.008
    sched = ddpmkit.create_schedule("cosine", num_timesteps=T)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = sched.make_betas()
    assert betas.dtype == torch.float64
    abar = torch.cumprod(1 - betas, 0)
    for t in (0, 1, 100, 500, 900, 990):
        assert float(abar[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(betas.max()) == pytest.approx(0.999) and float(betas[-1]) == pytest.approx(0.999)
    assert float(betas[0]) == pytest.approx(1 - f(1) / f(0), rel=1e-9)
    assert float(sched.snr()[-1]) < 1e-6
    capped = ddpmkit.create_schedule("cosine", num_timesteps=T, max_beta=0.5)
    assert float(capped.betas.max()) == pytest.approx(0.5)
