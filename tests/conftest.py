"""Test configuration: the Triton interpreter stands in for a GPU where there is none.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection start. On a machine with a GPU the interpreter stays off, the
`interpreter` tests skip, and the `cuda` tests run the same checks on device.
"""
import os
from pathlib import Path

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import INTERPRETER, breaks_cuda_context  # noqa: E402  (reads TRITON_INTERPRET)


SOURCE_TREE = Path(__file__).resolve().parent.parent


def pytest_report_header(config):
    import vqkernels
    from vqkernels._info import versions

    return f"vqkernels {versions()['vqkernels']} from {Path(vqkernels.__file__).parent}"


def pytest_sessionstart(session):
    """With VQKERNELS_EXPECT_INSTALLED=1 (CI's wheel run) the suite must test the installed
    package: stop if vqkernels was imported from this source tree instead."""
    import vqkernels

    location = Path(vqkernels.__file__).resolve()
    if (os.environ.get("VQKERNELS_EXPECT_INSTALLED") == "1"
            and location.parent == SOURCE_TREE / "vqkernels"):
        pytest.exit(f"VQKERNELS_EXPECT_INSTALLED=1, but vqkernels was imported from the source "
                    f"tree ({location}): run `python -P -m pytest` (no cwd on sys.path)",
                    returncode=3)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU")
    skip_interp = pytest.mark.skip(reason="Triton interpreter is off (a GPU runs Triton for real)")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_cuda)
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(skip_interp)


@pytest.fixture
def generator():
    """Fresh random data each run (seeded from the OS), reported on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under pytest-xdist, a test whose kernel faulted ends its worker, so xdist reports that
    test as crashed and starts a fresh worker: a faulted CUDA context fails every later
    call in its process, which would bury the one real failure under hundreds."""
    yield
    if (call.when == "call" and call.excinfo is not None
            and os.environ.get("PYTEST_XDIST_WORKER")
            and breaks_cuda_context(call.excinfo.value)):
        os._exit(70)
