"""Images on disk: grids (``.png``), uint8 NHWC arrays (``.npz``) and the denoising strip."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.run.data import to_model_scale, to_uint8


def grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 HxWxC (or HxW) array of rows of ``nrow`` images."""
    from torchvision.utils import make_grid

    g = make_grid(images, nrow=max(1, nrow), padding=padding, pad_value=128)
    arr = g.permute(1, 2, 0).numpy()
    return arr[:, :, 0] if images.shape[1] == 1 else arr


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    """``array`` as a PNG, each pixel a ``scale`` x ``scale`` block (nearest neighbour: no blur)."""
    from PIL import Image

    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(array).save(path)


#: What ``--out`` can name: a grid, an array, or a folder (one PNG per image, beside both).
OUTPUT_FORMS = (
    ".png (a grid), .npz (uint8 NHWC 'images') or a folder DIR (one PNG per image, with DIR.npz and DIR.png beside it)"
)


def is_folder_output(path: Path) -> bool:
    """``--out DIR``: a name without a suffix (or an existing folder not named like a file)."""
    return path.suffix == "" or (path.is_dir() and path.suffix.lower() not in (".png", ".npz"))


def _is_sample_file(path: Path) -> bool:
    return bool(re.fullmatch(r"\d{6}\.png", path.name))


def write_images(
    images: torch.Tensor,
    path: Path,
    *,
    labels: torch.Tensor | None = None,
    classes: list[str] | None = None,
    scale: int = 1,
    nrow: int | None = None,
) -> None:
    """Write model-scale images as a grid (``.png`` of ``nrow`` images a row, default a square; upscaled ``scale``
    times), as uint8 NHWC under ``images``
    (``.npz``), or into a folder DIR: ``000000.png``... one per image at its own size and nothing else (what
    clean-fid, torch-fidelity and pytorch-fid read), with ``DIR.npz`` and the grid ``DIR.png`` beside it.

    With ``labels`` (the class each image was drawn as): the ``.npz`` holds them as ``labels`` (and the class
    names as ``classes``), and the grid has one row per run of equal labels, named at its left.
    """
    path = Path(path)
    u8 = to_uint8(images)
    try:
        if is_folder_output(path):
            path.mkdir(parents=True, exist_ok=True)
            for old in path.iterdir():  # an earlier, larger set's images would be read with this one's
                if _is_sample_file(old):
                    old.unlink()
            hwc = u8.permute(0, 2, 3, 1).numpy()
            for i, image in enumerate(hwc):
                save_png(image[:, :, 0] if image.shape[-1] == 1 else image, path / f"{i:06d}.png")
            write_images(images, path.with_name(path.name + ".npz"), labels=labels, classes=classes)
            write_images(
                images, path.with_name(path.name + ".png"), labels=labels, classes=classes, scale=scale, nrow=nrow
            )
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".npz":
            extra = {}
            if labels is not None:
                extra = {"labels": labels.to(torch.int64).numpy(), "classes": np.array(classes or [], dtype=str)}
            np.savez_compressed(path, images=u8.permute(0, 2, 3, 1).numpy(), **extra)
        else:
            save_png(
                class_rows(u8, labels, classes or [], nrow)
                if labels is not None
                else grid(u8, nrow=nrow or int(np.ceil(np.sqrt(len(u8))))),
                path,
                scale,
            )
    except OSError as exc:
        raise DdpmkitError(f"{path}: cannot write ({exc.strerror or exc})") from None


def save_images(
    images: torch.Tensor | list[Any],
    path: str | Path,
    *,
    nrow: int | None = None,
    scale: int = 1,
    labels: torch.Tensor | None = None,
    classes: list[str] | None = None,
) -> Path:
    """Save what :meth:`~ddpmkit.sampling.loaded.LoadedRun.sample` returned (uint8 NHWC, float NCHW in [-1, 1], or
    PIL images) as a grid (``.png``, ``nrow`` images a row), an ``.npz`` or a folder of PNGs; returns ``path``."""
    path = Path(path)
    check_output_path(path)
    write_images(_sampled_to_model_scale(images), path, labels=labels, classes=classes, scale=scale, nrow=nrow)
    return path


