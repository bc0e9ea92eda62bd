"""`ddpmkit eval`: every statistic for a set of samples, beside the same statistic for real images (the floor)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpmkit.errors import ConfigError, DataError
from ddpmkit.evaluation.classifier import ClassifierSpec, LabelledData, load_or_train, mnist_data
from ddpmkit.evaluation.metrics import (
    confidence,
    distribution_distances,
    features,
    frechet_distance,
    memorisation,
    nearest_distances,
    pixel_vectors,
    precision_recall,
    predicted_classes,
)

PAIRS_SHOWN = 16


def read_images(path: Path) -> torch.Tensor:
    """uint8 [N, C, H, W] from an ``.npz`` or an image folder.

    An ``.npz`` holds its images under ``images`` (as ``ddpmkit sample`` writes) or ``arr_0`` (guided-diffusion's
    and EDM's samplers), NHWC, NCHW or NHW, as uint8 or as floats in [0, 1] or [-1, 1]."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path) as data:
                key = next((k for k in ("images", "arr_0") if k in data.files), None)
                if key is None:
                    raise DataError(
                        f"{path}: not a samples .npz: no 'images' or 'arr_0' array (it has "
                        f"{', '.join(data.files) or 'none'})"
                    )
                array = data[key]
        except (OSError, ValueError, EOFError) as exc:
            why = "not a zip archive of arrays" if "pickled" in str(exc) else f"{type(exc).__name__}: {exc}"
            raise DataError(f"{path}: not a samples .npz ({why}; pickles are never loaded)") from None
        return images_from_array(array, str(path))
    if path.is_dir():
        from ddpmkit.run.config import DataSection
        from ddpmkit.run.data import load_dataset

        return load_dataset(DataSection(dataset="image-folder", root=str(path))).images
    raise DataError(f"{path}: expected a .npz file or a folder of images")


def images_from_array(array: np.ndarray, where: str) -> torch.Tensor:
    """uint8 [N, C, H, W] from an array in any of the layouts and scales samplers write (see :func:`read_images`)."""
    if array.ndim == 3:
        array = array[:, :, :, None]  # NHW: grayscale
    if array.ndim != 4 or array.shape[0] == 0:
        raise DataError(f"{where}: expected images [N, H, W, C], [N, C, H, W] or [N, H, W], got shape {array.shape}")
    if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # NHWC
    elif not (array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3)):
        if not (array.shape[1] in (1, 3) and array.shape[-1] in (1, 3)):
            raise DataError(f"{where}: shape {array.shape} has no channel axis of 1 or 3 (second or last)")
        array = array.transpose(0, 3, 1, 2)  # both could be channels (1- or 3-pixel images): NHWC, ddpmkit's own
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or floats in [0, 1] or [-1, 1], got {array.dtype}")
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if not np.isfinite(array).all() or lo < -1.0001 or hi > 1.0001:
        raise DataError(f"{where}: float images must lie in [0, 1] or [-1, 1], these span [{lo:.3g}, {hi:.3g}]")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    x = (x + 1) / 2 if lo < 0 else x  # [-1, 1] -> [0, 1]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


#: FID below this many samples is dominated by its bias (Chong & Forsyth 2020): a number, but not a measurement.
MIN_MEANINGFUL_FID_SAMPLES = 1000


def check_feature_network(shape: tuple[int, ...], what: str = "these samples") -> None:
    """Samples whose training data is not known (a file, a folder, a pretrained model) are measured with the
    MNIST classifier: a DataError for colour ones, in one line, before anything is sampled or trained."""
    if len(shape) != 3 or shape[0] != 1:
        raise DataError(
            f"{what} are {'x'.join(map(str, shape))} (C x H x W) and their training data is not known: "
            "eval then measures with an MNIST digit classifier, which reads grayscale images; eval the "
            "run itself (ddpmkit eval RUN) to measure with a classifier trained on its own data"
        )


def evaluation_data(loaded: Any, *, data_root: Path | None, mnist_root: Path) -> tuple[LabelledData, str | None]:
    """The labelled data a loaded run is measured against, loaded before anything is sampled: its own
    (``data_root`` overriding its ``data.root``), MNIST's under ``mnist_root`` for an MNIST run or a pretrained
    model (whose data is not known: with a caveat to show)."""
    from ddpmkit.evaluation.classifier import run_data

    if loaded.checkpoint is None:  # a diffusers folder: nothing says what it learned
        what = f"samples of {loaded.source}"
        check_feature_network(loaded.config.image_shape, what)
        return mnist_data(mnist_root), (
            f"{what} are measured with an MNIST digit classifier's features (its "
            "training data is not known): the figures mean something only for digits"
        )
    section = loaded.config.data
    if section.dataset == "mnist":
        return mnist_data(mnist_root), None
    return run_data(section.model_copy(update={"root": str(data_root)}) if data_root else section), None


def small_sample_warning(num: int) -> str | None:
    if num < MIN_MEANINGFUL_FID_SAMPLES:
        return (
            f"{num:,} samples: FID and KID this small are dominated by their bias and noise; compare "
            f"figures only at the same N, and use {MIN_MEANINGFUL_FID_SAMPLES:,} or more to report one"
        )
    return None


