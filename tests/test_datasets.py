"""FashionMNIST, CIFAR-10, HuggingFace datasets and image folders, read from files the tests build in each
real format (IDX, CIFAR-10's binary records, a save_to_disk folder, datasets' imagefolder), offline."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runconfigs import invoke, write_config

from ddpmkit.errors import DataError, DataNotFound
from ddpmkit.run.config import DataSection
from ddpmkit.run.data import CIFAR10_DIR, CIFAR10_RECORD, dataset_classes, load_dataset, settle_section

datasets = pytest.importorskip("datasets")


def write_idx(raw: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX files (train and t10k, as torchvision checks for both): a big-endian header, then the bytes."""
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        n = len(images)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())


def fashion_root(tmp_path: Path, n: int = 12) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(tmp_path / "FashionMNIST" / "raw", images, labels)
    return tmp_path, images, labels


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``n`` CIFAR-10 records: a label byte, then the red, green and blue planes of a 32x32 image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    return records.tobytes(), images, labels


def cifar_root(tmp_path: Path, per_batch: int = 3) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = tmp_path / CIFAR10_DIR
    folder.mkdir(parents=True)
    images, labels = [], []
    for i in range(1, 6):
        raw, x, y = cifar_records(per_batch, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        images.append(x)
        labels.append(y)
    (folder / "test_batch.bin").write_bytes(cifar_records(2, seed=9)[0])
    (folder / "batches.meta.txt").write_text(
        "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]) + "\n\n"
    )
    return tmp_path, np.concatenate(images), np.concatenate(labels)


def test_fashion_mnist_reads_its_idx_files_with_labels_and_pads_to_32(tmp_path):
    root, images, labels = fashion_root(tmp_path)
    section = DataSection(dataset="fashion-mnist", root=str(root), download=False)
    ds = load_dataset(section, labelled=True)
    assert ds.images.shape == (12, 1, 32, 32)  # auto: 28 zero-padded to 32, as MNIST
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert int(ds.images[:, :, :2].max()) == 0
    assert ds.labels.tolist() == labels.tolist() and ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    assert dataset_classes(section) == ds.classes
    rgb = load_dataset(section.model_copy(update={"channels": 3, "image_size": 28}))
    assert rgb.images.shape == (12, 3, 28, 28) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_fashion_mnist_missing_or_damaged_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFound, match="FashionMNIST not found.*data.download is false"):
        load_dataset(DataSection(dataset="fashion-mnist", root=str(tmp_path), download=False))
    root, _, _ = fashion_root(tmp_path)
    path = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(DataError, match="FashionMNIST files are there but damaged"):
        load_dataset(DataSection(dataset="fashion-mnist", root=str(root), download=False))


def test_cifar10_reads_the_binary_records_plane_by_plane(tmp_path):
    root, images, labels = cifar_root(tmp_path)
    section = DataSection(dataset="cifar10", root=str(root), download=False)
    ds = load_dataset(section, labelled=True)
    assert ds.images.shape == (15, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images, torch.from_numpy(images))  # channel 0 is the first 1024 bytes after the label
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes == dataset_classes(section) and ds.classes[9] == "truck"
    gray = load_dataset(section.model_copy(update={"channels": 1, "image_size": 16}))
    assert gray.images.shape == (15, 1, 16, 16)
    luma = (torch.from_numpy(images).float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert abs(gray.images.float().mean() - luma.mean()) < 1.0  # Pillow's "L" weights, then resized


def test_cifar10_damaged_or_missing_batches_are_refused(tmp_path):
    with pytest.raises(DataNotFound, match="CIFAR-10 not found"):
        load_dataset(DataSection(dataset="cifar10", root=str(tmp_path), download=False))
    root, _, _ = cifar_root(tmp_path)
    batch = root / CIFAR10_DIR / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_2.bin: not a CIFAR-10 binary batch.*whole number"):
        load_dataset(DataSection(dataset="cifar10", root=str(root), download=False))
    raw = bytearray(cifar_records(2, seed=1)[0])
    raw[CIFAR10_RECORD] = 11  # the second record's label
    batch.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="a label byte is 11"):
        load_dataset(DataSection(dataset="cifar10", root=str(root), download=False))


