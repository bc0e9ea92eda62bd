"""Datasets: MNIST from local IDX files, image folders, synthetic; clear errors when data is missing."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.errors import DataError
from ddpmkit.run.config import DataSection
from ddpmkit.run.data import load_dataset, resolve_root, to_model_scale, to_uint8


def test_mnist_padded_and_scaled(mnist_root):
    ds = load_dataset(DataSection(dataset="mnist", root=str(mnist_root), download=False))
    assert ds.images.shape == (60000, 1, 32, 32) and ds.images.dtype == torch.uint8
    # 28 -> 32 by zero padding: a 2-pixel black border everywhere
    border = torch.cat(
        [
            ds.images[:, :, :2].flatten(),
            ds.images[:, :, -2:].flatten(),
            ds.images[:, :, :, :2].flatten(),
            ds.images[:, :, :, -2:].flatten(),
        ]
    )
    assert int(border.max()) == 0
    x = to_model_scale(ds.images[:256])
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # [-1, 1], not the tutorial's [0, 1]
    # the known mean pixel intensity of MNIST's training set: 0.1307 (at 28x28)
    mean28 = ds.images[:, :, 2:30, 2:30].float().mean().item() / 255
    assert abs(mean28 - 0.1307) < 5e-4
    assert len(ds.fingerprint()) == 64


def test_mnist_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DataSection(dataset="mnist", root=str(tmp_path), download=False))
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "--data-root" in msg and "DDPMKIT_DATA_ROOT" in msg


def test_mnist_download_failure(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DataError, match="download failed.*URLError"):
        load_dataset(DataSection(dataset="mnist", root=str(tmp_path), download=True))


def test_data_root_precedence(monkeypatch, tmp_path):
    """--data-root, else what the config names, else $DDPMKIT_DATA_ROOT, else ./data: the variable is a default,
    it never replaces a folder the config names (an image folder's own path, say)."""
    section = DataSection(root="from-config")
    monkeypatch.delenv("DDPMKIT_DATA_ROOT", raising=False)
    assert str(resolve_root(section)) == "from-config" and str(resolve_root(DataSection())) == "data"
    monkeypatch.setenv("DDPMKIT_DATA_ROOT", str(tmp_path))
    assert str(resolve_root(section)) == "from-config" and resolve_root(DataSection()) == tmp_path
    assert str(resolve_root(section, "cli")) == "cli"


def test_the_variable_fills_a_config_that_names_no_root_and_every_copy_keeps_it(monkeypatch, tmp_path):
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.run.guide import guide_config

    monkeypatch.setenv("DDPMKIT_DATA_ROOT", str(tmp_path))
    cfg = config_from_dict({"guidance": {"weight": 2.0}})
    assert cfg.data.root == str(tmp_path) and guide_config(cfg).data.root == str(tmp_path)
    named = config_from_dict({"data": {"dataset": "image-folder", "root": "my-images"}})
    assert named.data.root == "my-images"  # what the config names wins
    given = config_from_dict({"data": {"root": "x"}}, overrides=[('data.root="cli"', "--data-root cli")])
    assert given.data.root == "cli"
    assert "root" not in config_from_dict({}).identity().get("data", {})  # not part of the run's identity


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((20, 10), 200, np.uint8)).save(tmp_path / "a.png")
    rgb = np.zeros((12, 12, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "sub" / "b.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    gray = load_dataset(DataSection(dataset="image-folder", root=str(tmp_path), image_size=8, channels=1))
    assert gray.images.shape == (2, 1, 8, 8)
    assert int(gray.images[0].float().mean().round()) == 200
    color = load_dataset(DataSection(dataset="image-folder", root=str(tmp_path), image_size=8, channels=3))
    assert color.images.shape == (2, 3, 8, 8)
    red = color.images[1].float().mean(dim=(1, 2))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataSection(dataset="image-folder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataSection(dataset="image-folder", root=str(tmp_path)))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_dataset(DataSection(dataset="image-folder", root=str(tmp_path)))


def test_synthetic_is_deterministic_and_limit():
    a = load_dataset(DataSection(dataset="synthetic", num_samples=10, image_size=8))
    b = load_dataset(DataSection(dataset="synthetic", num_samples=10, image_size=8, limit=4))
    assert a.images.shape == (10, 1, 8, 8) and torch.equal(a.images[:4], b.images)
    assert set(a.images.unique().tolist()) == {0, 255}


def test_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_scale(u)), u)
