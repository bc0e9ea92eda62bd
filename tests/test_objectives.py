"""Objectives (plugin API 4): ddpm, rectified flow and EDM behind one interface, checked against closed forms, the
conformance kit (which must also fail wrong objectives), and tiny runs through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from runconfigs import invoke, write_config
from safetensors.torch import load_file

from ddpmkit.diffusion import draw_training_batch_noise, edm_preconditioning, karras_sigmas, training_loss
from ddpmkit.interfaces import ObjectiveNetwork
from ddpmkit.registry.build import construct, validate_options
from ddpmkit.registry.discovery import find
from ddpmkit.testing import ObjectiveOracle, check_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def objective(name: str, **options):
    from ddpmkit import create_schedule

    comp = find("objective", name)
    schedule = create_schedule("linear", num_timesteps=100)
    return construct(comp, validate_options(comp, options), schedule=schedule, prediction="epsilon")


def test_flow_and_edm_follow_their_papers_closed_forms():
    flow = objective("flow", num_levels=4)
    x0, eps = torch.full((1, 1, 1, 1), 0.8), torch.full((1, 1, 1, 1), -0.4)
    t = torch.tensor([0.25])
    assert torch.allclose(flow.corrupt(x0, eps, t), torch.tensor(0.75 * 0.8 + 0.25 * -0.4))
    assert torch.allclose(flow.target(x0, eps, t), torch.tensor(-0.4 - 0.8))  # v = eps - x_0
    assert flow.levels().tolist() == [0.25, 0.5, 0.75, 1.0]

    sd = 0.5
    c_skip, c_out, c_in = edm_preconditioning(torch.tensor(sd), sd)  # at sigma = sigma_data: table 1 by hand
    assert math.isclose(float(c_skip), 0.5) and math.isclose(float(c_out), sd / 2**0.5, rel_tol=1e-6)
    assert math.isclose(float(c_in), 1 / (sd * 2**0.5), rel_tol=1e-6)
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert math.isclose(float(sigmas[0]), 0.002) and math.isclose(float(sigmas[-1]), 80.0)
    steps = sigmas ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(17))  # eq. 5: even in sigma^(1/rho)
    edm = objective("edm")
    # lambda(sigma) c_out^2 = 1: the F loss is unweighted, and its target has unit variance for data of std sigma_data
    sigma = torch.tensor([0.01, 0.5, 10.0])
    x0 = sd * torch.randn(200_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    for s in sigma:
        tau = s.expand(len(x0))
        target = edm.target(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), tau)
        assert abs(float(target.std()) - 1) < 0.01


def test_ddim_through_an_objective_is_its_euler_step():
    """Flow's x' = x + (t' - t) v and EDM's x' = x + (sigma' - sigma)(x - D) / sigma, each taken directly in the
    objective's own space, equal one DDIM step (eta = 0) of the variance-preserving view through ObjectiveNetwork."""

    from ddpmkit.interfaces import Denoiser

    class Net(Denoiser):  # any smooth function of (x, t) will do
        def __init__(self):
            super().__init__(image_shape=(1, 2, 2), num_timesteps=50)

        def forward(self, x, t, cond=None):
            return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    from ddpmkit.diffusion import ReverseStep, reverse_step, split_prediction

    for name in ("flow", "edm"):
        o = objective(name, num_levels=50)
        view, net = o.sampling_schedule(), Net()
        adapted = ObjectiveNetwork(o, net)
        k, j = 40, 25
        tau_k, tau_j = o.levels()[k], o.levels()[j]
        x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
        if name == "flow":
            v = net(x, o.network_time(tau_k.expand(4)))
            direct = x + float(tau_j - tau_k) * v
        else:
            x0, _ = o.predict(net, x, tau_k.expand(4))
            direct = x + float(tau_j - tau_k) * (x - x0) / float(tau_k)
        a, b = o.coefficients(tau_k)
        x_vp = x / float((a * a + b * b) ** 0.5)
        t = torch.full((4,), k)
        x0_vp, eps_vp = split_prediction(view, x_vp, t, adapted(x_vp, t), "v")
        stepped = reverse_step(view, ReverseStep(k, j, 0.0, 0.0), x0_vp, eps_vp)
        a, b = o.coefficients(tau_j)
        assert torch.allclose(stepped * float((a * a + b * b) ** 0.5), direct, atol=2e-4), name


