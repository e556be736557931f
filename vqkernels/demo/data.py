"""scikit-learn's bundled digits (1,797 8x8 grey images, no download), split once.

Pixels are scaled from 0..16 to [0, 1]. The split (75% train, 25% held out,
stratified by class) is fixed by ``SPLIT_SEED``, independent of the demo's
``--seed``, so every run is judged on the same held-out digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25
NUM_CLASSES = 10
IMAGE_SIZE = 8


class MissingExtraError(ImportError):
    """scikit-learn, the demo's optional dependency, is not installed."""


def require_sklearn():
    """scikit-learn, or a ``MissingExtraError`` that says how to install the demo's extra."""
    try:
        import sklearn
    except ImportError as error:
        raise MissingExtraError("the demo needs scikit-learn: pip install 'vqkernels[demo]' "
                          "(or pip install scikit-learn)") from error
    return sklearn


@dataclass(frozen=True)
class Digits:
    """The split as float32 images (N, 1, 8, 8) in [0, 1] and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device) -> "Digits":
        return Digits(*(t.to(device) for t in (self.train_images, self.train_labels,
                                              self.test_images, self.test_labels)))


def load_digits() -> Digits:
    """The fixed train / held-out split of ``sklearn.datasets.load_digits``, on the CPU."""
    require_sklearn()
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    pixels = (bunch.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, bunch.target, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED,
        stratify=bunch.target)

    def images(x):
        return torch.from_numpy(x).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)

    def labels(y):
        return torch.from_numpy(y.astype(np.int64))

    return Digits(images(x_train), labels(y_train), images(x_test), labels(y_test))


def flat_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 8, 8) images -> (N, 64) float64 numpy rows, clipped to [0, 1], for the judge."""
    return images.detach().reshape(images.shape[0], -1).clamp(0, 1).double().cpu().numpy()
