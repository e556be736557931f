"""nn.Modules built on vqkernels.ops."""
from vqkernels.nn.timestep import TimestepEmbedder

__all__ = ["TimestepEmbedder"]
