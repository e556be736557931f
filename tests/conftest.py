"""Test configuration: the Triton interpreter stands in for a GPU where there is none.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection start. On a machine with a GPU the interpreter stays off, the
`interpreter` tests skip, and the `cuda` tests run the same checks on device.
"""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import INTERPRETER  # noqa: E402  (reads TRITON_INTERPRET, set just above)


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
