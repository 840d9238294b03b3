import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # small ops on a shared 2-core host: 2 intra-op threads are ~20-50x slower than 1 (spinning)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
