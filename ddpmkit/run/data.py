"""Datasets, held in memory as one uint8 tensor [N, C, H, W] (0-255).

The training loop turns a batch into [-1, 1] with :func:`to_model_scale`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, BinaryIO

import torch
import torch.nn.functional as F

from ddpmkit.errors import DataError, DataNotFound, MissingLabels
from ddpmkit.run.config import DATA_ROOT_ENV, NATIVE_SHAPES, DataSection
from ddpmkit.runtime.limits import check_fits

if TYPE_CHECKING:
    import PIL.Image

    from ddpmkit.run.config import RunConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


#: The classes of the datasets whose classes are known without reading them.
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SYNTHETIC_CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]  # where the rectangle's centre lies

#: The official binary distribution of CIFAR-10 (the records need no unpickling, unlike the python one's).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then 1024 red, 1024 green and 1024 blue bytes, row by row


@dataclass(frozen=True)
class DatasetInfo:
    """What ``ddpmkit describe DATASET`` says of a dataset ``[data] dataset`` can name."""

    name: str
    summary: str
    options: tuple[str, ...]  # the [data] keys that apply to it
    extra: str | None = None  # the ddpmkit extra it needs, e.g. "hf"


_COMMON = ("image_size", "channels", "crop", "hflip", "limit")
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist",
            "MNIST's 60,000 training digits (28x28 grayscale, 10 classes), torchvision's IDX files "
            "under ROOT/MNIST/raw",
            ("root", "download", *_COMMON),
        ),
        DatasetInfo(
            "fashion-mnist",
            "FashionMNIST's 60,000 training images of clothing (28x28 grayscale, 10 classes), "
            "IDX files under ROOT/FashionMNIST/raw",
            ("root", "download", *_COMMON),
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10's 50,000 training images (32x32 RGB, 10 classes) from the official binary "
            f"distribution under ROOT/{CIFAR10_DIR} (checksummed when downloaded; nothing is unpickled)",
            ("root", "download", *_COMMON),
        ),
        DatasetInfo(
            "image-folder",
            "every image under ROOT (png, jpg, bmp, webp, gif; any depth), labelled by its "
            "sub-folder when every image lies in one (torchvision's ImageFolder convention)",
            ("root", *_COMMON),
        ),
        DatasetInfo(
            "hf",
            "a HuggingFace datasets dataset: its name on the Hub, a save_to_disk folder or a folder of "
            "images (datasets' imagefolder)",
            ("path", "split", "image_column", "label_column", "download", *_COMMON),
            extra="hf",
        ),
        DatasetInfo(
            "synthetic",
            "bright rectangles on black, labelled by the quadrant of their centre: quick to learn, "
            "for tests and smoke runs",
            ("num_samples", *_COMMON),
        ),
    )
}


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


def default_root() -> Path:
    """Where a dataset is looked for when nothing names its root: $DDPMKIT_DATA_ROOT, else ./data."""
    return Path(os.environ.get(DATA_ROOT_ENV) or "data")


def resolve_root(section: DataSection, override: str | Path | None = None) -> Path:
    """The data root: ``override`` (eval's --data-root for a run's data), else the config's ``data.root`` when it
    names one (a run's --data-root is folded into it), else $DDPMKIT_DATA_ROOT, else ./data."""
    if override is not None:
        return Path(override)
    return Path(section.root) if "root" in section.model_fields_set else default_root()


# --- auto image_size and channels ------------------------------------------------------------------


def settle_section(section: DataSection) -> DataSection:
    """``section`` with ``image_size`` and ``channels`` made numbers: ``auto`` is the dataset's own, read from the
    files' headers for an image folder or hf dataset (DataError when those differ in size and no size is set)."""
    if section.settled:
        return section
    if section.dataset in NATIVE_SHAPES:
        return section.with_native_shape()
    else:
        channels, size = _scan_shape(_sources(section), _where(section), need_size=section.image_size == "auto")
    return section.model_copy(
        update={
            "channels": channels if section.channels == "auto" else section.channels,
            "image_size": size if section.image_size == "auto" else section.image_size,
        }
    )


def settle(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its data section settled (see :func:`settle_section`); ``cfg`` itself when it already is."""
    if cfg.data.settled:
        return cfg
    return cfg.model_copy(update={"data": settle_section(cfg.data)})


def _where(section: DataSection) -> str:
    if section.dataset == "hf":
        return f"hf dataset {section.path} (split {section.split})"
    return f"image folder {resolve_root(section)}"


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _scan_shape(sources: list[_Source], where: str, *, need_size: bool) -> tuple[int, int | None]:
    """(3 if any image is in colour else 1, the images' common side) from the headers alone."""
    sizes: dict[tuple[int, int], str] = {}
    colour = False
    for src in sources:
        with src.open() as im:
            colour = colour or im.mode not in _GRAY_MODES
            sizes.setdefault(im.size, src.name)
    if not need_size:
        return (3 if colour else 1), None
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise DataError(
            f"{where}: the images differ in size ({shown}{', ...' if len(sizes) > 3 else ''}); set "
            "data.image_size to resize them all to one square (data.crop says how)"
        )
    ((w, h),) = sizes
    if w != h:
        raise DataError(
            f"{where}: the images are {w}x{h}, not square; set data.image_size to resize them "
            '(data.crop = "center" keeps the centre square)'
        )
    return (3 if colour else 1), w


# --- loading --------------------------------------------------------------------------------------


def load_dataset(section: DataSection, *, seed: int = 0, labelled: bool = False) -> Dataset:
    """Load the configured dataset at the configured size and channel count (``auto`` settled from the data);
    ``labelled``: with its class labels, a DataError if it has none."""
    section = settle_section(section)
    size, channels = int(section.image_size), int(section.channels)
    count = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000, "synthetic": section.num_samples}.get(
        section.dataset
    )
    if count is not None:  # uint8 images, plus a float32 copy while resizing
        check_fits(
            min(count, section.limit or count) * channels * size**2 * 5,
            f"data.image_size = {size}",
            "choose a smaller data.image_size (or data.limit)",
        )
    root = resolve_root(section)
    if section.dataset in ("mnist", "fashion-mnist"):
        ds = _idx(section.dataset, root, section.download)
    elif section.dataset == "cifar10":
        ds = _cifar10(root, section.download)
    elif section.dataset in ("image-folder", "hf"):
        ds = _decoded(section, size, channels)
    else:
        ds = _synthetic(section.num_samples, size, channels, seed=1234)
    if section.limit is not None:
        ds.images = ds.images[: section.limit]
        ds.labels = ds.labels[: section.limit] if ds.labels is not None else None
    ds.images = _with_channels(_fit(ds.images, size, section.crop), channels)
    if len(ds) == 0:
        raise DataError(f"{ds.description}: no images")
    if labelled and ds.labels is None:
        raise MissingLabels(
            f'{ds.description}: conditioning.kind = "class" needs class labels, and these images have '
            "none (an image folder is labelled by one sub-folder per class; an hf dataset by "
            "data.label_column)"
        )
    if not labelled:
        ds.labels, ds.classes = None, []
    return ds


def dataset_classes(section: DataSection) -> list[str]:
    """The class names of the configured dataset, without loading its images (an image folder: its
    sub-folders that hold images, sorted)."""
    known = {
        "mnist": MNIST_CLASSES,
        "fashion-mnist": FASHION_MNIST_CLASSES,
        "cifar10": CIFAR10_CLASSES,
        "synthetic": SYNTHETIC_CLASSES,
    }
    if section.dataset in known:
        return list(known[section.dataset])
    if section.dataset == "hf":
        return _hf_labels(_hf_dataset(section), section)[1]
    root = resolve_root(section)
    return [d.name for d in _class_folders(root)] if root.is_dir() else []


def _fit(images: torch.Tensor, size: int, crop: str = "center") -> torch.Tensor:
    """Images of another size made ``size`` square (uint8 in and out): 28 -> 32 zero-padded as the tutorial does;
    otherwise the shorter side resized to ``size`` and the centre kept (``crop = "center"``) or the whole image
    resized to the square (``"none"``)."""
    h, w = images.shape[-2:]
    if h == w == size:
        return images
    if h == w and size >= h and (size - h) % 2 == 0 and h == 28:
        p = (size - h) // 2
        return F.pad(images, (p, p, p, p))
    if crop == "center" and h != w:
        scale = size / min(h, w)
        target = (max(size, round(h * scale)), max(size, round(w * scale)))
    else:
        target = (size, size)
    resized = F.interpolate(images.float(), size=target, mode="bilinear", antialias=True, align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    return resized[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8).contiguous()


def _with_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale repeated to RGB, or RGB to its luma (ITU-R 601, as Pillow's "L")."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _download_failed(what: str, where: Path, exc: BaseException) -> DataError:
    return DataNotFound(
        f"{what} not found under {where} and the download failed ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); point at existing files with --data-root PATH "
        f"or {DATA_ROOT_ENV}=PATH (e.g. ../shared/data)"
    )


def _idx(name: str, root: Path, download: bool) -> Dataset:
    """MNIST or FashionMNIST from torchvision's IDX files (downloaded when missing and ``download``)."""
    from torchvision.datasets import MNIST, FashionMNIST

    cls, title = (MNIST, "MNIST") if name == "mnist" else (FashionMNIST, "FashionMNIST")
    raw = root / cls.__name__ / "raw"
    files = (raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte")
    try:
        if all(f.is_file() for f in files):  # the raw IDX files, read as they are: never torchvision's legacy
            from torchvision.datasets.mnist import read_image_file, read_label_file  # pickles beside them

            data = SimpleNamespace(data=read_image_file(str(files[0])), targets=read_label_file(str(files[1])))
        else:
            data = cls(str(root), train=True, download=False)
    except (AssertionError, ValueError, RuntimeError, EOFError, OSError, MemoryError, pickle.UnpicklingError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        if all(f.is_file() for f in files):  # there, but not readable: "not found" would send the user the wrong way
            raise DataError(
                f"{raw}: the {title} files are there but damaged ({reason}); replace them with good copies "
                "(or delete them to download again)"
            ) from None
        legacy = root / cls.__name__ / "processed" / "training.pt"
        if legacy.exists():
            raise DataError(
                f"{legacy}: torchvision's legacy pickle, which ddpmkit does not load (a pickle can run code); put the "
                f"raw IDX files in {raw} (or delete {legacy.parent} to download them)"
            ) from None
        if not isinstance(exc, RuntimeError):
            raise
        if not download:
            raise DataNotFound(
                f"{title} not found under {raw} and data.download is false; "
                f"point at existing files with --data-root PATH or {DATA_ROOT_ENV}=PATH (e.g. ../shared/data)"
            ) from None
        try:
            data = cls(str(root), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            raise _download_failed(title, raw, exc) from None
    images = data.data.unsqueeze(1)  # uint8 [60000, 1, 28, 28]
    if images.dtype != torch.uint8 or tuple(images.shape[2:]) != (28, 28) or len(data.targets) != len(images):
        raise DataError(
            f"{raw}: the {title} files are there but damaged (images {tuple(images.shape)} "
            f"{images.dtype}, {len(data.targets)} labels; expected uint8 28x28 and a label each)"
        )
    labels = data.targets.to(torch.int64)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= 10):
        raise DataError(f"{raw}: the {title} labels are damaged (values outside 0..9)")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return Dataset(images, f"{title} train ({root})", labels, list(classes))


def _cifar10(root: Path, download: bool) -> Dataset:
    """CIFAR-10's training set from the binary batches (downloaded, checksummed and unpacked when missing)."""
    folder = root / CIFAR10_DIR
    if not all((folder / name).is_file() for name in CIFAR10_TRAIN):
        if not download:
            raise DataNotFound(
                f"CIFAR-10 not found under {folder} ({', '.join(CIFAR10_TRAIN)}) and data.download is "
                f"false; point at existing files with --data-root PATH or {DATA_ROOT_ENV}=PATH"
            )
        try:
            _download_cifar10(root)
        except DataError:
            raise
        except Exception as exc:  # network errors come in many types
            raise _download_failed("CIFAR-10", folder, exc) from None
    images, labels = [], []
    for name in CIFAR10_TRAIN:
        path = folder / name
        raw = path.read_bytes()
        if not raw or len(raw) % CIFAR10_RECORD:
            raise DataError(
                f"{path}: not a CIFAR-10 binary batch ({len(raw):,} bytes is not a whole number of "
                f"{CIFAR10_RECORD}-byte records); replace it with a good copy (or delete it to download again)"
            )
        records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, CIFAR10_RECORD)
        if int(records[:, 0].max()) >= len(CIFAR10_CLASSES):
            raise DataError(
                f"{path}: not a CIFAR-10 binary batch (a label byte is {int(records[:, 0].max())}, "
                "above 9); replace it with a good copy"
            )
        labels.append(records[:, 0].to(torch.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    classes = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == len(classes):
            classes = names
    return Dataset(torch.cat(images), f"CIFAR-10 train ({folder})", torch.cat(labels), classes)


def _download_cifar10(root: Path) -> None:
    """Fetch the official archive, check its MD5, and unpack only its regular ``.bin`` / ``.txt`` members."""
    import tarfile

    from torchvision.datasets.utils import check_integrity, download_url

    archive = root / "cifar-10-binary.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    if not check_integrity(str(archive), CIFAR10_MD5):
        download_url(CIFAR10_URL, str(root), archive.name, md5=CIFAR10_MD5)
    if not check_integrity(str(archive), CIFAR10_MD5):
        raise DataError(f"{archive}: its MD5 is not CIFAR-10's ({CIFAR10_MD5}); delete it to download again")
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 2 and parts[0] == CIFAR10_DIR and parts[1].endswith((".bin", ".txt")):
                target = root / CIFAR10_DIR / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src:  # type: ignore[union-attr]
                    target.write_bytes(src.read())


# --- images decoded one by one: image folders and hf datasets ------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One image to decode: a file, or the encoded bytes of an hf dataset's row."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self):
        import io

        return open_image(self.path if self.path is not None else io.BytesIO(self.data or b""), name=self.name)


def _sources(section: DataSection) -> list[_Source]:
    if section.dataset == "hf":
        return _hf_sources(_hf_dataset(section), section)
    root = resolve_root(section)
    return [_Source(str(p), path=p) for p in _folder_files(root)]


def _decoded(section: DataSection, size: int, channels: int) -> Dataset:
    from PIL import Image

    if section.dataset == "hf":
        hf = _hf_dataset(section)
        sources = _hf_sources(hf, section)
        labels, classes = _hf_labels(hf, section)
        described = f"hf dataset {section.path} (split {section.split}, {len(sources):,} images"
    else:
        root = resolve_root(section)
        files = _folder_files(root)
        sources = [_Source(str(p), path=p) for p in files]
        labels, classes = _folder_labels(root, files)
        described = f"image folder {root} ({len(files):,} images"
    described += f" in {len(classes)} classes)" if labels is not None else ")"
    if section.limit is not None:  # only the images used are decoded
        sources, labels = sources[: section.limit], labels[: section.limit] if labels is not None else None
    check_fits(
        len(sources) * channels * size**2 * 2,
        f"data.image_size = {size}",
        "choose a smaller data.image_size (or data.limit)",
    )
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty((len(sources), channels, size, size), dtype=torch.uint8)
    for i, src in enumerate(sources):
        with src.open() as im:
            im = im.convert(mode)
            w, h = im.size
            if (w, h) != (size, size):
                if section.crop == "center":  # the shorter side to `size`, then the centre square
                    scale = size / min(w, h)
                    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                    w, h = im.size
                    left, top = (w - size) // 2, (h - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                else:
                    im = im.resize((size, size), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        out[i] = data.view(size, size, channels).permute(2, 0, 1)
    return Dataset(out, described, labels, classes if labels is not None else [])


@contextmanager
def open_image(path: Path | BinaryIO, name: str | None = None) -> Iterator[PIL.Image.Image]:
    """``PIL.Image.open(path)`` (a file, or a binary stream called ``name``), with a file that is not an
    image, or that claims more pixels than Pillow allows (a decompression bomb), turned into one DataError."""
    from PIL import Image

    called = name if name is not None else path  # what the messages call it
    try:
        with Image.open(path) as im:
            yield im
    except OSError as exc:  # PIL.UnidentifiedImageError is one
        raise DataError(f"{called}: not an image ({exc})") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"{called}: refused: its header claims more pixels than Pillow allows "
            f"({Image.MAX_IMAGE_PIXELS:,}; a decompression bomb?)"
        ) from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    """The sub-folders of ``root`` that hold images (at any depth), sorted by name: torchvision's ImageFolder
    classes."""
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and any(_is_image(p) for p in d.rglob("*"))), key=lambda d: d.name
    )


def _folder_files(root: Path) -> list[Path]:
    """The images under ``root``, sorted; a DataError for a missing folder or one without images."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _folder_labels(root: Path, files: list[Path]) -> tuple[torch.Tensor | None, list[str]]:
    """Labelled when every image lies in a sub-folder (one per class, ImageFolder's convention)."""
    classes = [d.name for d in _class_folders(root)]
    index = {name: i for i, name in enumerate(classes)}
    in_class = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    if None in in_class:
        return None, []
    return torch.tensor([index[c] for c in in_class], dtype=torch.int64), classes


# --- HuggingFace datasets ---------------------------------------------------------------------------

_HF_OPENED: dict[tuple, object] = {}  # the last hf dataset opened: settling its shape and loading it open it once


def _hf_dataset(section: DataSection):
    """The ``datasets.Dataset`` of ``section.path`` / ``section.split`` (offline for local folders); the same
    object again while the folder's entries are unchanged."""
    path = Path(str(section.path)).expanduser()
    try:
        state = (
            tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in path.iterdir()))
            if path.is_dir()
            else None
        )
    except OSError:
        state = None
    key = (str(section.path), section.split, section.image_column, section.label_column, section.download, state)
    if key not in _HF_OPENED:
        ds = _open_hf(section)
        _HF_OPENED.clear()
        _HF_OPENED[key] = ds
    return _HF_OPENED[key]


def _open_hf(section: DataSection):
    try:
        import datasets
    except ImportError:
        from ddpmkit.errors import MissingExtra

        raise MissingExtra("data.dataset = \"hf\" needs the datasets package: pip install 'ddpmkit[hf]'") from None
    path = Path(str(section.path)).expanduser()
    where = f"hf dataset {section.path}"
    try:
        if path.is_dir() and any(
            (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(str(path))  # a save_to_disk folder
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=section.split)
        elif path.exists() or str(section.path).startswith((".", "/", "~")):
            raise DataError(f"{where}: {path} is not a folder (a save_to_disk folder or a folder of images)")
        else:
            config = datasets.DownloadConfig(local_files_only=not section.download)
            ds = datasets.load_dataset(str(section.path), split=section.split, download_config=config)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        hint = "" if section.download else " (data.download is false: only a cached copy is used)"
        raise (DataError if path.is_dir() else DataNotFound)(
            f"{where}: could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}){hint}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if section.split not in ds:
            raise DataError(f"{where}: no split {section.split!r}; it has {', '.join(ds)} (set data.split)")
        ds = ds[section.split]
    if section.image_column not in ds.column_names:
        raise DataError(
            f"{where}: no column {section.image_column!r}; its columns are {', '.join(ds.column_names)} "
            "(set data.image_column)"
        )
    if section.label_column is not None and section.label_column not in ds.column_names:
        raise DataError(
            f"{where}: no column {section.label_column!r}; its columns are {', '.join(ds.column_names)} "
            "(set data.label_column)"
        )
    if len(ds) == 0:
        raise DataError(f"{where}: split {section.split!r} holds no rows")
    return ds


def _hf_sources(ds, section: DataSection) -> list[_Source]:
    """Each row's encoded image (decoded later, one at a time, through :func:`open_image`)."""
    import datasets

    column = ds.cast_column(section.image_column, datasets.Image(decode=False))[section.image_column]
    out = []
    for i, cell in enumerate(column):
        name = f"hf dataset {section.path} row {i}"
        if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
            raise DataError(f"{name}: column {section.image_column!r} holds no image")
        if cell.get("bytes"):
            out.append(_Source(name, data=cell["bytes"]))
        else:
            out.append(_Source(name, path=Path(cell["path"])))
    return out


def _hf_labels(ds, section: DataSection) -> tuple[torch.Tensor | None, list[str]]:
    """The class labels and names: a ClassLabel column's, or the sorted distinct values of another."""
    import datasets

    column = section.label_column or ("label" if "label" in ds.column_names else None)
    if column is None:
        return None, []
    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, datasets.ClassLabel):
        return torch.tensor(values, dtype=torch.int64), list(feature.names)
    if any(v is None or isinstance(v, (list, dict, float)) for v in values):
        raise DataError(f"hf dataset {section.path}: column {column!r} is not class labels (ints or strings)")
    names = sorted({str(v) for v in values}, key=lambda v: (len(v), v) if v.isdigit() else (0, v))
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[str(v)] for v in values], dtype=torch.int64), names


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
