"""Precise transcendentals for Triton kernels: ``_math.exp``, ``sin``, ``cos`` and ``log``.

``tl.exp``, ``tl.sin``, ``tl.cos`` and ``tl.log`` lower to approximate PTX
instructions on NVIDIA GPUs (``ex2.approx`` and friends); libdevice's are
accurate to a few ulp. The interpreter has no libdevice, but its ``tl``
functions are numpy's, which are precise, so under the interpreter those are used.
"""
import triton.language as tl

from vqkernels.triton._interpreter import INTERPRETED


def _numpy(name):
    # Looked up at each call: the interpreter installs tl's functions per launch.
    return lambda x: getattr(tl, name)(x)


if INTERPRETED:
    exp, sin, cos, log = (_numpy(name) for name in ("exp", "sin", "cos", "log"))
else:
    # The CUDA backend's own libdevice: the portable stubs in triton.language.extra
    # resolve only where a kernel names them directly, not through this module.
    from triton.language.extra.cuda.libdevice import cos, exp, log, sin