def read_labels(path: Path, classes: list[str] | None = None) -> torch.Tensor | None:
    """The ``labels`` of a samples ``.npz`` (the class each image was drawn as), or None when it has none.

    Class accuracy is measured with the classifier of ``classes`` (default: MNIST's digits), so an ``.npz``
    whose ``classes`` are other names is refused."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return None
    with np.load(path) as data:
        if "labels" not in data:
            return None
        labels, named = data["labels"], list(data["classes"]) if "classes" in data else []
    expected = classes if classes is not None else [str(d) for d in range(10)]
    if named and [str(c) for c in named] != [str(c) for c in expected]:
        raise DataError(
            f"{path}: its classes ({', '.join(map(str, named[:5]))}...) are not the classifier's "
            f"({', '.join(map(str, expected[:5]))}...); class accuracy needs the same classes"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(images):
        return images
    return images[_subset_index(len(images), n, seed)]


def _subset_index(total: int, n: int, seed: int) -> torch.Tensor:
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def _statistics(
    classifier, images: torch.Tensor, reference: torch.Tensor, reference_features: torch.Tensor
) -> dict[str, Any]:
    stats = distribution_distances(classifier, images, reference)
    stats.update(precision_recall(reference_features, features(classifier, images)))
    stats.update(confidence(classifier, images))
    return stats


class Evaluator:
    """Everything that stays fixed while several sample sets are scored: the classifier, its labelled data
    (MNIST's, or a run's own: :func:`ddpmkit.evaluation.classifier.run_data`),
    the reference subset and its features, the training images as pixel vectors, the test images' distances
    to them, and the floor (each computed once, on first use)."""

    def __init__(
        self,
        num: int,
        *,
        data_root: Path,
        reference: torch.Tensor | None = None,
        spec: ClassifierSpec = ClassifierSpec(),
        cache: Path | None = None,
        seed: int = 0,
        log: Callable[[str], None] = lambda m: None,
        data: LabelledData | None = None,
    ) -> None:
        if num < 10:
            raise ConfigError(f"{num} samples are too few to evaluate: use at least 10 (FID wants 1,000 or more)")
        self.num, self.seed, self.log = num, seed, log
        self.data = data if data is not None else mnist_data(data_root)
        self.classifier, self.record = load_or_train(spec, data=self.data, cache=cache, log=log)
        self.train_x, self.train_y = self.data.train_x, self.data.train_y
        self.test_x, self.test_y = self.data.test_x, self.data.test_y
        if reference is None:  # the test set's labels come along: the reference of each class
            index = _subset_index(len(self.test_x), num, seed)
            self.reference, self.reference_labels = self.test_x[index], self.test_y[index]
        else:
            self.reference, self.reference_labels = _subset(reference, num, seed), None
        self.reference_features = features(self.classifier, self.reference)
        self._floor: dict[str, Any] | None = None
        self._train_vectors: torch.Tensor | None = None
        self._test_distances: dict[int, torch.Tensor] = {}
        self._class_floors: dict[tuple[int, int], float] = {}

    @property
    def floor(self) -> dict[str, Any]:
        """The statistics of ``num`` real training images against the reference."""
        if self._floor is None:
            real = _subset(self.train_x, self.num, self.seed + 1)
            self._floor = _statistics(self.classifier, real, self.reference, self.reference_features)
        return self._floor

    def _nearest_training(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._train_vectors is None:
            self._train_vectors = pixel_vectors(self.train_x)
        return nearest_distances(images, self._train_vectors)

    def _test_nn_distances(self, n: int) -> torch.Tensor:
        """Distances of n test images (seeded) to their nearest training image: the yardstick of memorisation."""
        if n not in self._test_distances:
            self._test_distances[n] = self._nearest_training(_subset(self.test_x, n, self.seed + 2))[0]
        return self._test_distances[n]

    def score(self, samples: torch.Tensor, pairs_png: Path | None = None) -> dict[str, Any]:
        """The statistics of ``samples`` (uint8 [N, C, H, W]) and their memorisation summary."""
        if samples.ndim != 4 or samples.shape[1] != self.data.channels:
            raise DataError(
                f"the {self.data.name} classifier evaluates {self.data.channels}-channel images; got "
                f"{tuple(samples.shape[1:])} per image"
            )
        self.log(f"evaluating {len(samples):,} samples against {len(self.reference):,} reference images ...")
        stats = _statistics(self.classifier, samples, self.reference, self.reference_features)
        distance, index = self._nearest_training(samples)
        summary: dict[str, Any] = memorisation(distance, self._test_nn_distances(len(samples)))
        if pairs_png is not None:
            closest = distance.argsort()[:PAIRS_SHOWN]
            _write_pairs(samples[closest], self.train_x[index[closest]], pairs_png)
            summary["closest_pairs_png"] = str(pairs_png)
        return {"samples": stats, "memorisation": summary}

    def _class_floor(self, c: int, n: int) -> float:
        """FID of n real training images of class c against that class of the reference (once per (c, n): a
        sweep scores every point against the same floor)."""
        if (c, n) not in self._class_floors:
            real = _subset(self.train_x[self.train_y == c], n, self.seed + 3 + c)
            self._class_floors[(c, n)] = frechet_distance(
                self.classifier, real, self.reference[self.reference_labels == c]
            )
        return self._class_floors[(c, n)]

    def score_classes(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Conditional quality: class accuracy (the share of samples the classifier assigns to the class they
        were drawn as), and per class the classifier FID against that class of the reference beside its floor
        (as many real training images of the class against the same reference)."""
        if self.reference_labels is None:
            raise ConfigError("per-class figures need the data's own held-out images as the reference (no --reference)")
        if len(labels) != len(samples):
            raise DataError(f"{len(labels):,} labels for {len(samples):,} samples")
        predicted = predicted_classes(self.classifier, samples)
        per_class = []
        for c in sorted(set(labels.tolist())):
            mine, ref = samples[labels == c], self.reference[self.reference_labels == c]
            row: dict[str, Any] = {
                "class": c,
                "num": len(mine),
                "accuracy": float((predicted[labels == c] == c).double().mean()),
            }
            if len(mine) >= 10 and len(ref) >= 10:
                row["fid"] = frechet_distance(self.classifier, mine, ref)
                row["floor_fid"] = self._class_floor(c, len(mine))
            per_class.append(row)
        scored = [r for r in per_class if "fid" in r]
        return {
            "class_accuracy": float((predicted == labels).double().mean()),
            "classes_drawn": len(per_class),
            "mean_class_fid": sum(r["fid"] for r in scored) / len(scored) if scored else None,
            "mean_class_floor_fid": sum(r["floor_fid"] for r in scored) / len(scored) if scored else None,
            "per_class": per_class,
        }


