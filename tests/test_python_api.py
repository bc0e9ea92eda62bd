"""What users of the anchors expect from Python and the CLI: ``ddpmkit.train`` returns the trained run, images
save in one line (PIL images too), ``plan(16)`` counts a draw's cost, and ``--steps``/``--nrow`` on the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from runconfigs import invoke, write_config

import ddpmkit
from ddpmkit.training.runner import RunReport

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained through ``ddpmkit.train`` (2 steps of synthetic rectangles)."""
    tmp = tmp_path_factory.mktemp("api")
    said: list[str] = []
    loaded = ddpmkit.train(
        write_config(tmp, "api", epochs=1, num_images=0, trajectory_images=0, dropout=0.0),
        overrides=["train.max_steps=2"],
        report=RunReport(info=said.append),
    )
    assert any("trained to step 2" in s for s in said), said
    return loaded


def test_train_returns_the_trained_run_loaded(run):
    assert isinstance(run, ddpmkit.LoadedRun) and run.step == 2 and run.config.run.name == "api"


def test_images_save_in_one_line_whatever_form_sample_gave(run, tmp_path):
    u8 = run.sample(6, seed=0)
    pil = run.sample(6, seed=0, output="pil")
    assert len(pil) == 6 and isinstance(pil[0], Image.Image) and pil[0].size == (u8.shape[2], u8.shape[1])
    assert np.array_equal(np.asarray(pil[3]), u8[3, :, :, 0].numpy())
    for form in (u8, run.sample(6, seed=0, output="float"), pil):
        path = ddpmkit.save_images(form, tmp_path / "grid.npz")
        assert torch.equal(torch.from_numpy(np.load(path)["images"]), u8)  # the same pixels, whatever the form
    grid = np.asarray(Image.open(ddpmkit.save_images(u8, tmp_path / "row.png", nrow=6)))
    side = u8.shape[1] + 2  # torchvision's grid: 2 pixels of padding
    assert grid.shape[:2] == (side + 2, 6 * side + 2)  # one row of six
    with pytest.raises(ddpmkit.ConfigError, match="expected uint8"):
        ddpmkit.save_images(torch.zeros(3, 4), tmp_path / "bad.png")


def test_plan_takes_the_count_and_says_the_cost_of_the_draw(run):
    plan = run.plan(16)
    assert plan.images == 16 and plan.total_evaluations == 16 * plan.evaluations == 16 * 20
    assert run.plan().total_evaluations is None
    fast = run.plan(4, sampler="ddim", steps=5)
    assert fast.total_evaluations == 4 * 5
    with pytest.raises(ddpmkit.ConfigError, match="positive integer"):
        run.plan(0)


def test_steps_and_nrow_on_the_command_line(run, tmp_path):
    source = str(run.run_dir)
    out = tmp_path / "s.npz"
    r = invoke("sample", source, "--num", "3", "--sampler", "ddim", "--steps", "5", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert torch.equal(torch.from_numpy(np.load(out)["images"]), run.sample(3, sampler="ddim", steps=5))
    r = invoke("sample", source, "--num", "3", "--steps", "5", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "--steps 5" in r.output, r.output  # ddpm takes all T steps: named as given
    r = invoke("sample", source, "--num", "8", "--nrow", "2", "--out", str(tmp_path / "tall.png"))
    assert r.exit_code == 0, r.output
    height, width = np.asarray(Image.open(tmp_path / "tall.png")).shape[:2]
    assert height > width  # 4 rows of 2
    r = invoke("eval", str(tmp_path / "s.npz"), "--steps", "5")
    assert r.exit_code == 2 and "--steps" in r.output, r.output
