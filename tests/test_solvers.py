"""Heun and DPM-Solver++(2M), solvers outside the reverse-step family, and what the kit now asks of such solvers:
their stated answers held per class and under guidance, bounded near the ideal, and a declared order measured."""

from __future__ import annotations

import pytest
import torch

from ddpmkit import create_sampler, create_schedule
from ddpmkit.diffusion import gaussian_solver_moments
from ddpmkit.testing import GaussianOracle, check_sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def verdicts(name: str, options: dict | None = None, **kwargs) -> dict[str, str]:
    return {r.check: r.verdict for r in check_sampler(name, options, **kwargs)}


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_a_correct_dpm_solver_passes_every_check_at_few_steps(steps):
    """It used to fail "each class" at 1, 2, 5 and 10 steps: the per-class check held it to the ideal answer."""
    got = verdicts("dpmpp-2m", {"steps": steps})
    assert got["each class of a conditional oracle"] == "pass" and got["classifier-free guidance (w = 2)"] == "pass"
    assert "FAIL" not in got.values(), got


def test_heun_and_dpm_solver_pass_the_kit_and_their_order_is_measured():
    for name in ("heun", "dpmpp-2m"):
        results = {r.check: r for r in check_sampler(name)}
        assert all(r.passed for r in results.values()), [(r.check, r.detail) for r in results.values() if not r.passed]
        assert results["order as declared"].verdict == "pass" and "declared 2" in results["order as declared"].detail
        assert results["starts from an image (edit)"].verdict == "skip"
    ddim = verdicts("ddim")
    assert ddim["order as declared"] == "skip" and ddim["stated answer near the ideal"] == "skip"


def test_the_stated_answer_is_the_closed_form_of_the_solvers_own_steps():
    """gaussian_solver_moments against the sampler itself with the exact predictor, on a million pixels."""
    schedule = create_schedule("linear", num_timesteps=1000)
    oracle = GaussianOracle(schedule, 0.0, 0.2, image_shape=(1, 256, 256))  # centred: clipping to [-1, 1] is rare
    for name, steps in (("heun", 12), ("dpmpp-2m", 6)):
        sampler = create_sampler(name, steps=steps)
        x = sampler.sample(oracle, schedule, (16, 1, 256, 256), generator=torch.Generator().manual_seed(0)).double()
        mean, std = gaussian_solver_moments(schedule, sampler.timesteps(schedule), 0.0, 0.2, name)
        assert abs(float(x.mean()) - mean) < 1e-3 and abs(float(x.std()) - std) < 1e-3, (name, mean, std)


CHEATS = '''
import math
import torch
from ddpmkit import hookimpl
from ddpmkit.testing import GaussianOracle
from ddpmkit_plugins.solvers import DPMSolverPP2M
from ddpmkit.diffusion import alpha_bar, predict_x0_eps


class Cheat(DPMSolverPP2M):
    """States as its answer whatever it draws with the exact predictor: consistent by construction."""

    def gaussian_answer(self, schedule, mu, s):
        oracle = GaussianOracle(schedule, mu, s, image_shape=(1, 64, 64))
        x = self.sample(oracle, schedule, (8, 1, 64, 64), generator=torch.Generator().manual_seed(123)).double()
        return float(x.mean()), float(x.std())


class WrongSign(Cheat):
    """exp(+h) for exp(-h)."""

    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        s = schedule.to(denoiser.device)
        ts = self.timesteps(schedule)
        x = torch.randn(shape, generator=generator)
        previous = None
        for t, t_next in zip(ts, [*ts[1:], -1]):
            x0, _ = predict_x0_eps(denoiser, s, x, t)
            if t_next < 0:
                x = x0
                continue
            ab, ab_next = alpha_bar(s, t), alpha_bar(s, t_next)
            h = 0.5 * (math.log(ab_next / (1 - ab_next)) - math.log(ab / (1 - ab)))
            estimate = x0 if previous is None else (1 + previous[1] / h / 2) * x0 - previous[0] * previous[1] / h / 2
            x = ((1 - ab_next) / (1 - ab)) ** 0.5 * x - ab_next**0.5 * math.expm1(h) * estimate
            previous = (x0, h)
        return x.clamp(-1, 1)


class FirstOrder(Cheat):
    """Calls itself 2M, never uses the previous estimate."""

    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        s = schedule.to(denoiser.device)
        ts = self.timesteps(schedule)
        x = torch.randn(shape, generator=generator)
        for t, t_next in zip(ts, [*ts[1:], -1]):
            x0, _ = predict_x0_eps(denoiser, s, x, t)
            if t_next < 0:
                x = x0
                continue
            ab, ab_next = alpha_bar(s, t), alpha_bar(s, t_next)
            h = 0.5 * (math.log(ab_next / (1 - ab_next)) - math.log(ab / (1 - ab)))
            x = ((1 - ab_next) / (1 - ab)) ** 0.5 * x - ab_next**0.5 * math.expm1(-h) * x0
        return x.clamp(-1, 1)


@hookimpl
def register_samplers(register):
    register("wrong-sign", WrongSign)
    register("first-order", FirstOrder)
'''


def test_a_solver_stating_its_own_wrong_answer_or_a_false_order_fails(plugin_module):
    plugin_module(CHEATS, name="cheats")
    wrong = verdicts("wrong-sign", {"steps": 50})
    assert wrong["matches the Gaussian oracle"] == "pass"  # it says what it does...
    assert wrong["stated answer near the ideal"] == "FAIL"  # ...which is no solution of the ODE
    first = verdicts("first-order", {"steps": 50})
    assert first["stated answer near the ideal"] == "pass" and first["order as declared"] == "FAIL"


def test_a_check_that_did_not_run_says_skip_and_the_cli_shows_it():
    from runconfigs import invoke

    r = invoke("check-plugins", "ddpm", "--only", "order as declared")
    assert r.exit_code == 0 and "skip" in r.output and "declares no order" in r.output, r.output


def test_misdiagnoses_are_named_right(plugin_module):
    from ddpmkit.testing import check_denoiser

    plugin_module(
        """
import torch
from ddpmkit import hookimpl
from ddpmkit.interfaces import Denoiser, Sampler

class BatchLabel(Denoiser):
    conditions = frozenset({"class"})
    def __init__(self, options=None, *, image_shape, num_timesteps, num_classes=0):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps, num_classes=num_classes)
        self.w = torch.nn.Parameter(torch.ones(1))
    def forward(self, x_t, t, cond=None):
        label = cond["class"][0].float() if cond is not None else 0.0  # one label for the whole batch
        return self.w * x_t * (1 + 0.1 * label) + 0.01 * t.float().view(-1, 1, 1, 1)

class Overstated(Sampler):
    def num_evaluations(self, schedule):
        return 2 * schedule.num_timesteps
    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        x = torch.randn(shape, generator=generator)
        for i, t in enumerate(reversed(range(schedule.num_timesteps))):
            denoiser(x, torch.full((shape[0],), t))
            if callback:
                callback(i, t, x)
        return x.clamp(-1, 1)

@hookimpl
def register_denoisers(register):
    register("batch-label", BatchLabel)

@hookimpl
def register_samplers(register):
    register("overstated", Overstated)
""",
        name="misdiagnosed",
    )
    cond = {r.check: r for r in check_denoiser("batch-label", num_timesteps=20)}["conditions on the class"]
    assert not cond.passed and "one label is used for the whole batch" in cond.detail, cond.detail
    cost = {r.check: r for r in check_sampler("overstated", num_timesteps=20)}["cost as declared"]
    assert not cost.passed and "must count only the calls sample() makes" in cost.detail, cost.detail
