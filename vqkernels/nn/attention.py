"""DiT's multi-head self-attention block on top of the fused attention op."""
from __future__ import annotations

import torch
from torch import nn

from vqkernels import ops
from vqkernels.reference import attention as reference


class Attention(nn.Module):
    """``x (B, N, C) -> proj(attention(qkv(x)))`` with ``num_heads`` heads of C / num_heads.

    The parameters are timm's ``Attention`` ones, which DiT uses (``qkv.weight``,
    ``qkv.bias``, ``proj.weight``, ``proj.bias``), so DiT checkpoints load
    unchanged. q, k and v are strided views of the one qkv projection; the
    kernels read them in place.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, *,
                 backend: str | None = None):
        super().__init__()
        if not (isinstance(dim, int) and isinstance(num_heads, int) and num_heads > 0
                and dim > 0 and dim % num_heads == 0):
            raise ValueError(f"dim must be a positive multiple of num_heads, got dim={dim!r}, "
                             f"num_heads={num_heads!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must be (B, N, {self.qkv.in_features}), got shape {tuple(x.shape)}")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self._attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _attend(self, q, k, v):
        return ops.attention(q, k, v, backend=self.backend)


class ReferenceAttention(Attention):
    """The pure-PyTorch twin of :class:`Attention` (explicit softmax), for parity."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__(dim, num_heads, qkv_bias)

    def _attend(self, q, k, v):
        return reference.attention(q, k, v)
