"""The public functional API: validation, backend dispatch, autograd, torch.library."""
from vqkernels.ops.search import nearest_code, vector_quantize
from vqkernels.ops.timestep import timestep_embedding

__all__ = ["nearest_code", "timestep_embedding", "vector_quantize"]
