import os

import torch

# Without a GPU, Triton kernels run on CPU through the interpreter (as in CI); this must
# precede any triton import. With a GPU they run compiled, at real sizes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

triton = tl = None
if os.environ.get("TRITON_INTERPRET") == "1":
    try:  # only for the interpreter probe below
        import triton
        import triton.language as tl
    except Exception:  # tests that need Triton skip themselves through importorskip
        triton = tl = None

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


if triton is not None:

    @triton.jit
    def _interpreter_probe_kernel(x_ptr, bounds_ptr, out_ptr, BLOCK: tl.constexpr):
        lo = tl.load(bounds_ptr)
        hi = tl.load(bounds_ptr + 1)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(lo, hi, BLOCK):  # a loop bound loaded at run time, as in the kernels
            offs = start + tl.arange(0, BLOCK)
            total += tl.load(x_ptr + offs, mask=offs < hi, other=0.0)
        tl.store(out_ptr + tl.arange(0, BLOCK), total)


@functools.cache
def _triton_interpreter_problem():
    """Why this Triton's interpreter cannot run any kernel with the installed NumPy, or None.

    Known cases: Triton 3.0's interpreter loads zeros under NumPy 2.0-2.3 (right values
    under NumPy 1.26); interpreters older than triton-lang/triton#9172 turn 1-element arrays into
    Python ints in a way NumPy >= 2.4 refuses ("only 0-dimensional arrays ..."). A kernel
    of our own cannot work around either, so the probe is a kernel that shares no code
    with spurfast's: when it fails, the interpreter is broken, not spurfast's kernels.
    """
    import numpy

    versions = f"Triton {triton.__version__}'s interpreter with NumPy {numpy.__version__}"
    hint = "run them with numpy<2, a newer Triton, or on a GPU; test_triton_compile.py still compiles them"
    x = torch.arange(10, dtype=torch.float32)
    bounds = torch.tensor([0, 10])
    out = torch.full((4,), -1.0)
    try:
        _interpreter_probe_kernel[(1,)](x, bounds, out, BLOCK=4)
    except Exception as exc:  # whatever the interpreter raises, no kernel of ours can run
        return f"{versions} cannot run Triton kernels ({exc}); {hint}"
    if out.tolist() != [12.0, 15.0, 8.0, 10.0]:
        return f"{versions} computes a plain load/sum/store wrongly ({out.tolist()}); {hint}"
    return None


@pytest.fixture
def triton_interpreter():
    """For tests that run Triton kernels: skip on CPU when the interpreter itself is broken."""
    if triton is None:  # compiled on a GPU, or no Triton (the test skips itself)
        return
    problem = _triton_interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
