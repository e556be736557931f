"""vqkernels: fused GPU kernels for VQ tokenizers and diffusion transformers."""
from vqkernels import nn, ops, reference, sampling
from vqkernels._dispatch import BackendUnavailableError
from vqkernels._info import info
from vqkernels._selftest import selftest
from vqkernels._version import __version__
from vqkernels.nn import GroupedResidualVQ, ResidualVQ, VectorQuantize, VectorQuantizer

__all__ = ["BackendUnavailableError", "GroupedResidualVQ", "ResidualVQ", "VectorQuantize",
           "VectorQuantizer", "__version__", "info", "nn", "ops", "reference", "sampling",
           "selftest"]
