"""The public functional API: validation, backend dispatch, autograd, torch.library."""
from vqkernels.ops.timestep import timestep_embedding

__all__ = ["timestep_embedding"]
