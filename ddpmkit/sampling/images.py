"""Images on disk: grids (``.png``), uint8 NHWC arrays (``.npz``) and the denoising strip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.run.data import to_uint8


def grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 HxWxC (or HxW) array of rows of ``nrow`` images."""
    from torchvision.utils import make_grid

    g = make_grid(images, nrow=max(1, nrow), padding=padding, pad_value=128)
    arr = g.permute(1, 2, 0).numpy()
    return arr[:, :, 0] if images.shape[1] == 1 else arr


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_images(images: torch.Tensor, path: Path) -> None:
    """Write model-scale images as a grid (``.png``) or as uint8 NHWC under ``images`` (``.npz``)."""
    path = Path(path)
    u8 = to_uint8(images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".npz":
            np.savez_compressed(path, images=u8.permute(0, 2, 3, 1).numpy())
        elif path.suffix.lower() == ".png":
            save_png(grid(u8, nrow=int(np.ceil(np.sqrt(len(u8))))), path)
        else:
            raise ConfigError(f"{path}: output must end in .png or .npz")
    except OSError as exc:
        raise DdpmkitError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_trajectory(captured: dict[int, torch.Tensor], path: Path) -> None:
    """The denoising strip: one row per image, columns from the noisiest captured t to t = 0."""
    steps = sorted(captured, reverse=True)
    if not steps:
        return
    cells = torch.stack([to_uint8(captured[t]) for t in steps], dim=1)  # [rows, steps, C, H, W]
    body = grid(cells.flatten(0, 1), nrow=len(steps))
    save_png(_with_column_labels(body, [f"{t}" for t in steps], cell=cells.shape[-1] + 2), Path(path))


def _with_column_labels(body: np.ndarray, labels: list[str], cell: int) -> np.ndarray:
    """``body`` with a band above it naming each column (here: the step t)."""
    from PIL import Image, ImageDraw

    band = 12
    img = Image.new("L" if body.ndim == 2 else "RGB", (body.shape[1], body.shape[0] + band), color=0)
    img.paste(Image.fromarray(body), (0, band))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        width = draw.textlength(text)
        draw.text((2 + i * cell + (cell - 2 - width) / 2, 0), text, fill=255 if body.ndim == 2 else (255, 255, 255))
    return np.asarray(img)


def check_output_path(path: Path) -> None:
    """ConfigError now, before any sampling, if ``path`` could not be written: it is a folder, or a
    file stands where one of its folders would be."""
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name ending in .png or .npz")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
            break