def test_cifar10_download_checks_the_archive_and_unpacks_only_its_batches(tmp_path, monkeypatch):
    """The archive is checksummed; members outside cifar-10-batches-bin, links and other files stay packed."""
    from torchvision.datasets import utils

    import ddpmkit.run.data as data

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, payload: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = (len(payload) if kind == tarfile.REGTYPE else 0), kind, link
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)

        for i in range(1, 6):
            add(f"{CIFAR10_DIR}/data_batch_{i}.bin", cifar_records(2, seed=i)[0])
        add(f"{CIFAR10_DIR}/../escaped.bin", b"x")
        add(f"{CIFAR10_DIR}/run.py", b"print('hi')")
        add(f"{CIFAR10_DIR}/linked.bin", b"", tarfile.SYMTYPE, "/etc/passwd")
    archive = buf.getvalue()

    def fake_download(url, root, filename, md5=None):
        assert url == data.CIFAR10_URL
        Path(root, filename).write_bytes(archive)

    monkeypatch.setattr(utils, "download_url", fake_download)
    with pytest.raises(DataError, match="its MD5 is not CIFAR-10's"):
        load_dataset(DataSection(dataset="cifar10", root=str(tmp_path / "a"), download=True))
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    ds = load_dataset(DataSection(dataset="cifar10", root=str(tmp_path / "b"), download=True))
    assert len(ds) == 10
    assert sorted(p.name for p in (tmp_path / "b" / CIFAR10_DIR).iterdir()) == [
        f"data_batch_{i}.bin" for i in range(1, 6)
    ]
    assert not (tmp_path / "b" / "escaped.bin").exists()


def hf_saved(tmp_path: Path, n: int = 6, size: int = 12) -> Path:
    images = [Image.fromarray(np.full((size, size, 3), (40 * i, 0, 255 - 40 * i), np.uint8)) for i in range(n)]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["warm", "cold"])})
    ds = datasets.Dataset.from_dict({"img": images, "kind": [i % 2 for i in range(n)]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_hf_save_to_disk_folder_with_a_class_label_column(tmp_path):
    saved = hf_saved(tmp_path)
    section = DataSection(dataset="hf", path=str(saved), image_column="img", label_column="kind")
    settled = settle_section(section)
    assert (settled.channels, settled.image_size) == (3, 12)  # read from the images
    ds = load_dataset(section, labelled=True)
    assert ds.images.shape == (6, 3, 12, 12) and ds.classes == ["warm", "cold"] == dataset_classes(section)
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.images[2, :, 0, 0].tolist() == [80, 0, 175]
    with pytest.raises(DataError, match="no column 'image'.*set data.image_column"):
        load_dataset(DataSection(dataset="hf", path=str(saved)))
    with pytest.raises(DataError, match="no column 'label'"):
        load_dataset(DataSection(dataset="hf", path=str(saved), image_column="img", label_column="label"))
    with pytest.raises(DataError, match="needs class labels"):  # no label column named, none called "label"
        load_dataset(DataSection(dataset="hf", path=str(saved), image_column="img"), labelled=True)


def test_an_hf_dataset_is_opened_once_for_its_shape_labels_and_images_and_again_when_it_changes(tmp_path, monkeypatch):
    saved = hf_saved(tmp_path)
    opened = []
    real = datasets.load_from_disk
    monkeypatch.setattr(datasets, "load_from_disk", lambda *a, **k: opened.append(a) or real(*a, **k))
    section = DataSection(dataset="hf", path=str(saved), image_column="img", label_column="kind")
    load_dataset(settle_section(section), labelled=True)
    assert dataset_classes(section) == ["warm", "cold"] and len(opened) == 1
    hf_saved(tmp_path, n=4)  # saved anew in the same folder: its files change
    assert load_dataset(section).images.shape[0] == 4 and len(opened) == 2


def test_hf_imagefolder_is_labelled_by_sub_folders_and_a_missing_path_is_one_line(tmp_path):
    for c, value in (("ants", 30), ("bees", 220)):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 10), value, np.uint8)).save(tmp_path / "photos" / c / f"{i}.png")
    section = DataSection(dataset="hf", path=str(tmp_path / "photos"))
    ds = load_dataset(section, labelled=True)
    assert ds.images.shape == (4, 1, 10, 10) and ds.classes == ["ants", "bees"]
    assert sorted(zip(ds.labels.tolist(), ds.images[:, 0, 0, 0].tolist())) == [(0, 30), (0, 30), (1, 220), (1, 220)]
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(DataSection(dataset="hf", path=str(tmp_path / "nope")))


def test_image_folder_infers_channels_and_size_and_refuses_what_it_cannot(tmp_path):
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28, 3), (200, 10 * i, 0), np.uint8)).save(rgb / f"{i}.png")
    ds = load_dataset(DataSection(dataset="image-folder", root=str(rgb)))
    assert ds.images.shape == (3, 3, 28, 28)  # colour and 28 px kept: nothing silently grey or resized
    assert ds.images[:, 0].float().mean() == 200
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(rgb / "small.png")
    with pytest.raises(DataError, match=r"differ in size \(28x28 .*20x20 .*small.png.*set data.image_size"):
        load_dataset(DataSection(dataset="image-folder", root=str(rgb)))
    assert load_dataset(DataSection(dataset="image-folder", root=str(rgb), image_size=8)).images.shape == (4, 3, 8, 8)
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.zeros((10, 30), np.uint8)).save(wide / "a.png")
    with pytest.raises(DataError, match="10 not square|30x10, not square"):
        load_dataset(DataSection(dataset="image-folder", root=str(wide)))
    stretched = load_dataset(DataSection(dataset="image-folder", root=str(wide), image_size=10, crop="none"))
    assert stretched.images.shape == (1, 1, 10, 10)


