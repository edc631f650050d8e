import pytest
import torch

# Tests use tiny models: one thread is faster than two (thread start-up dominates) and stays
# predictable when the 2-core machine is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