@pytest.mark.parametrize("name", ["ddpm", "flow", "edm"])
def test_the_builtin_objectives_pass_the_kit(name):
    results = check_objective(name, num_timesteps=200)
    assert all(r.passed for r in results), [(r.check, r.detail) for r in results if not r.passed]
    assert len(results) == 8


def test_the_ddpm_objective_is_the_old_loss_bit_for_bit():
    o = objective("ddpm", loss_weighting="min_snr")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t1, n1 = o.draw_training(6, (1, 4, 4), g1)
    t2, n2 = draw_training_batch_noise(6, (1, 4, 4), 100, g2)
    assert torch.equal(t1, t2) and torch.equal(n1, n2)
    net = ObjectiveOracle(o, 0.3, 0.2, image_shape=(1, 4, 4))
    net.prediction = "epsilon"
    x0 = torch.rand(6, 1, 4, 4)
    new = o.training_loss(net, x0, t1, n1)
    old = training_loss(net, o.schedule, x0, t1, n1, weighting="min_snr", gamma=5.0)
    assert torch.equal(new, old)


WRONG = '''
import torch
from ddpmkit import hookimpl
from ddpmkit.interfaces import Objective

DDPMKIT_PLUGIN_API = 4


class Swapped(Objective):
    """Rectified flow with a(t) and b(t) swapped: the path is x = t x_0 + (1 - t) eps, the rest as flow."""

    def levels(self):
        return torch.arange(1, self.num_levels + 1, dtype=torch.float64) / self.num_levels

    def coefficients(self, tau):
        return tau, 1 - tau

    def draw_levels(self, n, generator):
        return torch.rand((n,), generator=generator)

    def network_time(self, tau):
        return tau.float() * (self.num_levels - 1)

    def split(self, x_t, tau, output):
        t = tau.float().view(-1, 1, 1, 1)
        return x_t - t * output, x_t + (1 - t) * output

    def target(self, x0, eps, tau):
        return eps - x0


class Right(Swapped):
    def coefficients(self, tau):
        return 1 - tau, tau


class BadTarget(Right):
    """Rectified flow trained towards x_0 - eps while its conversion reads eps - x_0."""

    def target(self, x0, eps, tau):
        return x0 - eps


@hookimpl
def register_objectives(register):
    register("swapped", Swapped)
    register("right", Right)
    register("bad-target", BadTarget)
'''


def test_a_third_party_objective_passes_the_kit_and_wrong_ones_fail(plugin_module):
    plugin_module(WRONG, name="wrongflow")
    right = check_objective("right", num_timesteps=200)
    assert all(r.passed for r in right), [(r.check, r.detail) for r in right if not r.passed]
    swapped = {r.check for r in check_objective("swapped", num_timesteps=200) if not r.passed}
    assert {"levels order the noise", "split inverts target", "agrees with the Gaussian oracle"} <= swapped
    bad = {r.check for r in check_objective("bad-target", num_timesteps=200) if not r.passed}
    assert {"split inverts target", "agrees with the Gaussian oracle"} <= bad