def test_validate_refuses_an_empty_or_missing_image_folder(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "empty").mkdir()
    for root, said in ((tmp_path / "empty", "holds no images"), (tmp_path / "missing", "does not exist")):
        result = invoke(
            "validate",
            str(config),
            "--no-timing",
            "--set",
            "data.dataset=image-folder",
            "--set",
            f"data.root={root}",
            "--set",
            "data.image_size=auto",
        )
        assert result.exit_code == 2 and said in result.stderr, result.output
        result = invoke(
            "validate", str(config), "--no-timing", "--set", "data.dataset=image-folder", "--set", f"data.root={root}"
        )  # image_size given: the data check itself refuses
        assert result.exit_code == 2 and said in result.stderr, result.output


def test_describe_names_a_dataset_and_its_options():
    result = invoke("describe", "image-folder")
    assert result.exit_code == 0, result.output
    assert "dataset image-folder" in result.stdout and "crop" in result.stdout and "num_samples" not in result.stdout
    result = invoke("describe", "hf", "--json")
    assert result.exit_code == 0 and "image_column" in json.loads(result.stdout)["properties"]


def test_hflip_flips_half_the_batch_from_its_own_seeded_stream():
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.training.loop import _Trainer

    trainer = _Trainer.__new__(_Trainer)
    trainer.cfg, trainer.step = config_from_dict({"data": {"hflip": True}, "run": {"seed": 5}}), 7
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(400, 1, 1, 4)
    once, again = trainer.batch_flips(x, 400, slice(0, 400)), trainer.batch_flips(x, 400, slice(0, 400))
    assert torch.equal(once, again)
    flipped = once[:, 0, 0, 0] == 3
    assert torch.equal(once[flipped], x[flipped].flip(-1)) and torch.equal(once[~flipped], x[~flipped])
    assert 160 < int(flipped.sum()) < 240  # Binomial(400, 1/2): 200 +- 4 sd
    assert torch.equal(trainer.batch_flips(x[:200], 400, slice(200, 400)), once[200:])  # a rank's slice
    trainer.step = 8
    assert not torch.equal(trainer.batch_flips(x, 400, slice(0, 400)), once)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "hf"])
def test_a_tiny_run_trains_and_samples_on_each_dataset(tmp_path, dataset, one_thread):
    if dataset == "fashion-mnist":
        root = fashion_root(tmp_path, n=16)[0]
        sets = [f"data.root={root}", "data.download=false"]
    elif dataset == "cifar10":
        root = cifar_root(tmp_path)[0]
        sets = [f"data.root={root}", "data.download=false", "data.hflip=true", "conditioning.kind=class"]
    else:
        sets = [
            f"data.path={hf_saved(tmp_path, n=8, size=8)}",
            "data.image_column=img",
            "data.label_column=kind",
            "conditioning.kind=class",
        ]
    config = write_config(tmp_path, name=dataset, epochs=1, num_images=2)
    args = ["--set", f"data.dataset={dataset}", "--set", "data.image_size=8"]
    for s in sets:
        args += ["--set", s]
    result = invoke("run", str(config), *args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / dataset
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["dataset"] == dataset and saved["image_size"] == 8
    channels = 3 if dataset != "fashion-mnist" else 1
    assert saved["channels"] == channels
    with np.load(run / "samples.npz") as npz:
        assert npz["images"].shape == (2, 8, 8, channels)


def _legacy_pickles(root: Path) -> Path:
    """torchvision's legacy processed/training.pt and test.pt, here pickles of something no weights-only load takes."""
    processed = root / "FashionMNIST" / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    for name in ("training.pt", "test.pt"):
        (processed / name).write_bytes(
            b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06getcwd\x94\x93\x94)R\x94."
        )
    return processed


def test_legacy_pickles_beside_good_raw_files_are_ignored(tmp_path):
    """Issue 42: torchvision prefers processed/training.pt to the raw files beside it, and the run ended in a
    torch.load traceback advising weights_only=False. The raw IDX files are read; the pickles never."""
    root, images, labels = fashion_root(tmp_path)
    _legacy_pickles(root)
    ds = load_dataset(DataSection(dataset="fashion-mnist", root=str(root), image_size=28), labelled=True)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch says so as it refuses the pickle
def test_legacy_pickles_alone_are_one_line_naming_them(tmp_path):
    processed = _legacy_pickles(tmp_path)
    with pytest.raises(DataError, match="torchvision's legacy pickle, which ddpmkit does not load") as caught:
        load_dataset(DataSection(dataset="fashion-mnist", root=str(tmp_path), download=False))
    assert str(processed / "training.pt") in str(caught.value)
