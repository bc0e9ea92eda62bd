"""The load-once Python API: ``ddpmkit.load_run(path)`` verifies and loads a run once and draws many times;
``ddpmkit sample`` and ``sweep`` go through it (a sweep loads its checkpoint once)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from runconfigs import REPO, invoke, on_mnist, write_config
from runconfigs import ddpmkit as ddpmkit_cli

import ddpmkit
import ddpmkit.run.checkpoint as checkpoint_module
from ddpmkit.run.data import settle_section


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root):
    tmp = tmp_path_factory.mktemp("loaded")
    cfg = write_config(tmp, "lr", epochs=1, num_images=0, trajectory_images=0, dropout=0.0)
    r = ddpmkit_cli("run", str(cfg), *on_mnist(mnist_root, 32))
    assert r.returncode == 0, r.stderr
    return tmp / "runs" / "lr"


def test_load_once_sample_many(trained):
    run = ddpmkit.load_run(trained)
    assert isinstance(run, ddpmkit.LoadedRun) and run.step == 4 and run.weights == "ema"
    assert run.checkpoint is not None and run.checkpoint.path.name == "step-00000004"
    assert run.config.sampler.name == "ddpmkit:ddpm" and run.manifest["ddpmkit"] == ddpmkit.__version__
    images = run.sample(3, seed=1)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (3, 8, 8, 1)
    assert torch.equal(images, run.sample(3, seed=1))  # the same seed, the same images
    assert not torch.equal(images, run.sample(3, seed=2))
    floats = run.sample(3, seed=1, output="float")
    assert floats.dtype == torch.float32 and tuple(floats.shape) == (3, 1, 8, 8) and floats.abs().max() <= 1
    assert torch.equal(((floats + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1), images)
    fast = run.plan(sampler="ddim", steps=5)
    assert len(fast.timesteps) == 5 and fast.evaluations == 5 and run.plan().evaluations == 20
    assert tuple(run.sample(2, sampler="ddim", steps=5).shape) == (2, 8, 8, 1)
    with pytest.raises(ddpmkit.ConfigError, match="sampler.options.steps"):
        run.plan(steps=5)  # ddpm takes all T steps: no steps option


def test_the_sample_command_draws_what_the_python_api_draws(trained, tmp_path):
    out = tmp_path / "s.npz"
    r = invoke("sample", str(trained), "--num", "3", "--seed", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    from_file = torch.from_numpy(np.load(out)["images"])
    assert torch.equal(from_file, ddpmkit.load_run(trained).sample(3, seed=1))


def test_raw_weights_and_a_checkpoint_folder(trained):
    ema = ddpmkit.load_run(trained / "checkpoints" / "step-00000004")
    raw = ddpmkit.load_run(trained, weights="model")
    assert ema.step == raw.step == 4 and raw.weights == "model"
    assert not torch.equal(ema.sample(2, seed=0), raw.sample(2, seed=0))
    with pytest.raises(ddpmkit.ConfigError, match="weights = 'best'"):
        ddpmkit.load_run(trained, weights="best")  # type: ignore[arg-type]


def test_a_sweep_loads_its_checkpoint_once(trained, tmp_path, monkeypatch, mnist_root, quick_classifier_cache):
    loads = []
    real = checkpoint_module.load_checkpoint

    def counting(path):
        loads.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", counting)
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))
    r = invoke(
        "sweep",
        str(trained),
        "--sampler",
        "ddpm",
        "--sampler",
        "ddim:4,5",
        "--num",
        "10",
        "--data-root",
        str(mnist_root),
        "--out",
        str(tmp_path / "sweep"),
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert len(loads) == 1, loads


def test_the_readme_example_runs(trained, tmp_path, monkeypatch):
    """The README's five lines, on the tiny run instead of runs/mnist-cpu."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- load-run example -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 6 and '"runs/mnist-cpu"' in block
    # the shape its comment promises is what runs/mnist-cpu gives: configs/mnist-cpu.toml's images, NHWC
    data = settle_section(ddpmkit.load_config(REPO / "configs" / "mnist-cpu.toml").data)  # MNIST's: no files read
    promised = re.search(r"uint8 \[16, (\d+), (\d+), (\d+)\]", block).groups()
    assert tuple(map(int, promised)) == (data.image_size, data.image_size, data.channels), promised
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace('"runs/mnist-cpu"', repr(str(trained))), "README.md", "exec"), namespace)
    drawn, data = namespace["images"], namespace["run"].config.data
    assert tuple(drawn.shape) == (16, data.image_size, data.image_size, data.channels) and drawn.dtype == torch.uint8
