"""Cheap checks first: every mistake a config holds is reported at once, and what needs no images is checked
before a single image is opened (a large image folder takes a minute to read)."""

from __future__ import annotations

from runconfigs import invoke

CONFIG = """
[run]
name = "mine"
dir = "{runs}"
device = "cpu"

[data]
dataset = "image-folder"
root = "{images}"
image_size = {size}
channels = 3

[denoiser]
name = "unet"

[denoiser.options]
channels = [8, 16, 32, 32]
attentions = [false, false, false, false]
upscales = [false, false, true, true]
num_groups = {groups}
num_heads = {heads}
dropout = {dropout}

[train]
max_steps = {steps}
"""


def _folder_of_broken_images(tmp_path, count=20):
    """Files named like images that cannot be opened: reading any of them would be an error of its own."""
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(count):
        (images / f"{i}.png").write_bytes(b"not a png")
    return tmp_path / "images"


def _config(tmp_path, **values):
    fields = dict(size=16, groups=4, heads=2, dropout=0.0, steps=2)
    fields.update(values)
    path = tmp_path / "mine.toml"
    path.write_text(CONFIG.format(runs=tmp_path / "runs", images=_folder_of_broken_images(tmp_path), **fields))
    return path


def test_every_mistake_is_reported_at_once_before_any_image_is_read(tmp_path):
    path = _config(tmp_path, groups=3, heads=0, dropout=2, steps='"ten"')
    for command in ("validate", "run"):
        r = invoke(command, str(path))
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        for key in ("train.max_steps", "denoiser.options.num_heads", "denoiser.options.dropout"):
            assert any(key in line for line in lines), (command, key, r.output)
        assert any("denoiser.options.channels" in line and "num_groups = 3" in line for line in lines), r.output
        assert "not a png" not in r.output and "cannot" not in r.output.lower(), r.output  # no image was opened


def test_run_builds_the_model_before_reading_the_images(tmp_path):
    """A mistake only the image shape shows (16 x 15 images are not what the UNet takes) comes before the data."""
    path = _config(tmp_path, size=15)
    r = invoke("run", str(path))
    assert r.exit_code == 2 and "unet" in r.output.lower(), r.output
    assert "0.png" not in r.output and "1.png" not in r.output, r.output  # the broken images were never opened
