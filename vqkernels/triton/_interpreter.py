"""What differs when Triton interprets the kernels (TRITON_INTERPRET=1) instead of compiling them.

The interpreter runs a kernel as Python over numpy, one program at a time, and
holds every scalar as a 1-element array.
"""
import builtins
import os

import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _stepping(start, stop, step):
    """start, start + step, ... below stop (step > 0), compared as interpreter scalars.

    Triton 3.6's interpreter converts a scalar for ``range()`` with int() of its
    1-element array, which numpy >= 2.4 refuses; comparisons still work.
    """
    while start < stop:
        yield start
        start += step


# The loop over a runtime bound, written ``for i in _interpreter.runtime_range(a, b, step)``:
# compiled, it is Python's range (an scf.for, software-pipelined as num_stages says).
runtime_range = _stepping if INTERPRETED else builtins.range
