"""Samples other tools read (a folder of PNGs), arrays in other samplers' conventions, and optional extras that
say what they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runconfigs import invoke, trained_tiny, write_config

from ddpmkit.errors import DataError
from ddpmkit.evaluation.report import check_feature_network, images_from_array, read_images


@pytest.fixture(scope="module")
def rectangles_run(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("interop"), "i")


def test_sample_into_a_folder_writes_one_png_per_image_that_eval_reads_back(rectangles_run, tmp_path):
    out = tmp_path / "drawn"
    r = invoke("sample", str(rectangles_run), "--num", "5", "--out", str(out), "--scale", "3")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)]  # nothing else inside
    with np.load(tmp_path / "drawn.npz") as npz:
        array = npz["images"]
    assert array.shape == (5, 8, 8, 1)
    assert np.array_equal(np.asarray(Image.open(out / "000003.png")), array[3, :, :, 0])  # lossless, own size
    assert torch.equal(read_images(out), read_images(tmp_path / "drawn.npz"))  # the folder reads back as drawn
    one = invoke("sample", str(rectangles_run), "--num", "5", "--out", str(tmp_path / "g.png"))
    assert one.exit_code == 0
    assert Image.open(tmp_path / "drawn.png").size == tuple(3 * v for v in Image.open(tmp_path / "g.png").size)
    again = invoke("sample", str(rectangles_run), "--num", "2", "--out", str(out))
    assert again.exit_code == 0 and sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png"]
    (out / "notes.txt").write_text("mine")
    refused = invoke("sample", str(rectangles_run), "--num", "2", "--out", str(out))
    assert refused.exit_code == 2 and "holds other files than samples" in refused.output


def test_arrays_in_the_common_conventions_read_as_the_same_images():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    want = torch.from_numpy(u8)
    assert torch.equal(images_from_array(u8, "nchw"), want)
    assert torch.equal(images_from_array(u8.transpose(0, 2, 3, 1), "nhwc"), want)
    assert torch.equal(images_from_array(u8.astype(np.float32) / 255, "unit"), want)
    assert torch.equal(images_from_array(u8.astype(np.float64) / 127.5 - 1, "signed"), want)
    gray = u8[:, 0]
    assert torch.equal(images_from_array(gray, "nhw"), want[:, :1])
    with pytest.raises(DataError, match="float images must lie in"):
        images_from_array(u8.astype(np.float32), "x")
    with pytest.raises(DataError, match="no channel axis"):
        images_from_array(np.zeros((2, 5, 6, 7), np.uint8), "x")
    with pytest.raises(DataError, match="uint8 or floats"):
        images_from_array(u8.astype(np.int32), "x")


def test_an_arr_0_npz_in_nchw_is_read(tmp_path):
    u8 = np.random.default_rng(1).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "samples_3x28x28x1.npz", u8)  # guided-diffusion's name for it: arr_0
    assert read_images(tmp_path / "samples_3x28x28x1.npz").shape == (3, 1, 28, 28)
    np.savez(tmp_path / "other.npz", pictures=u8)
    with pytest.raises(DataError, match="not a samples .npz: no 'images' or 'arr_0' array \\(it has pictures\\)"):
        read_images(tmp_path / "other.npz")


def test_eval_measures_a_run_with_a_classifier_of_its_own_data(tmp_path, monkeypatch):
    """Rectangles are not digits: the classifier is trained on the run's own labelled images (their quadrant),
    one in six held out as the reference; the figures are kept beside the run."""
    import json

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = write_config(tmp_path, "q", epochs=1, num_images=0, trajectory_images=0, num_samples=120)
    assert invoke("run", str(cfg)).exit_code == 0
    run = tmp_path / "runs" / "q"
    r = invoke("eval", str(run), "--num", "10", "--data-root", str(tmp_path / "no-mnist-needed"), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["classifier"]["data"].startswith("synthetic rectangles") and result["num_reference"] == 10
    assert result["classifier"]["classes"] == ["top-left", "top-right", "bottom-left", "bottom-right"]
    assert len(result["samples"]["class_histogram"]) == 4 and result["floor"]["fid"] >= 0
    assert json.loads((run / "eval.json").read_text())["num_samples"] == 10
    assert "classifier" in invoke("eval", str(run), "--num", "10").output  # the cached classifier, as a table


def test_eval_refuses_what_no_feature_network_fits_before_sampling(tmp_path):
    from ddpmkit.evaluation.classifier import run_data
    from ddpmkit.run.config import DataSection

    with pytest.raises(DataError, match="reads grayscale images"):
        check_feature_network((3, 32, 32))
    check_feature_network((1, 28, 28))
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")  # loose: no labels
    with pytest.raises(DataError, match="has no class labels, so no classifier"):
        run_data(DataSection(dataset="image-folder", root=str(tmp_path)))
    np.savez(tmp_path / "rgb.npz", images=np.zeros((12, 8, 8, 3), np.uint8))
    r = invoke("eval", str(tmp_path / "rgb.npz"), "--data-root", str(tmp_path / "no-mnist-needed"))
    assert r.exit_code == 2 and "eval the run itself" in r.output, r.output


def test_a_missing_extra_is_named_by_list_plugins_and_validate(tmp_path, monkeypatch):
    import ddpmkit.extras as extras
    import ddpmkit.registry.discovery as discovery

    monkeypatch.setattr(extras, "is_missing", lambda extra: extra in ("tensorboard", "diffusers"))
    monkeypatch.setattr(discovery, "is_missing", extras.is_missing)
    rows = {r["qualified_name"]: r for r in discovery.list_plugins()}
    assert rows["ddpmkit:diffusers"]["status"] == "needs extra"
    assert "pip install 'ddpmkit[diffusers]'" in rows["ddpmkit:diffusers"]["error"]
    assert rows["ddpmkit:ddim"]["status"] == "ok"
    cfg = write_config(tmp_path)
    r = invoke("validate", str(cfg), "--no-timing", "--set", "plugins.tensorboard.enabled=true")
    assert r.exit_code == 2 and "pip install 'ddpmkit[tensorboard]'" in r.output, r.output
    assert invoke("validate", str(cfg), "--no-timing").exit_code == 0


def _written(path: Path, needle: bytes, wait_s: float = 60.0) -> bytes:
    """The file's bytes once ``needle`` is in them: wandb's service process writes an offline run's log
    after ``finish()`` returns, and on a busy machine it was seen still holding only the header."""
    import time

    deadline = time.time() + wait_s
    while True:
        data = path.read_bytes()
        if needle in data or time.time() > deadline:
            return data
        time.sleep(0.2)


def _sessions(run: Path, run_id: str) -> list[Path]:
    """The run's offline wandb sessions, oldest first. wandb names each by the second it started, and two that
    start in the same second (a fast machine's resume, then eval) get ``-1`` after the id."""
    return sorted((run / "wandb").glob(f"offline-run-*-{run_id}*"))


def test_the_wandb_plugin_writes_an_offline_run_that_a_resume_continues(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = write_config(tmp_path, "w", epochs=1, num_images=2, trajectory_images=0, num_samples=64)
    sets = ["--set", "plugins.wandb.enabled=true", "--set", "plugins.wandb.log_every=1"]
    assert invoke("run", str(cfg), *sets).exit_code == 0
    run = tmp_path / "runs" / "w"
    run_id = (run / "wandb-id.txt").read_text().strip()
    first = _sessions(run, run_id)
    assert len(first) == 1
    log = _written(first[0] / f"run-{run_id}.wandb", b"samples/samples")
    assert b"train/loss" in log and b"samples/samples" in log and b"ddpmkit" in log
    assert invoke("run", str(cfg), *sets, "--set", "train.epochs=2").exit_code == 0  # resumes at step 8
    assert (run / "wandb-id.txt").read_text().strip() == run_id
    assert len(_sessions(run, run_id)) == 2  # the same wandb run, continued
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    r = invoke("eval", str(run), "--num", "10", "--data-root", str(tmp_path / "no-mnist-needed"))
    assert r.exit_code == 0, r.output
    logs = _sessions(run, run_id)
    assert len(logs) == 3 and b"eval/samples/fid" in _written(logs[-1] / f"run-{run_id}.wandb", b"eval/samples/fid")
