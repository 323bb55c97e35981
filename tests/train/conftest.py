import pytest


@pytest.fixture(autouse=True)
def _one_thread_per_test(one_intra_op_thread):
    """Every trainer test on one intra-op thread (tests/conftest.py says why)."""