def objective_config(folder, name: str, objective_name: str, **values):
    cfg = write_config(folder, name, **values)
    text = cfg.read_text().replace("trajectory_steps = [0, 5, 10, 19]", "trajectory_steps = [0, 10, 19]")
    cfg.write_text(text + f'\n[objective]\nname = "{objective_name}"\n\n[objective.options]\nnum_levels = 20\n')
    return cfg


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_flow_and_edm_runs_train_resume_exactly_and_sample_with_every_sampler(tmp_path, name):
    common = dict(epochs=2, checkpoint_every=2, num_images=4, trajectory_images=0)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = objective_config(tmp_path / "a", "o", name, **common)
    parts = objective_config(tmp_path / "b", "o", name, **common)
    r = invoke("run", str(whole))
    assert r.exit_code == 0, r.output
    assert invoke("run", str(parts), "--set", "train.max_steps=3").exit_code == 0
    r = invoke("run", str(parts))
    assert r.exit_code == 0 and "resuming from" in r.output, r.output
    run_a, run_b = tmp_path / "a" / "runs" / "o", tmp_path / "b" / "runs" / "o"
    final = sorted((run_a / "checkpoints").iterdir())[-1].name
    a = load_file(run_a / "checkpoints" / final / "ema.safetensors")
    b = load_file(run_b / "checkpoints" / final / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    from ddpmkit import load_run

    run = load_run(run_a)
    assert run.components.objective is not None and run.config.objective.name.endswith(name)
    import importlib.util

    samplers = [("ddpm", None), ("ddim", 5), ("heun", 3), ("dpmpp-2m", 5)]
    if importlib.util.find_spec("diffusers"):  # the bridge: any diffusers scheduler on the objective's levels
        samplers.append(("diffusers", 5))
    for sampler, steps in samplers:
        images = run.sample(3, sampler=sampler, steps=steps, output="float")
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all(), sampler
    images = run.sample(3, sampler="ddim", steps=5, output="float")
    edited = run.edit(images, strength=0.5)
    assert edited.shape == images.shape and torch.isfinite(edited).all()
    other = whole.with_name("other.toml")
    other.write_text(whole.read_text().split("[objective]")[0])  # the same run under ddpm
    r = invoke("run", str(other))
    assert r.exit_code == 2 and "objective.name" in r.output, r.output  # another objective cannot resume these weights


def test_a_conditional_flow_run_guides(tmp_path):
    cfg = objective_config(tmp_path, "c", "flow", epochs=1, num_images=4, trajectory_images=0)
    cfg.write_text(cfg.read_text() + '\n[conditioning]\nkind = "class"\nlabel_dropout = 0.2\n')
    assert invoke("run", str(cfg)).exit_code == 0
    from ddpmkit import load_run

    run = load_run(tmp_path / "runs" / "c")
    plain = run.sample(4, sampler="ddim", steps=4, classes=1, output="float", guidance=1.0)
    guided = run.sample(4, sampler="ddim", steps=4, classes=1, output="float", guidance=3.0)
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)


def test_settings_another_objective_would_ignore_are_refused_in_one_line(tmp_path, plugin_module):
    cfg = objective_config(tmp_path, "r", "flow", epochs=1, num_images=0, trajectory_images=0)
    for setting, said in (
        ("train.loss_weighting=min_snr", "the ddpm objective's weighting"),
        ("denoiser.options.prediction=v", "sets what the network predicts"),
    ):
        r = invoke("validate", str(cfg), "--set", setting)
        assert r.exit_code == 2 and said in r.output, r.output
    plugin_module(
        """
from ddpmkit import hookimpl
from ddpmkit.interfaces import Denoiser

class Steps(Denoiser):
    def forward(self, x_t, t, cond=None):
        return x_t * 0

@hookimpl
def register_denoisers(register):
    register("steps-only", Steps)
""",
        name="stepsonly",
    )
    from ddpmkit.errors import ConfigError
    from ddpmkit.run.config import config_from_dict

    with pytest.raises(ConfigError, match="declares no continuous_time"):
        config_from_dict({"objective": {"name": "flow"}, "denoiser": {"name": "steps-only"}})
    config_from_dict({"denoiser": {"name": "steps-only"}})  # the ddpm objective calls it at integer steps


def test_a_ddpm_run_keeps_its_identity_so_older_checkpoints_resume():
    from ddpmkit.run.config import config_from_dict

    cfg = config_from_dict({})
    assert not any(k.startswith("objective") for k in cfg.identity())
    flow = config_from_dict({"objective": {"name": "flow"}})
    assert flow.identity()["objective.name"] == "ddpmkit:flow" and flow.num_timesteps == 1000


COUPLED = """
import torch
from ddpmkit import hookimpl
from ddpmkit_plugins.objectives import FlowObjective

SEEN = []


class SortedFlow(FlowObjective):
    \"\"\"Rectified flow whose noise is paired with the images by rank of their means (a toy coupling).\"\"\"

    def couple(self, x0, noise):
        by_image = x0.flatten(1).mean(1).argsort().argsort()
        self.paired = noise[noise.flatten(1).mean(1).argsort()][by_image]
        return self.paired

    def training_loss(self, denoiser, x0, tau, noise, cond=None):
        SEEN.append(torch.equal(noise, self.paired))  # the loss is taken on the pairing couple() chose
        return super().training_loss(denoiser, x0, tau, noise, cond)


@hookimpl
def register_objectives(register):
    register("sorted-flow", SortedFlow)
"""


def test_an_objective_may_pair_the_noise_with_the_images(tmp_path, plugin_module):
    module = plugin_module(COUPLED, name="coupled")
    cfg = objective_config(tmp_path, "p", "sorted-flow", epochs=1, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg))
    assert r.exit_code == 0, r.output
    assert module.SEEN and all(module.SEEN)  # every batch trained on the pairing the objective chose
