"""Editing with a trained model: SDEdit and inpainting (RePaint) through any sampler that can start from images,
checked against closed forms on Gaussian data, and `ddpmkit edit` as a user runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from runconfigs import invoke, trained_tiny

import ddpmkit
from ddpmkit.diffusion import start_step
from ddpmkit.errors import ConfigError
from ddpmkit.interfaces import Denoiser
from ddpmkit.sampling.draw import generate
from ddpmkit.sampling.edit import Edit, as_keep_mask
from ddpmkit.testing import GaussianOracle


class CorrelatedOracle(Denoiser):
    """The exact x_0 predictor for two-pixel images x_0 ~ N(0, S), S = s^2 [[1, rho], [rho, 1]]:
    E[x_0 | x_t] = a S (a^2 S + (1 - a^2) I)^-1 x_t with a = sqrt(abar_t)."""

    prediction = "x0"

    def __init__(self, schedule, s: float, rho: float) -> None:
        super().__init__(Denoiser.Options(), image_shape=(1, 1, 2), num_timesteps=schedule.num_timesteps)
        self.register_buffer("abar", schedule.alphas_cumprod.double().clone())
        self.cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64) * s**2

    def forward(self, x_t, t, cond=None):
        a = self.abar[t].sqrt().view(-1, 1, 1)
        gain = a * self.cov @ torch.linalg.inv(a * a * self.cov + (1 - a * a) * torch.eye(2, dtype=torch.float64))
        return (gain @ x_t.double().view(-1, 2, 1)).view(x_t.shape).to(x_t.dtype)


@pytest.fixture(scope="module")
def short_schedule():
    T = 250  # the linear schedule of Ho et al. stretched to 250 steps: the same endpoints of abar
    return ddpmkit.create_schedule("linear", num_timesteps=T, beta_start=4e-4, beta_end=0.08)


def test_start_step_is_the_largest_step_at_or_below_strength_times_t():
    assert start_step(list(range(999, -1, -1)), 1.0, 1000) == 999
    assert start_step(list(range(999, -1, -1)), 0.5, 1000) == 499
    assert start_step([980, 960, 500, 20, 0], 0.5, 1000) == 20
    assert start_step([999, 500], 0.0, 1000) is None
    with pytest.raises(ConfigError, match="must lie in \\[0, 1\\]"):
        start_step([999], 1.5, 1000)


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("ddim", {"steps": 50, "eta": 1.0})])
def test_sdedit_at_strength_1_has_the_unconditional_distribution(short_schedule, sampler, options, one_thread):
    """From any input, strength 1 noises to t = T - 1 (abar 4e-5: sqrt 0.006 of the input is left) and samples
    N(mu, s^2) as drawing from noise does. A lower strength keeps part of the input: from x_t0 = a x_in + ...
    the exact posterior's mean is mu + k (x_in - mu), k = a^2 s^2 / (a^2 s^2 + 1 - a^2) (a = sqrt(abar_t0))."""
    mu, s, n = 0.3, 0.2, 4096
    oracle = GaussianOracle(short_schedule, mu, s, image_shape=(1, 2, 2))
    chosen = ddpmkit.create_sampler(sampler, **options)
    plain, _ = generate(oracle, short_schedule, chosen, n, batch_size=n, seed=1, image_shape=(1, 2, 2))
    far = torch.full((n, 1, 2, 2), -1.0)
    edited, _ = generate(
        oracle, short_schedule, chosen, n, batch_size=n, seed=2, image_shape=(1, 2, 2), edit=Edit(far, 1.0)
    )
    # the sampler's own answer (DDIM at 50 steps narrows the spread: std 0.16), with 16,384 pixels each (the
    # sampling error of a mean is 0.0016)
    assert (
        abs(float(edited.mean()) - float(plain.mean())) < 0.01 and abs(float(edited.std()) - float(plain.std())) < 0.01
    )
    if sampler != "ddpm":
        return
    assert abs(float(plain.mean()) - mu) < 0.01 and abs(float(plain.std()) - s) < 0.01
    for strength in (0.1, 0.3):
        t0 = start_step(chosen.timesteps(short_schedule), strength, short_schedule.num_timesteps)
        a2 = float(short_schedule.alphas_cumprod[t0])
        k = a2 * s**2 / (a2 * s**2 + 1 - a2)
        near, _ = generate(
            oracle, short_schedule, chosen, n, batch_size=n, seed=3, image_shape=(1, 2, 2), edit=Edit(far, strength)
        )
        assert abs(float(near.mean()) - (mu + k * (-1.0 - mu))) < 0.02, (strength, k)


