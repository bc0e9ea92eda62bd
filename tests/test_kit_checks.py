"""The conformance kit's checks: a sampler's cost is its denoiser calls, a sampler may state its exact Gaussian
answer, check-plugins chooses T, the image shape and the schedule and checks event plugins, an error a --set caused
points at the --set, schedules offer float64 tables, and each check runs alone (one class per kind, one method per
check)."""

from __future__ import annotations

import json

import pytest
import torch
from runconfigs import invoke, write_config

from ddpmkit.errors import ConfigError
from ddpmkit.registry.build import create_schedule
from ddpmkit.testing import DenoiserChecks, SamplerChecks, assert_conforms, check_event_plugin, check_sampler

SAMPLERS = '''
import torch
from ddpmkit import hookimpl
from ddpmkit.interfaces import Sampler
from ddpmkit.diffusion import ancestral_steps, gaussian_reverse_moments, predict_x0_eps, reverse_step

class Twice(Sampler):
    """DDPM's steps, calling the denoiser twice per step (a stand-in for a second-order solver)."""
    declared = None

    def timesteps(self, schedule):
        return [s.t for s in ancestral_steps(schedule)]

    def num_evaluations(self, schedule):
        return 2 * len(self.timesteps(schedule)) if self.declared is None else self.declared

    def gaussian_answer(self, schedule, mu, s):
        return gaussian_reverse_moments(schedule, ancestral_steps(schedule), mu, s)

    @torch.no_grad()
    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        s = schedule.to(denoiser.device)
        x = torch.randn(shape, generator=generator)
        for i, step in enumerate(ancestral_steps(s)):
            predict_x0_eps(denoiser, s, x, step.t)  # the first call, thrown away
            x0, eps = predict_x0_eps(denoiser, s, x, step.t)
            z = torch.randn(shape, generator=generator) if step.sigma > 0 else None
            x = reverse_step(s, step, x0, eps, z)
            if callback is not None:
                callback(i, step.t, x)
        return x.clamp(-1, 1)

class Liar(Twice):
    declared = 1

@hookimpl
def register_samplers(register):
    register("twice", Twice)
    register("liar", Liar)
'''


def test_the_kit_counts_denoiser_calls_and_holds_a_sampler_to_its_stated_answer(plugin_module):
    plugin_module(SAMPLERS)
    twice = {r.check: r for r in check_sampler("twice", num_timesteps=50, num_pixels=4096)}
    assert (
        twice["cost as declared"].passed
        and "100 denoiser calls per batch for 50 steps" in twice["cost as declared"].detail
    )
    assert twice["matches the Gaussian oracle"].passed, twice["matches the Gaussian oracle"].detail
    assert "the exact answer it states" in twice["matches the Gaussian oracle"].detail
    liar = {r.check: r for r in check_sampler("liar", num_timesteps=50, num_pixels=4096)}
    assert not liar["cost as declared"].passed and "num_evaluations() says 1" in liar["cost as declared"].detail


def test_check_plugins_takes_the_schedule_t_and_image_shape():
    r = invoke("check-plugins", "ddim", "--schedule", "cosine", "--timesteps", "200", "--set", "steps=20", "--json")
    assert r.exit_code == 0, r.output
    assert "exact for its 20 steps" in r.stdout
    r = invoke(
        "check-plugins",
        "unet",
        "--image-shape",
        "3,8,8",
        "--timesteps",
        "50",
        "--set",
        "channels=[8,16,32,32]",
        "--set",
        "attentions=[false,false,false,false]",
        "--set",
        "upscales=[false,false,true,true]",
        "--set",
        "num_groups=4",
        "--set",
        "num_heads=2",
        "--json",
    )
    assert r.exit_code == 0, r.output
    r = invoke("check-plugins", "ddim", "--image-shape", "3,8")
    assert r.exit_code == 2 and "--image-shape 3,8" in r.output
    r = invoke("check-plugins", "ddim", "--schedule", "nope")
    assert r.exit_code == 2


def test_event_plugins_are_checked_by_driving_their_hooks(plugin_module):
    results = {r.check: r for r in check_event_plugin("metrics")}
    assert all(r.passed for r in results.values()), {k: r.detail for k, r in results.items() if not r.passed}
    assert "metrics.jsonl" in results["files it wrote"].detail
    plugin_module(
        """
from ddpmkit import hookimpl

@hookimpl
def step_end(step, metrics):
    if step == 2:
        raise KeyError("loss_ema")
""",
        name="probe2csv",
        distribution="ddpmkit-probe",
    )
    r = invoke("check-plugins", "probe2csv", "--json")
    assert r.exit_code == 1, r.output
    failed = [row for row in json.loads(r.stdout) if not row["passed"]]
    assert [row["check"] for row in failed] == ["step_end (step 2)"] and "loss_ema" in failed[0]["detail"]


