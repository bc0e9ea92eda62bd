"""The conformance kit: every built-in passes; broken components are caught; the CLI reports both."""

from __future__ import annotations

import json
import textwrap

import pytest
from runconfigs import ddpmkit, invoke

from ddpmkit.testing import GaussianOracle, assert_conforms, check_component


@pytest.mark.parametrize(
    "kind, name, options",
    [
        ("schedule", "linear", {}),
        ("schedule", "linear", {"num_timesteps": 1}),
        ("sampler", "ddpm", {}),
        ("sampler", "ddpm", {"variance": "posterior"}),
        ("sampler", "ddpm", {"clip_denoised": True}),
        (
            "denoiser",
            "unet",
            {
                "channels": [8, 16, 32, 32],
                "attentions": [False, True, False, False],
                "upscales": [False, False, True, True],
                "num_groups": 4,
                "num_heads": 2,
            },
        ),
    ],
)
def test_builtins_conform(kind, name, options):
    if options.get("num_timesteps") == 1:  # T = 1 keeps almost all signal: only the SNR check may fail
        failed = [r.check for r in check_component(kind, name, options) if not r.passed]
        assert failed == ["final SNR"]
        return
    assert_conforms(kind, name, **options)


def test_oracle_is_the_posterior_mean_of_the_noise():
    import torch

    from ddpmkit import create_schedule

    schedule = create_schedule("linear")
    oracle = GaussianOracle(schedule, mu=0.3, s=0.2, image_shape=(1, 64, 64))
    g = torch.Generator().manual_seed(0)
    t = 300
    x0 = 0.3 + 0.2 * torch.randn(1, 1, 64, 64, generator=g)
    eps = torch.randn(1, 1, 64, 64, generator=g)
    ab = schedule.alphas_cumprod[t]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = oracle(x_t, torch.tensor([t]))
    # E[eps | x_t] regresses eps on x_t: the residual is uncorrelated with x_t
    resid = (eps - pred).flatten()
    centered = (x_t - x_t.mean()).flatten()
    assert abs(float((resid * centered).mean())) < 0.01
    assert float(((eps - pred) ** 2).mean()) < float((eps**2).mean())


BROKEN = """
import torch
from ddpmkit import NoiseSchedule, Sampler

class Flat(NoiseSchedule):
    def make_betas(self):
        return torch.full((self.options.num_timesteps,), 1e-4, dtype=torch.float64)

class Lazy(Sampler):
    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        return torch.zeros(shape)   # ignores the model and the generator
"""


def test_broken_components_fail_their_checks(plugin_module):
    plugin_module(
        BROKEN
        + textwrap.dedent("""
        import ddpmkit

        @ddpmkit.hookimpl
        def register_schedules(register):
            register("flat", Flat)

        @ddpmkit.hookimpl
        def register_samplers(register):
            register("lazy", Lazy)
    """),
        name="broken",
        distribution="ddpmkit-broken",
    )
    r = invoke("check-plugins", "flat", "lazy", "--json")
    assert r.exit_code == 1, r.output
    results = json.loads(r.stdout)
    failed = {(x["name"], x["check"]) for x in results if not x["passed"]}
    assert failed == {
        ("flat", "final SNR"),
        ("lazy", "matches the Gaussian oracle"),
        ("lazy", "seeds reproduce"),
        ("lazy", "callback sees the listed steps"),
        ("lazy", "cost as declared"),  # it never calls the denoiser
        ("lazy", "each class of a conditional oracle"),
    }
    assert {x["qualified_name"] for x in results} == {"ddpmkit-broken:flat", "ddpmkit-broken:lazy"}
    flat_snr = next(x for x in results if x["name"] == "flat" and x["check"] == "final SNR")
    assert "final SNR" in flat_snr["detail"]


def test_check_plugins_cli_on_every_builtin():
    r = ddpmkit("check-plugins", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(r.stdout)
    assert {x["qualified_name"] for x in results} >= {
        f"ddpmkit:{n}" for n in ("linear", "cosine", "unet", "ddpm", "ddim")
    }
    assert all(x["passed"] for x in results), [x for x in results if not x["passed"]]
    unet = {x["check"]: x["detail"] for x in results if x["name"] == "unet"}
    assert unet["builds"] == "35,178,689 parameters" and "ms per image" in unet["forward time"]
    table = invoke("check-plugins", "ddpm")  # the rest in-process: the start-up was tested above
    assert table.exit_code == 0 and "pass" in table.output
    unknown = invoke("check-plugins", "nope")
    assert unknown.exit_code == 2 and "no installed component or event plugin named nope" in unknown.output


def test_describe_cli():
    r = ddpmkit("describe", "unet")
    assert r.returncode == 0 and "num_groups" in r.stdout and "GroupNorm" in r.stdout
    # the rest in-process (the start-up is tested above)
    schema = json.loads(invoke("describe", "linear", "--json").stdout)
    assert schema["properties"]["beta_end"]["default"] == 0.02
    assert schema["additionalProperties"] is False
    r = invoke("describe", "nope")
    assert r.exit_code == 2 and "nothing installed is named 'nope'" in r.output and "unet" in r.output
    r = invoke("describe", "ddpmkit:ddim")
    assert r.exit_code == 0 and "spacing" in r.output and "trailing" in r.output
    # event plugins are described too, with the table that configures them
    r = invoke("describe", "tensorboard")
    assert r.exit_code == 0 and "[plugins.tensorboard]" in r.output and "enabled" in r.output, r.output