def test_inpainting_keeps_the_known_pixels_and_moves_the_rest_to_the_conditional_mean(short_schedule, one_thread):
    """Two pixels with correlation 0.9: knowing the first is 0.8, the second's conditional mean is
    rho * 0.8 = 0.72 (std 0.22). Pasting the known pixel at each step (RePaint without resampling) gets
    69 % of the way there from the prior's 0; resampling 5 times every 10 steps 93 %: 0.67, 4,000 draws
    (sampling error 0.004). The tolerances below are those figures with a margin."""
    rho, v, n = 0.9, 0.8, 4000
    oracle = CorrelatedOracle(short_schedule, 0.5, rho)
    ddpm = ddpmkit.create_sampler("ddpm", variance="posterior")
    x_in = torch.zeros(n, 1, 1, 2)
    x_in[..., 0] = v
    keep = torch.zeros(n, 1, 1, 2)
    keep[..., 0] = 1
    means = {}
    for resample, jump in ((1, 1), (5, 10)):
        out, _ = generate(
            oracle,
            short_schedule,
            ddpm,
            n,
            batch_size=n,
            seed=0,
            image_shape=(1, 1, 2),
            edit=Edit(x_in, 1.0, keep, jump_length=jump, resample=resample),
        )
        assert torch.equal(out[..., 0], x_in[..., 0])  # the known pixel, exactly
        means[resample] = float(out[..., 1].mean())
    target = rho * v
    assert 0.5 * target < means[1] < target
    assert abs(means[5] - target) < 0.1 and abs(means[5] - target) < abs(means[1] - target)


def test_masks_of_the_wrong_shape_are_one_line():
    with pytest.raises(ConfigError, match="one channel of the run's 8x8 images"):
        as_keep_mask(torch.ones(3, 8, 8), 2, (3, 8, 8))
    with pytest.raises(ConfigError, match="one channel of the run's 8x8 images"):
        as_keep_mask(torch.ones(1, 1, 6, 8), 2, (1, 8, 8))
    keep = as_keep_mask(torch.tensor([[255, 0], [0, 0]], dtype=torch.uint8), 3, (1, 2, 2))
    assert keep.shape == (3, 1, 2, 2) and keep[0, 0].tolist() == [[0.0, 1.0], [1.0, 1.0]]  # white is generated


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("edit"), "e")


def test_edit_in_python_strength_0_returns_the_input_and_a_mask_keeps_its_pixels(tiny_run):
    run = ddpmkit.load_run(tiny_run)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    same = run.edit(images, strength=0.0)
    assert torch.equal(same, images.float() / 127.5 - 1)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, 4:] = True  # generate the right half
    for sampler in ("ddpm", "ddim"):
        out = run.edit(
            images,
            mask=mask,
            plan=run.plan(sampler=sampler, steps=5 if sampler == "ddim" else None),
            resample=2,
            jump_length=2,
        )
        assert torch.allclose(out[..., :4], images[..., :4].float() / 127.5 - 1, atol=1e-6)
        assert not torch.allclose(out[..., 4:], images[..., 4:].float() / 127.5 - 1, atol=0.05)
    with pytest.raises(ConfigError, match="the run's images are 1x8x8"):
        run.edit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_edit_cli_writes_a_grid_beside_the_input(tiny_run, tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "digit.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = invoke(
        "edit",
        str(tiny_run),
        "--input",
        str(tmp_path / "digit.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--num",
        "3",
        "--sampler",
        "ddim",
        "--set",
        "sampler.options.steps=4",
    )
    assert r.exit_code == 0, r.output
    grid = tmp_path / "digit-edited.png"
    assert grid.is_file() and "input, mask, 3 results" in r.output
    with np.load(tmp_path / "digit-edited.npz") as npz:
        out = npz["images"]
    assert out.shape == (3, 8, 8, 1) and (out[:, :4] == 200).all()  # the kept top half
    bad = Image.fromarray(np.zeros((6, 6), np.uint8))
    bad.save(tmp_path / "small.png")
    r = invoke("edit", str(tiny_run), "--input", str(tmp_path / "digit.png"), "--mask", str(tmp_path / "small.png"))
    assert r.exit_code == 2 and "the mask is 6x6; the run's images are 8x8" in r.output
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + np.array([255, 0, 0], np.uint8)).save(tmp_path / "red.png")
    r = invoke("edit", str(tiny_run), "--input", str(tmp_path / "digit.png"), "--mask", str(tmp_path / "red.png"))
    assert r.exit_code == 2 and "the mask has colour" in r.output
