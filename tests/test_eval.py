"""`ddpmkit eval`: the classifier cache, and each statistic against a direct computation or a known ordering.

A small classifier (a few thousand training images, one epoch: seconds) stands in for the real one,
which ddpmkit trains once per machine (about 45 s here); the statistics do not depend on which.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runconfigs import cli_env, ddpmkit, invoke

from ddpmkit.evaluation.classifier import ClassifierSpec, load_or_train, mnist_tensors
from ddpmkit.evaluation.metrics import distribution_distances, features, precision_recall

SMALL = ClassifierSpec(width=8, features=32, epochs=1, train_limit=4000)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def small(mnist_root, cache):
    model, record = load_or_train(SMALL, data_root=mnist_root, cache=cache)
    return model


@pytest.fixture(scope="module")
def test_images(mnist_root):
    return mnist_tensors(mnist_root, train=False)[0]


def test_the_classifier_is_cached_and_rebuilt_when_its_definition_changes(mnist_root, tmp_path):
    first, record = load_or_train(SMALL, data_root=mnist_root, cache=tmp_path)
    assert record["cached"] is False and record["test_accuracy"] > 0.7
    again, record2 = load_or_train(SMALL, data_root=mnist_root, cache=tmp_path)
    assert record2["cached"] is True and record2["key"] == record["key"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other = ClassifierSpec(width=8, features=32, epochs=1, train_limit=4000, seed=1)
    assert other.key() != SMALL.key()
    _, record3 = load_or_train(other, data_root=mnist_root, cache=tmp_path)
    assert record3["cached"] is False
    # a damaged cache entry is rebuilt, not trusted
    (tmp_path / f"mnist-classifier-{SMALL.key()}.safetensors").write_bytes(b"garbage")
    _, record4 = load_or_train(SMALL, data_root=mnist_root, cache=tmp_path)
    assert record4["cached"] is False


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fid_and_kid_agree_with_a_direct_computation(small, test_images):
    fake, real = test_images[:300], test_images[300:600]
    got = distribution_distances(small, fake, real)
    f, r = features(small, fake).numpy(), features(small, real).numpy()
    mu_f, mu_r = f.mean(0), r.mean(0)
    cov_f, cov_r = np.cov(f, rowvar=False), np.cov(r, rowvar=False)
    # trace of sqrt(cov_f cov_r) through the symmetric form sqrt(cov_r)^T cov_f sqrt(cov_r): a different route
    s = _sqrtm_psd(cov_r)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(s @ cov_f @ s), 0, None)).sum()
    fid = ((mu_f - mu_r) ** 2).sum() + np.trace(cov_f) + np.trace(cov_r) - 2 * tr_sqrt
    assert got["fid"] == pytest.approx(fid, rel=1e-3)
    # KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3; subsets of the whole set give the whole-set value
    d = f.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(f)
    kxx, kyy, kxy = k(f, f), k(r, r), k(f, r)
    mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert got["kid"] == pytest.approx(mmd, rel=1e-3)


def test_precision_and_recall_agree_with_brute_force():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(30, 3, generator=g, dtype=torch.float64) * 1.5 + 0.5
    got = precision_recall(real, fake, k=3)

    def radius(points, i):
        d = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        return d[2]

    def share(points, centres):
        radii = [radius(centres, i) for i in range(len(centres))]
        return sum(any(float((p - c).norm()) <= r for c, r in zip(centres, radii)) for p in points) / len(points)

    assert got["precision"] == pytest.approx(share(fake, real))
    assert got["recall"] == pytest.approx(share(real, fake))


def test_real_images_sit_at_the_floor_and_damage_raises_fid_monotonically(small, mnist_root, test_images):
    train = mnist_tensors(mnist_root, train=True)[0]
    reference, other_real, floor_set = test_images[:500], test_images[500:1000], train[:500]
    floor = distribution_distances(small, floor_set, reference)["fid"]
    same = distribution_distances(small, other_real, reference)["fid"]
    assert same < 1.5 * floor + 0.5, (same, floor)
    g = torch.Generator().manual_seed(0)
    noisy, blurred = [], []
    for sigma in (0.0, 0.15, 0.3, 0.6):
        x = other_real.float() / 255 + sigma * torch.randn(other_real.shape, generator=g)
        noisy.append(distribution_distances(small, (x.clamp(0, 1) * 255).round().to(torch.uint8), reference)["fid"])
    for width in (1, 3, 5, 7):
        kernel = torch.ones(1, 1, width, width) / width**2
        x = F.conv2d(other_real.float(), kernel, padding=width // 2)
        blurred.append(distribution_distances(small, x.round().to(torch.uint8), reference)["fid"])
    assert noisy == sorted(noisy) and noisy[-1] > 3 * noisy[0], noisy
    assert blurred == sorted(blurred) and blurred[-1] > 3 * blurred[0], blurred


def test_eval_cli_on_a_samples_file(mnist_root, tmp_path, test_images, quick_classifier_cache, monkeypatch):
    """Through the CLI, as a user runs it: real test digits as 'samples' score like real data."""
    samples = tmp_path / "digits.npz"
    labels = mnist_tensors(mnist_root, train=False)[1][2000:2200]  # as a conditional run's .npz carries them
    np.savez_compressed(
        samples,
        images=test_images[2000:2200].permute(0, 2, 3, 1).numpy(),
        labels=labels.numpy(),
        classes=np.array([str(d) for d in range(10)]),
    )
    env = cli_env(DDPMKIT_CACHE_DIR=str(quick_classifier_cache))
    r = ddpmkit("eval", str(samples), "--data-root", str(mnist_root), "--json", env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # only JSON on stdout
    assert result["num_samples"] == 200 and result["classifier"]["cached"] is True
    conditional = result["conditional"]  # real digits drawn "as" their own labels
    assert conditional["class_accuracy"] > 0.7 and conditional["classes_drawn"] == 10  # the quick classifier: ~80 %
    assert {row["class"] for row in conditional["per_class"]} == set(range(10))
    s, f = result["samples"], result["floor"]
    assert s["fid"] < 2 * f["fid"] + 1 and s["confident_share"] > 0.5 and s["classes_present"] == 10
    assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    assert math.isclose(sum(s["class_histogram"]), 200)
    assert result["inception_fid"]["status"] == "skipped"
    assert (tmp_path / "digits-closest-pairs.png").exists()
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))  # the rest in-process
    table = invoke("eval", str(samples), "--data-root", str(mnist_root), "--num", "100")
    assert table.exit_code == 0 and "classifier FID" in table.output and "floor" in table.output, table.output
    bad = invoke("eval", str(tmp_path / "none.npz"), "--data-root", str(mnist_root))
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and "Traceback" not in bad.output


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A state dict for torch-fidelity's InceptionV3 with random weights: the real ones are a download away."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    placeholder = folder / "placeholder.pt"
    torch.save({}, placeholder)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None  # keep the random init
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(placeholder)
        )
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.manual_seed(0)
    for module in net.modules():  # He initialisation keeps the activations alive through 48 layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "weights.pt"
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_runs_offline_with_given_weights(
    mnist_root, tmp_path, test_images, quick_classifier_cache, random_inception_weights, monkeypatch
):
    """The Inception path end to end through torchmetrics: identical sets score 0, other digits more."""
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez_compressed(a, images=test_images[:12].permute(0, 2, 3, 1).numpy())  # Inception at 299x299 is slow
    np.savez_compressed(b, images=test_images[12:24].permute(0, 2, 3, 1).numpy())
    fids = {}
    for name, samples in (("same", a), ("other", b)):
        r = invoke(
            "eval",
            str(samples),
            "--reference",
            str(a),
            "--data-root",
            str(mnist_root),
            "--json",
            "--inception-weights",
            str(random_inception_weights),
        )  # in-process: the start-up is not the test
        assert r.exit_code == 0, r.output
        inc = json.loads(r.stdout[r.stdout.index("{") :])["inception_fid"]
        assert inc["status"] == "ok", inc
        fids[name] = inc["fid"]
    assert abs(fids["same"]) < 1e-2 and fids["other"] > 100 * max(abs(fids["same"]), 1e-4), fids


def test_inception_weights_that_are_not_a_state_dict_are_refused_unread(
    mnist_root, tmp_path, test_images, quick_classifier_cache
):
    import pickle

    samples = tmp_path / "a.npz"
    np.savez_compressed(samples, images=test_images[:20].permute(0, 2, 3, 1).numpy())
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps(_Payload(str(marker))))
    r = ddpmkit(
        "eval",
        str(samples),
        "--data-root",
        str(mnist_root),
        "--inception-weights",
        str(bad),
        env=cli_env(DDPMKIT_CACHE_DIR=str(quick_classifier_cache)),
    )
    assert r.returncode == 2 and "not a plain PyTorch state dict" in r.stderr and not marker.exists(), r.stderr


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_class_accuracy_and_per_class_fid_tell_right_labels_from_wrong(mnist_root, test_images, quick_classifier_cache):
    """Real test digits labelled truly score the classifier's accuracy and per-class FID near the floor;
    the same digits with their labels shifted by one score about nothing and far above it."""
    from ddpmkit.evaluation.report import Evaluator

    labels = mnist_tensors(mnist_root, train=False)[1]
    images, true = test_images[3000:4000], labels[3000:4000]
    ev = Evaluator(1000, data_root=mnist_root, cache=quick_classifier_cache, seed=0)
    right = ev.score_classes(images, true)
    wrong = ev.score_classes(images, (true + 1) % 10)
    assert right["class_accuracy"] > 0.85 and wrong["class_accuracy"] < 0.05
    assert right["mean_class_fid"] < 2 * right["mean_class_floor_fid"] + 1
    assert wrong["mean_class_fid"] > 3 * right["mean_class_fid"]
