"""Datasets, held in memory as one uint8 tensor [N, C, H, W] (0-255).

The training loop turns a batch into [-1, 1] with :func:`to_model_scale`.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from ddpmkit.run.config import DataSection
from ddpmkit.runtime.limits import check_fits
from ddpmkit.errors import DataError

if TYPE_CHECKING:
    import PIL.Image

DATA_ROOT_ENV = "DDPMKIT_DATA_ROOT"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


#: The classes of the datasets whose classes are known without reading them.
MNIST_CLASSES = [str(d) for d in range(10)]
SYNTHETIC_CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]  # where the rectangle's centre lies


@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    description: str
    labels: torch.Tensor | None = None  # int64 [N], indices into classes
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self, with_labels: bool = False) -> str:
        """sha256 of the images' bytes and shape (and of the labels, ``with_labels``): equal fingerprints mean
        equal training data."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if with_labels and self.labels is not None:
            h.update(json.dumps(self.classes).encode())
            h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] -> uint8 0..255 (rounded, clamped)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def resolve_root(section: DataSection, override: str | Path | None = None) -> Path:
    """The data root: the command line's, else $DDPMKIT_DATA_ROOT, else the config's."""
    if override is not None:
        return Path(override)
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else Path(section.root)


def load_dataset(section: DataSection, *, root_override: str | Path | None = None, seed: int = 0,
                 labelled: bool = False) -> Dataset:
    """Load the configured dataset at the configured size and channel count; ``labelled``: with its class
    labels, a DataError if it has none."""
    count = {"mnist": 60_000, "synthetic": section.num_samples}.get(section.dataset)
    if count is not None:  # uint8 images, plus a float32 copy while resizing
        check_fits(min(count, section.limit or count) * section.channels * section.image_size**2 * 5,
                   f"data.image_size = {section.image_size}", "choose a smaller data.image_size (or data.limit)")
    if section.dataset == "mnist":
        ds = _mnist(resolve_root(section, root_override), section.download, section.image_size)
    elif section.dataset == "image-folder":
        ds = _image_folder(resolve_root(section, root_override), section.image_size, section.channels)
    else:
        ds = _synthetic(section.num_samples, section.image_size, section.channels, seed=1234)
    if section.dataset == "mnist" and section.channels == 3:
        ds.images = ds.images.expand(-1, 3, -1, -1).contiguous()
    if section.limit is not None:
        ds.images = ds.images[: section.limit]
        ds.labels = ds.labels[: section.limit] if ds.labels is not None else None
    if len(ds) == 0:
        raise DataError(f"{ds.description}: no images")
    if labelled and ds.labels is None:
        raise DataError(f"{ds.description}: conditioning.kind = \"class\" needs class labels, and these images have "
                        "none (an image folder is labelled by one sub-folder per class)")
    if not labelled:
        ds.labels, ds.classes = None, []
    return ds


def dataset_classes(section: DataSection, *, root_override: str | Path | None = None) -> list[str]:
    """The class names of the configured dataset, without loading its images (an image folder: its
    sub-folders that hold images, sorted)."""
    if section.dataset == "mnist":
        return list(MNIST_CLASSES)
    if section.dataset == "synthetic":
        return list(SYNTHETIC_CLASSES)
    root = resolve_root(section, root_override)
    return [d.name for d in _class_folders(root)] if root.is_dir() else []


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Pad 28 -> 32 with zeros as the tutorial does; otherwise resize (uint8 in and out)."""
    h = images.shape[-1]
    if size >= h and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(images, (p, p, p, p))
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _mnist(root: Path, download: bool, size: int) -> Dataset:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    present = all((raw / name).is_file() for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))
    try:
        mnist = MNIST(str(root), train=True, download=False)
    except (AssertionError, ValueError, RuntimeError, EOFError, OSError, MemoryError) as exc:
        if present:  # there, but not readable: saying "not found" would send the user the wrong way
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
            raise DataError(
                f"{raw}: the MNIST files are there but damaged ({reason}); replace them with good copies "
                "(or delete them to download again)"
            ) from None
        if not isinstance(exc, RuntimeError):
            raise
        if not download:
            raise DataError(
                f"MNIST not found under {root / 'MNIST' / 'raw'} and data.download is false; "
                f"point at existing files with --data-root PATH or {DATA_ROOT_ENV}=PATH (e.g. ../shared/data)"
            ) from None
        try:
            mnist = MNIST(str(root), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"MNIST not found under {root / 'MNIST' / 'raw'} and the download failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); point at existing files with --data-root PATH "
                f"or {DATA_ROOT_ENV}=PATH (e.g. ../shared/data)"
            ) from None
    images = mnist.data.unsqueeze(1)  # uint8 [60000, 1, 28, 28]
    return Dataset(_fit(images, size), f"MNIST train ({root})", mnist.targets.to(torch.int64), list(MNIST_CLASSES))


@contextmanager
def open_image(path: Path) -> Iterator["PIL.Image.Image"]:
    """``PIL.Image.open(path)``, with a file that is not an image, or that claims more pixels than
    Pillow allows (a decompression bomb), turned into one DataError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except OSError as exc:  # PIL.UnidentifiedImageError is one
        raise DataError(f"{path}: not an image ({exc})") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: refused: its header claims more pixels than Pillow allows "
                        f"({Image.MAX_IMAGE_PIXELS:,}; a decompression bomb?)") from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _class_folders(root: Path) -> list[Path]:
    """The sub-folders of ``root`` that hold images (at any depth), sorted by name: torchvision's ImageFolder classes."""
    return sorted((d for d in root.iterdir() if d.is_dir() and any(_is_image(p) for p in d.rglob("*"))),
                  key=lambda d: d.name)


def _image_folder(root: Path, size: int, channels: int) -> Dataset:
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # labelled when every image lies in a sub-folder (one per class, ImageFolder's convention)
    folders = _class_folders(root)
    classes = [d.name for d in folders]
    index = {name: i for i, name in enumerate(classes)}
    in_class = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    labels = torch.tensor([index[c] for c in in_class], dtype=torch.int64) if None not in in_class else None
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    for i, path in enumerate(files):
        with open_image(path) as im:
            im = im.convert(mode)
            w, h = im.size
            scale = size / min(w, h)  # resize the shorter side to `size`, then center-crop
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        out[i] = data.view(size, size, channels).permute(2, 0, 1)
    described = f"image folder {root} ({len(files)} images" + (f" in {len(classes)} classes)" if labels is not None else ")")
    return Dataset(out, described, labels, classes if labels is not None else [])


def _synthetic(n: int, size: int, channels: int, seed: int) -> Dataset:
    """Bright axis-aligned rectangles on black: quick to learn, structured enough to see."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros((n, channels, size, size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    lo = max(1, size // 4)
    for i in range(n):
        h, w = torch.randint(lo, size // 2 + 1, (2,), generator=g).tolist()
        y = int(torch.randint(0, size - h + 1, (1,), generator=g))
        x = int(torch.randint(0, size - w + 1, (1,), generator=g))
        images[i, :, y : y + h, x : x + w] = 255
        labels[i] = 2 * int(2 * y + h > size) + int(2 * x + w > size)  # the quadrant of the centre
    return Dataset(images, f"synthetic rectangles ({n} images)", labels, list(SYNTHETIC_CLASSES))