def _sampled_to_model_scale(images: torch.Tensor | list[Any]) -> torch.Tensor:
    """float NCHW in [-1, 1] from any output of ``sample``: uint8 NHWC, float NCHW, or PIL images."""
    if isinstance(images, list):
        arrays = [np.asarray(image) for image in images]
        images = torch.from_numpy(np.stack([a[:, :, None] if a.ndim == 2 else a for a in arrays]))
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ConfigError("images: expected uint8 [N, H, W, C], float [N, C, H, W] in [-1, 1] or a list of PIL images")
    if images.dtype == torch.uint8:
        return to_model_scale(images.permute(0, 3, 1, 2))
    return images.float()


def to_pil(images: torch.Tensor) -> list[Any]:
    """uint8 NHWC images as PIL images (grayscale "L" or "RGB"), as diffusers pipelines hand them out."""
    from PIL import Image

    arrays = images.cpu().numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a) for a in arrays]


def class_rows(u8: torch.Tensor, labels: torch.Tensor, classes: list[str], nrow: int | None = None) -> np.ndarray:
    """A grid with one row per run of equal consecutive labels (of at most ``nrow`` images: a longer run goes on in
    the next row), each row named by its class at the left."""
    runs: list[tuple[int, int, int]] = []  # (label, start, end)
    for i, label in enumerate(labels.tolist()):
        if runs and runs[-1][0] == label and (nrow is None or runs[-1][2] - runs[-1][1] < nrow):
            runs[-1] = (label, runs[-1][1], i + 1)
        else:
            runs.append((label, i, i + 1))
    width = max(end - start for _, start, end in runs)
    blank = torch.full_like(u8[:1], 128)
    cells = torch.cat([torch.cat([u8[start:end], *[blank] * (width - (end - start))]) for _, start, end in runs])
    body = grid(cells, nrow=width)
    names = [classes[label] if 0 <= label < len(classes) else str(label) for label, _, _ in runs]
    return _with_row_labels(body, names, cell=u8.shape[-2] + 2)


def _with_row_labels(body: np.ndarray, labels: list[str], cell: int) -> np.ndarray:
    """``body`` with a band at its left naming each row (here: the class)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    band = 4 + int(max(draw.textlength(text) for text in labels))
    img = Image.new("L" if body.ndim == 2 else "RGB", (body.shape[1] + band, body.shape[0]), color=0)
    img.paste(Image.fromarray(body), (band, 0))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        draw.text((2, 2 + i * cell + (cell - 12) / 2), text, fill=255 if body.ndim == 2 else (255, 255, 255))
    return np.asarray(img)


def write_trajectory(captured: dict[int, torch.Tensor], path: Path) -> None:
    """The denoising strip (:func:`trajectory_strip`) as a PNG; nothing when nothing was captured."""
    if captured:
        save_png(trajectory_strip(captured), Path(path))


def trajectory_strip(captured: dict[int, torch.Tensor]) -> np.ndarray:
    """The denoising strip: one row per image, columns from the noisiest captured t to t = 0, each labelled."""
    steps = sorted(captured, reverse=True)
    cells = torch.stack([to_uint8(captured[t]) for t in steps], dim=1)  # [rows, steps, C, H, W]
    body = grid(cells.flatten(0, 1), nrow=len(steps))
    return _with_column_labels(body, [f"{t}" for t in steps], cell=cells.shape[-1] + 2)


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
    """ConfigError now, before any sampling, if ``path`` could not be written: a file stands where one of its
    folders would be (or where the output folder would be)."""
    folder = is_folder_output(path)
    if not folder and path.suffix.lower() not in (".png", ".npz"):
        raise ConfigError(f"--out {path}: must end in .png or .npz, or be a folder name: {OUTPUT_FORMS}")
    if not folder and path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name ending in .png or .npz, or a folder name")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file; name {OUTPUT_FORMS}")
    if folder and path.is_dir() and any(not _is_sample_file(p) for p in path.iterdir()):
        raise ConfigError(
            f"--out {path}: the folder holds other files than samples; name a new or empty folder "
            "(its PNGs would be read as samples)"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
            break