def evaluate(
    samples: torch.Tensor,
    *,
    data_root: Path,
    reference: torch.Tensor | None = None,
    spec: ClassifierSpec = ClassifierSpec(),
    cache: Path | None = None,
    pairs_png: Path | None = None,
    inception_weights: Path | None = None,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    log: Callable[[str], None] = lambda m: None,
    data: LabelledData | None = None,
) -> dict[str, Any]:
    """Statistics of ``samples`` (uint8 [N, 1, H, W]) against ``reference`` (default: N images of the MNIST
    test set), and of N real training images against the same reference (the floor); with ``labels`` (the
    digit each sample was drawn as), the conditional figures of :meth:`Evaluator.score_classes` too."""
    ev = Evaluator(
        len(samples), data_root=data_root, reference=reference, spec=spec, cache=cache, seed=seed, log=log, data=data
    )
    scored = ev.score(samples, pairs_png)
    conditional = {"conditional": ev.score_classes(samples, labels)} if labels is not None else {}
    return {
        **conditional,
        "num_samples": len(samples),
        "num_reference": len(ev.reference),
        "classifier": {
            **{k: ev.record[k] for k in ("key", "test_accuracy", "cached", "path")},
            "data": ev.data.name,
            "classes": ev.data.classes,
        },
        "samples": scored["samples"],
        "floor": ev.floor,
        "memorisation": scored["memorisation"],
        "inception_fid": inception_fid(samples, ev.reference, inception_weights),
    }


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights: Path | None) -> dict[str, Any]:
    """FID with torchmetrics' Inception network when its weights are at hand; otherwise why not, in one line."""
    if weights is None:
        return {
            "status": "skipped",
            "reason": "no --inception-weights given (ddpmkit never downloads them at eval time)",
        }
    if not Path(weights).is_file():
        raise ConfigError(f"--inception-weights {weights}: no such file")
    try:  # torch-fidelity unpickles the file in full; only a plain state dict gets that far
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"--inception-weights {weights}: not a plain PyTorch state dict, refused unread ({type(exc).__name__})"
        ) from None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except (ImportError, ModuleNotFoundError, RuntimeError) as exc:
        return {
            "status": "skipped",
            "reason": f"Inception FID needs torch-fidelity: pip install 'ddpmkit[inception]' "
            f"({type(exc).__name__}: {exc})",
        }
    for images, real in ((reference, True), (samples, False)):
        for x in images.split(100):
            metric.update(x.expand(-1, 3, -1, -1).contiguous(), real=real)
    return {"status": "ok", "fid": float(metric.compute())}


def _write_pairs(samples: torch.Tensor, neighbours: torch.Tensor, path: Path) -> None:
    """A grid of (sample, its nearest training image) pairs, side by side, closest first."""
    from ddpmkit.evaluation.classifier import to_classifier_input
    from ddpmkit.sampling.images import grid, save_png

    a = (to_classifier_input(samples, samples.shape[1]) * 255).round().to(torch.uint8)
    b = (to_classifier_input(neighbours, neighbours.shape[1]) * 255).round().to(torch.uint8)
    pairs = torch.stack([a, b], dim=1).flatten(0, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(grid(pairs, nrow=8), Path(path))
