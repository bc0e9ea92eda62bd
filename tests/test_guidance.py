"""Autoguidance: the guided denoiser's maths, the guide's config, and the guide's run inside `ddpmkit run`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runconfigs import ddpmkit as cli
from runconfigs import write_config

import ddpmkit
from ddpmkit.diffusion import split_prediction
from ddpmkit.errors import ConfigError
from ddpmkit.guidance import GuidedDenoiser
from ddpmkit.interfaces import Denoiser
from ddpmkit.run.config import load_config
from ddpmkit.run.guide import guide_config

SHAPE = (1, 4, 4)


class Fixed(Denoiser):
    """Predicts ``target`` for the images of N(0, s^2) data exactly: x0_hat = sqrt(abar) s^2 / (abar s^2 + 1 - abar)
    x_t."""

    def __init__(self, schedule, s: float, target: str) -> None:
        super().__init__(image_shape=SHAPE, num_timesteps=schedule.num_timesteps)
        self.schedule, self.s, self.prediction = schedule, s, target

    def x0(self, x_t, t):
        ab = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab.sqrt() * self.s**2 / (ab * self.s**2 + 1 - ab) * x_t

    def forward(self, x_t, t):
        from ddpmkit.diffusion import eps_from_x0, training_target

        x0 = self.x0(x_t, t)
        return training_target(self.schedule, x0, eps_from_x0(self.schedule, x_t, t, x0), t, self.prediction)


@pytest.fixture()
def schedule():
    return ddpmkit.create_schedule("cosine", num_timesteps=100)


@pytest.mark.parametrize("main_target, guide_target", [("v", "v"), ("epsilon", "x0"), ("x0", "v"), ("v", "epsilon")])
@pytest.mark.parametrize("weight", [0.0, 1.0, 2.5])
def test_guided_x0_is_the_weighted_extrapolation(schedule, main_target, guide_target, weight):
    main, guide = Fixed(schedule, 0.5, main_target), Fixed(schedule, 1.5, guide_target)
    guided = GuidedDenoiser(main, guide, weight, schedule)
    assert guided.prediction == main_target
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 5, 30, 60, 90, 99])
    x0, _ = split_prediction(schedule, x, t, guided(x, t), main_target)
    expected = main.x0(x, t) * weight + guide.x0(x, t) * (1 - weight)
    torch.testing.assert_close(x0, expected, rtol=1e-3, atol=1e-3)  # float32: eps -> x0 divides by sqrt(abar) near T


def test_guide_config_takes_the_guide_options(tmp_path):
    cfg = load_config(
        write_config(tmp_path),
        overrides=[
            "guidance.weight=2",
            "guidance.steps=3",
            "guidance.denoiser_options.channels=[4,8,16,16]",
            "guidance.denoiser_options.num_groups=2",
        ],
    )
    guide = guide_config(cfg)
    assert guide.run_dir == cfg.run_dir / "guide"
    assert guide.denoiser.options["channels"] == [4, 8, 16, 16] and guide.denoiser.options["num_heads"] == 2
    assert guide.train.max_steps == 3 and guide.sample.num_images == 0 and not guide.guidance.enabled
    assert guide.schedule.options == cfg.schedule.options


def test_guide_options_are_checked_by_the_denoiser(tmp_path):
    with pytest.raises(ConfigError, match=r"guidance\.denoiser_options\.channels: needs an even number"):
        load_config(write_config(tmp_path), overrides=["guidance.weight=2", "guidance.denoiser_options.channels=[3]"])


def _guided_config(tmp_path: Path) -> Path:
    path = write_config(tmp_path, "g", epochs=1, num_images=4, trajectory_images=0, dropout=0.0)
    path.write_text(
        path.read_text() + "\n[guidance]\nweight = 3.0\nsteps = 2\n\n[guidance.denoiser_options]\n"
        "channels = [4, 8, 16, 16]\nnum_groups = 2\n"
    )
    return path


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """(the folder, the config and the CLI's result) of one guided run: the guide trains first, then the main
    network."""
    tmp_path = tmp_path_factory.mktemp("guided")
    path = _guided_config(tmp_path)
    return tmp_path, path, cli("run", str(path))


def test_run_trains_the_guide_first_and_samples_with_it(guided_run):
    tmp_path, path, r = guided_run
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "g"
    guide_ckpt = run / "guide" / "checkpoints" / "step-00000002"
    assert guide_ckpt.is_dir() and (run / "checkpoints" / "step-00000004").is_dir()
    assert r.stdout.index("trained to step 2") < r.stdout.index("trained to step 4")
    written = (guide_ckpt / "state.json").stat().st_mtime_ns

    again = cli("run", str(path))  # both runs complete: nothing is retrained
    assert again.returncode == 0, again.stderr
    assert (guide_ckpt / "state.json").stat().st_mtime_ns == written

    outs = {}
    for w in ("1", "3"):
        out = tmp_path / f"w{w}.npz"
        s = cli("sample", str(run), "--num", "4", "--out", str(out), "--set", f"guidance.weight={w}")
        assert s.returncode == 0, s.stderr
        outs[w] = np.load(out)["images"]
    assert "guided by its guide (weight 3)" in s.stdout
    assert np.array_equal(outs["3"], np.load(run / "samples.npz")["images"])  # the run's own samples were guided
    assert not np.array_equal(outs["1"], outs["3"])


def test_a_checkpoint_without_its_guide_says_how_to_sample(guided_run, tmp_path):
    assert guided_run[2].returncode == 0
    lone = tmp_path / "lone"
    shutil.copytree(guided_run[0] / "runs" / "g" / "checkpoints" / "step-00000004", lone)
    r = cli("sample", str(lone), "--num", "2", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "guidance.weight=1" in r.stderr
    assert (
        cli(
            "sample", str(lone), "--num", "2", "--out", str(tmp_path / "x.png"), "--set", "guidance.weight=1"
        ).returncode
        == 0
    )
    r = cli("sample", str(lone), "--num", "2", "--out", str(tmp_path / "x.png"), "--set", "guidance.steps=9")
    assert r.returncode == 2 and "guidance.weight" in r.stderr
