"""The public functional API: validation, backend dispatch, autograd, torch.library."""
from vqkernels.ops.adaln import (gated_residual, gated_residual_layer_norm_modulate,
                                 layer_norm_modulate)
from vqkernels.ops.flash_attention import attention
from vqkernels.ops.gelu import gelu_tanh
from vqkernels.ops.group_normalization import group_norm
from vqkernels.ops.ddim import ddim_step
from vqkernels.ops.ema import code_counts_and_sums, ema_update_, ema_update_stages_
from vqkernels.ops.codebook_init import kmeans, replace_dead_codes_
from vqkernels.ops.residual import residual_nearest_code, residual_nearest_code_with_stats
from vqkernels.ops.search import nearest_code, nearest_code_with_stats, vector_quantize
from vqkernels.ops.timestep import timestep_embedding

__all__ = ["attention", "code_counts_and_sums", "ddim_step", "ema_update_", "ema_update_stages_",
           "gated_residual", "gated_residual_layer_norm_modulate", "gelu_tanh", "group_norm",
           "kmeans", "layer_norm_modulate", "nearest_code", "nearest_code_with_stats",
           "replace_dead_codes_", "residual_nearest_code", "residual_nearest_code_with_stats",
           "timestep_embedding", "vector_quantize"]
