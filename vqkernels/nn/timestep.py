"""DiT's timestep embedder on top of the fused sinusoidal embedding."""
from __future__ import annotations

import torch
from torch import nn

from vqkernels import ops


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoids, then ``Linear -> SiLU -> Linear``.

    Same parameters (``mlp.0.*``, ``mlp.2.*``) and defaults as DiT's
    ``TimestepEmbedder``, so DiT checkpoints load unchanged.
    ``downscale_freq_shift=1`` gives the frequencies of diffusers' port of DiT.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, *,
                 downscale_freq_shift: float = 0.0, backend: str | None = None):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.downscale_freq_shift = downscale_freq_shift
        self.backend = backend
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = ops.timestep_embedding(t, self.frequency_embedding_size,
                                        downscale_freq_shift=self.downscale_freq_shift,
                                        dtype=self.mlp[0].weight.dtype, backend=self.backend)
        return self.mlp(t_freq)
