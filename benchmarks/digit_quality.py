"""How recognizable are generated MNIST digits? A small classifier's verdict on a samples.npz.

    python benchmarks/digit_quality.py runs/mnist-cpu/samples.npz [--data-root ../shared/data]

Trains a small CNN on MNIST's training set (about a minute on 2 CPU cores), checks it on the test
set, then reports for the samples: the share classified with confidence >= 0.9 ("clearly a
digit"), the mean confidence, and how the confident ones spread over the ten classes. A proxy,
not FID: it says whether samples look like *some* digit to a classifier, not whether they are diverse
in every way the data is.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def to_28(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> float [N, 1, 28, 28] in [0, 1] (centre crop of padded 32x32)."""
    h = images.shape[-1]
    if h > 28:
        p = (h - 28) // 2
        images = images[..., p : p + 28, p : p + 28]
    elif h < 28:
        images = F.interpolate(images.float(), size=(28, 28), mode="bilinear")
    return images.float() / 255.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("samples", help="a samples.npz (uint8 NHWC under 'images')")
    ap.add_argument("--data-root", default=os.environ.get("DDPMKIT_DATA_ROOT", "data"))
    ap.add_argument("--epochs", type=int, default=1)
    a = ap.parse_args()
    from torchvision.datasets import MNIST

    torch.manual_seed(0)
    train = MNIST(a.data_root, train=True, download=False)
    test = MNIST(a.data_root, train=False, download=False)
    x, y = to_28(train.data.unsqueeze(1)), train.targets
    model = classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(a.epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(to_28(test.data.unsqueeze(1))).argmax(1) == test.targets).float().mean().item()
        samples = torch.from_numpy(np.load(a.samples)["images"]).permute(0, 3, 1, 2)[:, :1]
        probs = model(to_28(samples)).softmax(1)
    conf, label = probs.max(1)
    confident = conf >= 0.9
    counts = torch.bincount(label[confident], minlength=10).tolist()
    with torch.no_grad():
        real_conf = model(to_28(test.data[:1000].unsqueeze(1))).softmax(1).max(1).values
    print(f"classifier: test accuracy {acc:.4f} (trained in {time.perf_counter() - start:.0f} s); "
          f"real test digits with confidence >= 0.9: {(real_conf >= 0.9).float().mean().item():.1%}")
    print(f"samples: {len(samples)}; confidence >= 0.9: {confident.float().mean().item():.1%}; "
          f"mean confidence {conf.mean().item():.3f}")
    print("confident samples per class 0..9:", counts, f"({sum(c > 0 for c in counts)} of 10 classes)")


if __name__ == "__main__":
    main()
