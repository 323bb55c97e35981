"""Test configuration. Without a GPU the Triton kernels run under the interpreter: set it before
anything imports triton (the device check sets TRITON_INTERPRET=0 explicitly)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_intra_op_thread():
    """The test on one intra-op thread, the count restored after. Tiny models and shapes gain
    nothing from threads, and on a shared 2-core machine two spinning threads made single-sample
    forwards 10-30x slower."""
    from aepg_kernels.utils import intra_op_threads  # here: after TRITON_INTERPRET is set

    with intra_op_threads(1):
        yield


@pytest.fixture
def restore_intra_op_threads():
    """The intra-op thread count restored after the test, for commands that set it (--threads)."""
    from aepg_kernels.utils import intra_op_threads

    with intra_op_threads(None):
        yield
