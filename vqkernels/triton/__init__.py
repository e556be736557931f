"""Triton kernels, one file per op family: private ``_*_kernel`` functions and a plain launcher.

Imported lazily by vqkernels.ops, so TRITON_INTERPRET can be set before triton loads.
"""
