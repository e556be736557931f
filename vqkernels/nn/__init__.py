"""nn.Modules built on vqkernels.ops."""
from vqkernels.nn.attention import Attention, ReferenceAttention
from vqkernels.nn.dit import DiTBlock, FinalLayer, ReferenceDiTBlock, ReferenceFinalLayer
from vqkernels.nn.residual_vq import (GroupedResidualVQ, ReferenceGroupedResidualVQ,
                                      ReferenceResidualVQ, ResidualVQ)
from vqkernels.nn.quantizer import ReferenceVectorQuantizer, VectorQuantizer, code_usage
from vqkernels.nn.timestep import TimestepEmbedder
from vqkernels.nn.vector_quantize import ReferenceVectorQuantize, VectorQuantize

__all__ = ["Attention", "DiTBlock", "FinalLayer", "GroupedResidualVQ", "ReferenceAttention",
           "ReferenceDiTBlock", "ReferenceFinalLayer", "ReferenceGroupedResidualVQ",
           "ReferenceResidualVQ", "ReferenceVectorQuantize", "ReferenceVectorQuantizer",
           "ResidualVQ", "TimestepEmbedder", "VectorQuantize", "VectorQuantizer", "code_usage"]
