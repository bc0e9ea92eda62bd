"""Measuring sample quality: a cached MNIST classifier as the feature network, metrics computed by
torchmetrics (FID, KID, MiFID) beside their floor, classifier confidence, precision/recall and memorisation."""
