import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests share a 2-core machine: keep torch to one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