def test_event_plugins_are_driven_through_a_real_conditional_run(plugin_module):
    """A hook that loads the checkpoint it is told of, or reads the conditional section of an eval, meets the real
    thing in the kit (it used to get a path that did not exist, and only an unconditional result)."""
    plugin_module(
        """
from ddpmkit import hookimpl, load_run

SEEN = []

@hookimpl
def checkpoint_written(path):
    SEEN.append(load_run(path).classes)

@hookimpl
def evaluated(result):
    SEEN.append(result["conditional"]["per_class"][0]["accuracy"])  # unguarded: an unconditional eval has none
""",
        name="loader",
        distribution="ddpmkit-loader",
    )
    results = {r.check: r for r in check_event_plugin("loader")}
    assert results["checkpoint_written"].passed, results["checkpoint_written"].detail
    assert results["evaluated (class-conditional)"].passed
    assert not results["evaluated"].passed and "conditional" in results["evaluated"].detail
    with pytest.raises(AssertionError, match="evaluated: KeyError"):
        assert_conforms("event", "loader")
    with pytest.raises(ValueError, match="the kit checks schedule, denoiser, sampler, objective, event plugin"):
        assert_conforms("logger", "loader")


def test_an_error_a_set_caused_points_at_the_set(tmp_path, plugin_module):
    plugin_module("""
import torch
from pydantic import model_validator
from ddpmkit import hookimpl
from ddpmkit.interfaces import Denoiser

class Picky(Denoiser):
    class Options(Denoiser.Options):
        width: int = 32
        heads: int = 4

        @model_validator(mode="after")
        def _divides(self):
            if self.width % self.heads:
                raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
            return self

    def forward(self, x_t, t):
        return x_t

@hookimpl
def register_denoisers(register):
    register("picky", Picky)
""")
    cfg = write_config(tmp_path)
    text = cfg.read_text()
    cfg.write_text(
        text[: text.index("[denoiser]")]
        + '[denoiser]\nname = "picky"\n\n[denoiser.options]\nheads = 4\n\n'
        + text[text.index("[sampler]") :]
    )
    r = invoke("validate", str(cfg), "--set", "denoiser.options.width=30")
    assert r.exit_code == 2, r.output
    assert "--set denoiser.options.width=30" in r.output and "width (30) must be divisible by heads (4)" in r.output


def test_schedules_hand_out_their_float64_tables():
    s = create_schedule("cosine", num_timesteps=1000)
    abar = s.float64("alphas_cumprod")
    assert abar.dtype == torch.float64
    assert torch.equal(abar, torch.cumprod(1 - s.make_betas().double(), 0))
    sigma32 = ((1 - s.alphas_cumprod.double()) / s.alphas_cumprod.double()).sqrt()
    sigma64 = ((1 - abar) / abar).sqrt()
    assert float(((sigma32 - sigma64).abs() / sigma64).max()) > 1e-4  # what float32 loses near sigma_min
    assert torch.equal(s.float64("betas"), s.make_betas().double())


@pytest.fixture(scope="module")
def ddim_whole():
    return {r.check: r for r in check_sampler("ddim", num_pixels=4096)}


@pytest.mark.parametrize("check", SamplerChecks.names())
def test_each_sampler_check_runs_alone(check, ddim_whole):
    """One class per kind, one method per check: any check runs alone (its state drawn on demand) and gives what
    it gives in the whole run."""
    alone = SamplerChecks("ddim", num_pixels=4096).run(only=[check])
    assert [r.check for r in alone] == ["builds", check]
    assert alone[1].passed and alone[1].detail == ddim_whole[check].detail


def test_checks_are_chosen_by_name_or_method_and_an_unknown_one_is_one_line():
    assert [r.check for r in DenoiserChecks("unet").run(only=["predicts", "prediction target"])] == [
        "builds",
        "prediction target",
    ]
    assert_conforms("schedule", "cosine", only=["final SNR"])
    with pytest.raises(ConfigError, match="no sampler check is named 'seed'; the checks: matches the Gaussian"):
        SamplerChecks("ddim").run(only=["seed"])
    r = invoke("check-plugins", "cosine", "--only", "final SNR", "--json")
    assert r.exit_code == 0 and [x["check"] for x in json.loads(r.stdout)] == ["builds", "final SNR"], r.output
    r = invoke("check-plugins", "cosine", "linear", "--only", "final SNR")
    assert r.exit_code == 2 and "exactly one component" in r.output
