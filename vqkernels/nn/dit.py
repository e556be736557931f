"""DiT's transformer block and final layer (Peebles & Xie, 2023) on the fused adaLN ops.

Same submodules, parameter names and shapes as the DiT release (``norm1``, ``attn``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``; ``norm_final``,
``linear``), so DiT checkpoints load unchanged. The modulation is computed once
from c; its chunks reach the ops as strided views, read in place. Around its
attention and MLP a block makes three adaLN passes over x: LayerNorm + modulate,
the gated residual fused with the next LayerNorm + modulate, the last gated
residual. Initialization is PyTorch's default (a DiT model applies DiT's init).
``ReferenceDiTBlock`` and ``ReferenceFinalLayer``, the release's forward in plain
PyTorch with the same state dict, are the parity oracles.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vqkernels import ops
from vqkernels.nn.attention import Attention, ReferenceAttention


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x (B, T, D), c (B, D) -> (B, T, D)``.

    With (shift, scale, gate) for attention, then for the MLP, from ``adaLN_modulation(c)``::

        x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))

    The MLP is ``fc1 -> ops.gelu_tanh -> fc2`` with ``int(hidden_size * mlp_ratio)``
    hidden units. ``backend`` goes to every op, attention's included; the eps
    of ``norm1`` and ``norm2`` are the ops' eps.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 backend: str | None = None):
        super().__init__()
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(f"num_heads must divide hidden_size, got hidden_size={hidden_size}, "
                             f"num_heads={num_heads}")
        mlp_hidden = _mlp_hidden_size(hidden_size, mlp_ratio)
        self.norm1 = _affine_free_layer_norm(hidden_size)
        self.attn = self._attention(hidden_size, num_heads, backend)
        self.norm2 = _affine_free_layer_norm(hidden_size)
        self.mlp = self._mlp(hidden_size, mlp_hidden, backend)
        self.adaLN_modulation = _modulation(hidden_size, 6)

    @property
    def backend(self) -> str | None:
        """The backend of every op; it is the attention's, so the two cannot disagree."""
        return self.attn.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.attn.backend = self.mlp.backend = value

    def _attention(self, hidden_size, num_heads, backend):
        return Attention(hidden_size, num_heads, qkv_bias=True, backend=backend)

    def _mlp(self, hidden_size, mlp_hidden, backend):
        return _FusedMlp(hidden_size, mlp_hidden, backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation_chunks(
            self.adaLN_modulation, x, c)
        h = ops.layer_norm_modulate(x, shift_msa, scale_msa, eps=self.norm1.eps,
                                    backend=self.backend)
        x, h = ops.gated_residual_layer_norm_modulate(x, gate_msa, self.attn(h), shift_mlp,
                                                      scale_mlp, eps=self.norm2.eps,
                                                      backend=self.backend)
        return ops.gated_residual(x, gate_mlp, self.mlp(h), backend=self.backend)


class ReferenceDiTBlock(DiTBlock):
    """The pure-PyTorch twin of :class:`DiTBlock` (the DiT release's forward), for parity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)

    def _attention(self, hidden_size, num_heads, backend):
        return ReferenceAttention(hidden_size, num_heads, qkv_bias=True)

    def _mlp(self, hidden_size, mlp_hidden, backend):
        return _Mlp(hidden_size, mlp_hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation_chunks(
            self.adaLN_modulation, x, c)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """DiT's output head: ``x, c -> linear(modulate(norm_final(x), shift, scale))``.

    x (B, T, D) and c (B, D) give ``patch_size**2 * out_channels`` features per
    token; (shift, scale) = ``adaLN_modulation(c)``. ``backend`` and
    ``norm_final.eps`` go to the op.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("patch_size", patch_size),
                            ("out_channels", out_channels)):
            _check_positive_int(name, value)
        self.backend = backend
        self.norm_final = _affine_free_layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = _modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _modulation_chunks(self.adaLN_modulation, x, c)
        return self.linear(ops.layer_norm_modulate(x, shift, scale, eps=self.norm_final.eps,
                                                   backend=self.backend))


class ReferenceFinalLayer(FinalLayer):
    """The pure-PyTorch twin of :class:`FinalLayer` (the DiT release's forward), for parity."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__(hidden_size, patch_size, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _modulation_chunks(self.adaLN_modulation, x, c)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class _Mlp(nn.Module):
    """timm's ``Mlp`` as DiT builds it (no dropout): ``fc1 -> GELU (tanh) -> fc2``."""

    def __init__(self, features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _FusedMlp(_Mlp):
    """``_Mlp`` on ``ops.gelu_tanh``, which overwrites fc1's output in place when no
    gradient needs it: no fresh (B, T, 4D) activation in a sampling forward."""

    def __init__(self, features: int, hidden_features: int, backend: str | None):
        super().__init__(features, hidden_features)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        inplace = not (torch.is_grad_enabled() and h.requires_grad)
        return self.fc2(ops.gelu_tanh(h, inplace=inplace, backend=self.backend))


def _affine_free_layer_norm(hidden_size):
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


def _modulation(hidden_size, num_chunks):
    """``SiLU -> Linear(hidden_size, num_chunks * hidden_size)``: c to the modulation."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size, bias=True))


def _modulation_chunks(modulation: nn.Sequential, x: torch.Tensor, c: torch.Tensor):
    """The (B, D) chunks of ``modulation(c)``, views into one (B, k * D) tensor, after
    checking that x is (B, T, D) and c is (B, D) for the modulation's D."""
    linear = modulation[1]
    hidden = linear.in_features
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden:
        raise ValueError(f"x must be (B, T, {hidden}), got {_describe(x)}")
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != (x.shape[0], hidden):
        raise ValueError(f"c must be (B, D) = {(x.shape[0], hidden)} for x of shape "
                         f"{tuple(x.shape)}, got {_describe(c)}")
    return modulation(c).chunk(linear.out_features // hidden, dim=1)


def _describe(v):
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _modulate(normed, shift, scale):
    """DiT's ``modulate``: per-sample shift and scale broadcast over tokens."""
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _mlp_hidden_size(hidden_size, mlp_ratio):
    """DiT's ``int(hidden_size * mlp_ratio)``, which must be at least 1."""
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not (
            math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1):
        raise ValueError(f"mlp_ratio must be a finite number with int(hidden_size * mlp_ratio) "
                         f">= 1, got mlp_ratio={mlp_ratio!r} for hidden_size={hidden_size}")
    return int(hidden_size * mlp_ratio)
