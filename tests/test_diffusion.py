"""ddpmkit.diffusion against closed forms: target conversions, eq. 7, eq. 12 and the Gaussian moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_sampler import reverse_chain_moments

import ddpmkit
from ddpmkit import diffusion as D
from ddpmkit.interfaces import Denoiser


@pytest.fixture(scope="module")
def schedule():
    return ddpmkit.create_schedule("linear", num_timesteps=1000).to("cpu")


def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 4, 4, generator=g).clamp(-1, 1)
    eps = torch.randn(n, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999][:n])
    return x0, eps, t


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_every_target_gives_back_x0_and_eps(schedule, prediction):
    x0, eps, t = _batch()
    x_t = D.q_sample(schedule, x0, t, eps)
    target = D.training_target(schedule, x0, eps, t, prediction)
    x0_hat, eps_hat = D.split_prediction(schedule, x_t, t, target, prediction)
    # float32: x0 from eps divides by sqrt(abar_999) ~ 0.0064, which magnifies rounding
    assert torch.allclose(eps_hat, eps, atol=2e-3), (eps_hat - eps).abs().max()
    assert torch.allclose(x0_hat, x0, atol=2e-3), (x0_hat - x0).abs().max()


def test_v_is_salimans_and_ho(schedule):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), checked at the t where abar is closest to 1/2."""
    t = int(torch.argmin((schedule.alphas_cumprod - 0.5).abs()))
    ab = float(schedule.alphas_cumprod[t])
    x0, eps, _ = _batch()
    v = D.v_from_x0_eps(schedule, t, x0, eps)
    assert torch.allclose(v, math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0, atol=1e-6)
    # and x_t, v are a rotation of (x0, eps): |x_t|^2 + |v|^2 = |x0|^2 + |eps|^2
    x_t = D.q_sample(schedule, x0, t, eps)
    assert torch.allclose(x_t**2 + v**2, x0**2 + eps**2, atol=1e-5)


def test_posterior_is_eq_7(schedule):
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x0, eps, t = _batch()
    x_t = D.q_sample(schedule, x0, t, eps)
    mean, var = D.q_posterior_mean_variance(schedule, x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        ab_prev = abar[step - 1] if step > 0 else 1.0
        c1 = betas[step] * math.sqrt(ab_prev) / (1 - abar[step])
        c2 = (1 - ab_prev) * math.sqrt(1 - betas[step]) / (1 - abar[step])
        want = c1 * x0[i].double() + c2 * x_t[i].double()
        assert torch.allclose(mean[i].double(), want, atol=1e-5)
        assert float(var[i]) == pytest.approx((1 - ab_prev) / (1 - abar[step]) * betas[step], rel=1e-5, abs=1e-12)


def test_ancestral_step_is_the_posterior_mean_plus_noise(schedule):
    """eq. 12 with c^2 = beta-tilde is DDPM's eq. 11 mean: the two forms must agree."""
    x0, eps, _ = _batch()
    for t in (999, 500, 1, 0):
        x_t = D.q_sample(schedule, x0, t, eps)
        eps_hat = eps * 0.9  # any estimate: the identity holds for every (x0_hat, eps_hat) pair
        x0_hat = D.x0_from_eps(schedule, x_t, t, eps_hat)
        step = D.ancestral_steps(schedule)[999 - t]
        assert step.t == t and step.t_prev == t - 1
        got = D.reverse_step(schedule, step, x0_hat, eps_hat, noise=torch.zeros_like(x0))
        beta, ab = float(schedule.betas[t]), float(schedule.alphas_cumprod[t])
        eq11 = (x_t - beta / math.sqrt(1 - ab) * eps_hat) / math.sqrt(1 - beta)
        assert torch.allclose(got, eq11, atol=2e-4), (t, (got - eq11).abs().max())


def test_ddim_sigma_at_eta_1_is_the_posterior_std(schedule):
    for t in (999, 500, 10, 1):
        assert D.ddim_sigma(schedule, t, t - 1, 1.0) == pytest.approx(
            float(schedule.posterior_variance[t]) ** 0.5, rel=1e-4
        )
        assert D.ddim_sigma(schedule, t, t - 1, 0.0) == 0.0


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_gaussian_moments_match_an_independent_recursion(schedule, variance):
    """The core's moment propagation (eq. 12 form) against test_sampler's recursion (eq. 11 form)."""
    got = D.gaussian_reverse_moments(schedule, D.ancestral_steps(schedule, variance), 0.3, 0.2)
    want = reverse_chain_moments(1000, 0.3, 0.2, variance)
    assert got == pytest.approx(want, abs=2e-5)


class _Echo(Denoiser):
    """Returns whatever tensor the test put in ``answer``."""

    def __init__(self, prediction: str):
        super().__init__(image_shape=(1, 4, 4), num_timesteps=1000)
        self.prediction = prediction
        self.answer: torch.Tensor | None = None

    def forward(self, x_t, t):
        return self.answer


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_training_loss_follows_the_declared_target(schedule, prediction):
    x0, eps, t = _batch()
    model = _Echo(prediction)
    model.answer = D.training_target(schedule, x0, eps, t, prediction)
    assert float(D.training_loss(model, schedule, x0, t, eps)) == pytest.approx(0.0, abs=1e-10)
    for other in D.PREDICTIONS:
        if other != prediction:  # the right answer for another target is a wrong answer here
            model.answer = D.training_target(schedule, x0, eps, t, other)
            assert float(D.training_loss(model, schedule, x0, t, eps)) > 1e-3


def test_a_denoiser_returning_the_wrong_shape_is_named_by_its_shapes(schedule):
    x0, eps, t = _batch()
    model = _Echo("epsilon")
    model.answer = torch.zeros(6, 1, 2, 2)
    with pytest.raises(ValueError, match=r"forward returned shape \(6, 1, 2, 2\) for input \(6, 1, 4, 4\)"):
        D.training_loss(model, schedule, x0, t, eps)
