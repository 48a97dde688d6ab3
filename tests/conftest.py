import os

import torch

# Without a GPU, Triton kernels run on CPU through the interpreter (as in CI); this must
# precede any triton import. With a GPU they run compiled, at real sizes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def has_ext():
    from spurfast._extension import load_extension

    if load_extension() is None:
        pytest.skip("compiled extension not built")
    return True


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest and avoids oversubscription when the machine is busy."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
