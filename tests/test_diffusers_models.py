"""diffusers models in and out: a run on diffusers' UNet2DModel exported as a pipeline folder that diffusers loads
and samples to the same images as ddpmkit's own sampler, and a pretrained UNet2DModel folder sampled by ddpmkit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from runconfigs import invoke, write_config

import ddpmkit

diffusers = pytest.importorskip("diffusers")

TINY_UNET = """[denoiser]
name = "diffusers-unet"

[denoiser.options]
block_out_channels = [8, 16]
layers_per_block = 1
norm_num_groups = 4
down_block_types = ["DownBlock2D", "AttnDownBlock2D"]
up_block_types = ["AttnUpBlock2D", "UpBlock2D"]
attention_head_dim = 4

[sampler]"""


def unet_config(folder, name: str, **values):
    """The tiny test config with diffusers' UNet2DModel as its denoiser."""
    cfg = write_config(folder, name, **values)
    text = cfg.read_text()
    cfg.write_text(text[: text.index("[denoiser]")] + TINY_UNET + text[text.index("[sampler]") + len("[sampler]") :])
    return cfg


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dunet")
    cfg = unet_config(folder, "du", epochs=1, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg))
    assert r.exit_code == 0, r.output
    return folder / "runs" / "du"


def _ddpmkit_images(source, n: int, seed: int, **plan) -> np.ndarray:
    loaded = ddpmkit.load_run(source, device="cpu")
    images, _ = loaded.draw(n, plan=loaded.plan(**plan), seed=seed, batch_size=n)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()  # NHWC in [0, 1], as diffusers' output_type="np"


def test_a_diffusers_unet_run_exports_to_a_pipeline_that_samples_the_same_images(unet_run, tmp_path):
    out = tmp_path / "export"
    r = invoke("export", str(unet_run), str(out))
    assert r.exit_code == 0 and "DDPMPipeline.from_pretrained" in r.output, r.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other\nlibrary_name: diffusers") and "hf upload" in card
    assert "4 optimizer steps" in card
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.num_train_timesteps == 20 and pipe.scheduler.config.variance_type == "fixed_large"
    theirs = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=20, output_type="np"
    ).images
    ours = _ddpmkit_images(unet_run, 3, seed=7)
    assert theirs.shape == ours.shape == (3, 8, 8, 1)
    assert np.abs(theirs - ours).max() < 1e-4  # the same noise, the same process: the same images
    assert not np.allclose(ours, _ddpmkit_images(unet_run, 3, seed=8), atol=1e-2)
    again = invoke("export", str(unet_run), str(out))
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_a_ddim_export_is_a_ddim_pipeline_matching_ddpmkits_ddim(unet_run, tmp_path):
    loaded = ddpmkit.load_run(unet_run, device="cpu", sampler="ddim", overrides=["sampler.options.steps=5"])
    from ddpmkit.sampling.diffusers_io import export_diffusers

    done = export_diffusers(loaded, tmp_path / "ddim")
    assert done.pipeline == "DDIMPipeline"
    pipe = diffusers.DDIMPipeline.from_pretrained(str(tmp_path / "ddim"))
    theirs = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, eta=0.0, output_type="np"
    ).images
    ours = _ddpmkit_images(unet_run, 2, seed=3, sampler="ddim", options={"steps": 5})
    assert np.abs(theirs - ours).max() < 1e-4


def test_a_flow_run_exports_to_a_flow_matching_pipeline_that_draws_the_same_images(tmp_path):
    cfg = unet_config(tmp_path, "fl", epochs=1, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text() + '\n[objective]\nname = "flow"\n\n[objective.options]\nnum_levels = 21\n')
    assert invoke("run", str(cfg)).exit_code == 0
    run = tmp_path / "runs" / "fl"
    out = tmp_path / "flow-export"
    r = invoke("export", str(run), str(out))
    assert r.exit_code == 0 and "DDPMPipeline" in r.output, r.output
    assert "FlowMatchEulerDiscreteScheduler" in (out / "README.md").read_text()
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=5, output_type="np")
    ours = _ddpmkit_images(run, 2, seed=5, sampler="ddim", options={"steps": 5, "spacing": "linspace"})
    # Euler in t there, DDIM on the flow's levels here: one process, float32 rounding apart (another seed: O(1))
    assert np.abs(theirs.images - ours).max() < 5e-4
    assert "- objective: `ddpmkit:flow`" in (out / "README.md").read_text()

    edm = unet_config(tmp_path, "ed", epochs=1, num_images=0, trajectory_images=0)
    edm.write_text(edm.read_text() + '\n[objective]\nname = "edm"\n\n[objective.options]\nnum_levels = 21\n')
    assert invoke("run", str(edm)).exit_code == 0
    r = invoke("export", str(tmp_path / "runs" / "ed"), str(tmp_path / "edm-export"))
    assert r.exit_code == 2 and "c_noise" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "edm-export").exists()


