import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    spinning threads made the single-sample forwards 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
