"""Test configuration. Without a GPU the Triton kernels run under the interpreter: set it before
anything imports triton (the device check sets TRITON_INTERPRET=0 explicitly)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