def test_the_ddpmkit_unet_exports_its_scheduler_and_weights_and_says_diffusers_cannot_load_it(tmp_path):
    cfg = write_config(tmp_path, "own", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    r = invoke("export", str(tmp_path / "runs" / "own"), str(tmp_path / "out"))
    assert r.exit_code == 0 and "cannot build the ddpmkit:unet architecture" in r.output, r.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "ddpmkit-denoiser.json", "ddpmkit-denoiser.safetensors", "scheduler"]
    assert "diffusers cannot build" in (tmp_path / "out" / "README.md").read_text()


def test_a_pretrained_unet2dmodel_folder_is_sampled_by_ddpmkit_and_round_trips(unet_run, tmp_path):
    """A folder diffusers wrote (here: the export of a run) loads with ddpmkit.load_run and draws what the run drew."""
    out = tmp_path / "export"
    assert invoke("export", str(unet_run), str(out)).exit_code == 0
    loaded = ddpmkit.load_run(out, device="cpu")
    assert loaded.config.denoiser.name == "diffusers-unet" and loaded.config.schedule.name == "betas"
    assert torch.allclose(loaded.components.schedule.betas, ddpmkit.load_run(unet_run).components.schedule.betas)
    assert np.abs(_ddpmkit_images(out, 2, seed=5) - _ddpmkit_images(unet_run, 2, seed=5)).max() < 1e-5
    r = invoke("sample", str(out), "--num", "2", "--out", str(tmp_path / "s.npz"))
    assert r.exit_code == 0, r.output
    bare = tmp_path / "bare"  # a UNet2DModel alone: the DDPM paper's linear schedule, T = 1000
    diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(str(bare))
    plain = ddpmkit.load_run(bare, device="cpu")
    assert plain.config.schedule.name == "linear" and plain.components.schedule.num_timesteps == 1000
    images = plain.sample(2, sampler="ddim", steps=3)
    assert images.shape == (2, 8, 8, 1)


def test_a_pretrained_folder_that_does_not_fit_the_run_is_one_line(tmp_path):
    bare = tmp_path / "rgb"
    diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(str(bare))
    cfg = unet_config(tmp_path, "p")
    r = invoke("validate", str(cfg), "--no-timing", "--set", f"denoiser.options.pretrained={bare}")
    assert r.exit_code == 2 and "returns 3 channels; the run's images have 1" in r.output, r.output


def test_a_pretrained_folder_is_evaluated_and_fine_tuned(tmp_path, mnist_root, quick_classifier_cache, monkeypatch):
    bare = tmp_path / "digits"
    model = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    model.save_pretrained(str(bare))
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))
    r = invoke(
        "eval",
        str(bare),
        "--num",
        "10",
        "--sampler",
        "ddim",
        "--set",
        "sampler.options.steps=3",
        "--data-root",
        str(mnist_root),
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_samples"] == 10
    cfg = unet_config(tmp_path, "ft", epochs=1, num_images=0, trajectory_images=0)
    from ddpmkit.run.components import build_components
    from ddpmkit.run.config import load_config

    tuned = load_config(cfg, ["denoiser.options.pretrained=" + str(bare)])
    start = build_components(tuned).denoiser.unet.state_dict()
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # fine-tuning starts from it
    r = invoke(
        "run", str(cfg), "--set", f"denoiser.options.pretrained={bare}", "--set", "schedule.options.num_timesteps=20"
    )
    assert r.exit_code == 0, r.output


def test_the_from_diffusers_page_runs_as_written(unet_run, tmp_path, monkeypatch):
    """docs/from-diffusers.md's Python blocks, in order, in a folder holding the tiny run as runs/du."""
    import re
    import shutil

    from runconfigs import REPO

    shutil.copytree(unet_run, tmp_path / "runs" / "du")
    monkeypatch.chdir(tmp_path)
    page = (REPO / "docs" / "from-diffusers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/from-diffusers.md", "exec"), scope)
    assert len(scope["images"]) == 4 and (tmp_path / "exported" / "model_index.json").is_file()


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """Issue 42: a full disk ended export in a SafetensorError traceback and left out/scheduler/ behind, so the retry
    after freeing space refused ("exists and is not an empty folder")."""
    import safetensors.torch

    cfg = write_config(tmp_path, "full", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    run, out = tmp_path / "runs" / "full", tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    r = invoke("export", str(run), str(out))
    assert r.exit_code == 2 and "No space left on device" in r.output and r.output.strip().count("\n") == 0, r.output
    assert not out.exists() and not list(tmp_path.glob(".out.export-*"))
    monkeypatch.undo()
    r = invoke("export", str(run), str(out))  # space freed: the retry works
    assert r.exit_code == 0 and (out / "ddpmkit-denoiser.safetensors").is_file(), r.output
