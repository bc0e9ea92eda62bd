"""Sample-quality statistics on uint8 image sets [N, 1, H, W], in the classifier's feature space.

FID, KID and MiFID come from torchmetrics with the classifier as its feature network; the rest
(confidence, class histogram, k-NN precision/recall, nearest-neighbour memorisation) is small
enough to state directly.
"""

from __future__ import annotations

import torch

from ddpmkit.evaluation.classifier import Classifier, FeatureNetwork, to_classifier_input

CONFIDENT = 0.9


@torch.no_grad()
def features(classifier: Classifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier.features(x) for x in images.split(batch)]).double()


def distribution_distances(classifier: Classifier, fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """torchmetrics' FID, KID (mean over subsets) and MiFID between ``fake`` and ``real`` in the classifier's
    features."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.image.mifid import MemorizationInformedFrechetInceptionDistance

    net = FeatureNetwork(classifier).eval()
    n = min(len(fake), len(real))
    torch.manual_seed(0)  # KID draws its subsets from the global generator
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metrics = {
            "fid": FrechetInceptionDistance(feature=net, reset_real_features=True),
            "kid": KernelInceptionDistance(feature=net, subsets=20, subset_size=min(1000, n)),
            "mifid": MemorizationInformedFrechetInceptionDistance(feature=net),
        }
        for name, metric in metrics.items():
            for x in real.split(1000):
                metric.update(x, real=True)
            for x in fake.split(1000):
                metric.update(x, real=False)
            value = metric.compute()
            out[name] = float(value[0] if isinstance(value, tuple) else value)
    return out


def frechet_distance(classifier: Classifier, fake: torch.Tensor, real: torch.Tensor) -> float:
    """torchmetrics' FID alone between ``fake`` and ``real`` in the classifier's features (for small per-class sets)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=FeatureNetwork(classifier).eval(), reset_real_features=True)
    for images, is_real in ((real, True), (fake, False)):
        for x in images.split(1000):
            metric.update(x, real=is_real)
    return float(metric.compute())


@torch.no_grad()
def predicted_classes(classifier: Classifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's class for each image."""
    classifier.eval()
    return torch.cat([classifier(x).argmax(1) for x in images.split(1000)])


@torch.no_grad()
def confidence(classifier: Classifier, images: torch.Tensor) -> dict:
    """Mean top-class probability, the share above 0.9, and the predicted-class histogram with its entropy (bits)."""
    classifier.eval()
    probs = torch.cat([classifier(x).softmax(1) for x in images.split(1000)])
    top, cls = probs.max(1)
    k = classifier.num_classes
    hist = torch.bincount(cls, minlength=k).double()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    return {
        "mean_confidence": float(top.mean()),
        "confident_share": float((top > CONFIDENT).double().mean()),
        "class_histogram": [int(v) for v in hist],
        "class_entropy_bits": entropy,
        "classes_present": int((torch.bincount(cls[top > CONFIDENT], minlength=k) > 0).sum()),
        "num_classes": k,
    }


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for chunk in x.split(1000):
        d = torch.cdist(chunk, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, whether it lies inside any ball (centre, radius)."""
    inside = []
    for chunk in points.split(1000):
        inside.append((torch.cdist(chunk, centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Kynkäänniemi et al. (2019): precision = share of samples inside the real manifold (the union of balls
    reaching each real point's k-th neighbour); recall = share of real points inside the samples' manifold."""
    real_radii, fake_radii = _kth_neighbour_radius(real_features, k), _kth_neighbour_radius(fake_features, k)
    return {
        "precision": float(_covered(fake_features, real_features, real_radii).double().mean()),
        "recall": float(_covered(real_features, fake_features, fake_radii).double().mean()),
        "k": k,
    }


def pixel_vectors(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> [N, C * S * S]: the classifier's view in [0, 1] (28x28 for MNIST) that
    memorisation distances are measured in."""
    return to_classifier_input(images, images.shape[1]).flatten(1)


def nearest_distances(queries: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the L2 distance (28x28 pixels in [0, 1]) to its nearest row of ``pool`` (from
    :func:`pixel_vectors`), and that row's index."""
    best, where = [], []
    for chunk in pixel_vectors(queries).split(500):
        value, index = torch.cdist(chunk, pool).min(dim=1)
        best.append(value)
        where.append(index)
    return torch.cat(best), torch.cat(where)


def memorisation(sample_distances: torch.Tensor, test_distances: torch.Tensor) -> dict[str, float]:
    """How close samples sit to their nearest training image, against how close real test images sit to theirs."""
    threshold = float(torch.quantile(test_distances, 0.01))
    return {
        "sample_median_nn_distance": float(sample_distances.median()),
        "test_median_nn_distance": float(test_distances.median()),
        "share_closer_than_test_p1": float((sample_distances < threshold).double().mean()),
        "test_p1_distance": threshold,
    }
