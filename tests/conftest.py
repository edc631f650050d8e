import pytest
import torch

# Tests use tiny models: one thread is faster than two (thread start-up dominates) and stays
# predictable when the 2-core machine is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, whatever an earlier test set (restored after): the models are tiny,
    and one thread is faster than two on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """Complete tiny diffusers pipelines (Wan, Flux, SD, multi-view UNet) saved once per session:
    ``{kind: folder}`` under a temporary directory (see corrlab.tiny_pipelines)."""
    from corrlab.tiny_pipelines import build_tiny_pipelines

    with torch.random.fork_rng(devices=[]):
        return build_tiny_pipelines(tmp_path_factory.mktemp("tiny_pipelines"))
