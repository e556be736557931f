"""nn.Modules built on vqkernels.ops."""
from vqkernels.nn.quantizer import ReferenceVectorQuantizer, VectorQuantizer, code_usage
from vqkernels.nn.timestep import TimestepEmbedder

__all__ = ["ReferenceVectorQuantizer", "TimestepEmbedder", "VectorQuantizer", "code_usage"]
