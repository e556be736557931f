"""DiT (Peebles & Xie, ICCV 2023): the class-conditional latent diffusion transformer.

Same modules, parameter names, shapes and initialization as the release, so its
checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) load unchanged
(``load_dit_checkpoint``); ``DiT_models`` holds its 12 presets. The blocks and
the head are ``nn.DiTBlock`` / ``nn.FinalLayer`` on the fused adaLN ops and
``ops.attention``; ``backend`` reaches every op. ``ReferenceDiT``, the release's
forward in plain PyTorch with the same state dict, is the parity oracle.
Conversion to and from diffusers is in ``vqkernels.models.dit_diffusers``.
"""
from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import nn

from vqkernels.nn import (DiTBlock, FinalLayer, ReferenceDiTBlock, ReferenceFinalLayer,
                          TimestepEmbedder)
from vqkernels.reference import timestep as reference_timestep


class DiT(nn.Module):
    """``x (B, in_channels, input_size, input_size), t (B,), y (B,) -> (B, out_channels, ...)``.

    Patches of ``patch_size`` become tokens (row-major) plus a fixed 2-D sin-cos
    table ``pos_embed``; ``c = t_embedder(t) + y_embedder(y)`` conditions
    ``depth`` adaLN-Zero blocks and the head; ``out_channels`` is
    ``2 * in_channels`` with ``learn_sigma`` (epsilon, then the variance).
    ``timestep_freq_shift`` and ``mlp_norm_eps`` (each block's ``norm2``) are the
    release's at their defaults; diffusers' port uses 1 and its ``norm_eps``.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, *,
                 backend: str | None = None, timestep_freq_shift: float = 0.0,
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        _validate(input_size, patch_size, in_channels, hidden_size, depth, class_dropout_prob,
                  num_classes)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes
        self.grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = self._timestep_embedder(hidden_size, timestep_freq_shift, backend)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(self._block(hidden_size, num_heads, mlp_ratio, backend)
                                    for _ in range(depth))
        for block in self.blocks:
            block.norm2.eps = mlp_norm_eps
        self.final_layer = self._final_layer(hidden_size, patch_size, self.out_channels, backend)
        self.initialize_weights()

    def _timestep_embedder(self, hidden_size, freq_shift, backend):
        return TimestepEmbedder(hidden_size, downscale_freq_shift=freq_shift, backend=backend)

    def _block(self, hidden_size, num_heads, mlp_ratio, backend):
        return DiTBlock(hidden_size, num_heads, mlp_ratio, backend=backend)

    def _final_layer(self, hidden_size, patch_size, out_channels, backend):
        return FinalLayer(hidden_size, patch_size, out_channels, backend=backend)

    @property
    def backend(self) -> str | None:
        """The backend of every op; setting it sets every module's."""
        return self.final_layer.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        for module in (self.t_embedder, *self.blocks, self.final_layer):
            module.backend = value

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The release's initialization (a no-op for the values of meta tensors)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.copy_(table.float().unsqueeze(0))  # float64 -> float32, as released
        proj = self.x_embedder.proj  # initialized as the Linear it is
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        zeroed = [m.adaLN_modulation[1] for m in (*self.blocks, self.final_layer)]
        for linear in (*zeroed, self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Latents x, timesteps t (B,) and class labels y (B,) -> the prediction."""
        expected = (self.in_channels, self.grid_size * self.patch_size,
                    self.grid_size * self.patch_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """The release's classifier-free guidance: x's first half runs at both halves of
        (t, y), y's second half being null labels; it guides the first 3 channels only."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p * p * C) tokens -> (B, C, H, W) images."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)


class ReferenceDiT(DiT):
    """The pure-PyTorch twin of :class:`DiT` (the release's forward), for parity."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, *,
                 timestep_freq_shift: float = 0.0, mlp_norm_eps: float = 1e-6):
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                         mlp_ratio, class_dropout_prob, num_classes, learn_sigma,
                         timestep_freq_shift=timestep_freq_shift, mlp_norm_eps=mlp_norm_eps)

    def _timestep_embedder(self, hidden_size, freq_shift, backend):
        return _ReferenceTimestepEmbedder(hidden_size, downscale_freq_shift=freq_shift)

    def _block(self, hidden_size, num_heads, mlp_ratio, backend):
        return ReferenceDiTBlock(hidden_size, num_heads, mlp_ratio)

    def _final_layer(self, hidden_size, patch_size, out_channels, backend):
        return ReferenceFinalLayer(hidden_size, patch_size, out_channels)


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` as DiT builds it: a patch-sized, patch-strided Conv2d,
    ``(B, C, H, W) -> (B, T, D)`` with the T patches in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). With ``dropout_prob > 0`` the table has a last row,
    the null class of classifier-free guidance, which replaces each label with
    probability ``dropout_prob`` in training, or where ``force_drop_ids == 1``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class _ReferenceTimestepEmbedder(TimestepEmbedder):
    """The twin's embedder: the reference sinusoids computed in the weights' dtype (at
    least float32, as released), so that a float64 twin is a float64 truth."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        t_freq = reference_timestep.timestep_embedding(
            t, self.frequency_embedding_size, downscale_freq_shift=self.downscale_freq_shift,
            dtype=dtype, math_dtype=torch.promote_types(dtype, torch.float32))
        return self.mlp(t_freq)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed table (grid_size**2, dim) in float64, tokens row-major.

    Channels [0, dim/2) encode a token's column, [dim/2, dim) its row, each as
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_k = 1 / 10000**(k / (dim/4))``.
    """
    pos = torch.arange(grid_size, dtype=torch.float64, device="cpu")  # cpu: also under meta
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=pos.dtype, device="cpu") / (dim / 4))

    def axis(coordinate):
        angles = coordinate[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, columns = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([axis(columns.flatten()), axis(rows.flatten())], dim=1)


_PRESETS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DiT_models = {f"DiT-{name}/{patch}": functools.partial(DiT, depth=depth, hidden_size=hidden,
                                                       patch_size=patch, num_heads=heads)
              for name, (depth, hidden, heads) in _PRESETS.items() for patch in (2, 4, 8)}


def load_dit_checkpoint(path, model="DiT-XL/2", *, map_location="cpu", **kwargs) -> DiT:
    """``model`` (a ``DiT_models`` name or a constructor such as ``DiT``) built with
    ``kwargs`` and loaded from ``path``: a bare state dict, or a training checkpoint
    whose ``"ema"`` (preferred, as the release samples from it) or ``"model"`` entry
    is one. ``input_size`` defaults to the checkpoint's (from ``pos_embed``)."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # training checkpoints' "args"
        state = torch.load(path, map_location=map_location, weights_only=True)
    state = next((state[key] for key in ("ema", "model") if key in state), state)
    if "input_size" not in kwargs:
        patch = state["x_embedder.proj.weight"].shape[-1]
        kwargs["input_size"] = math.isqrt(state["pos_embed"].shape[1]) * patch
    if isinstance(model, str) and model not in DiT_models:
        raise ValueError(f"model must be one of {list(DiT_models)} or a constructor, got {model!r}")
    build = DiT_models[model] if isinstance(model, str) else model
    with torch.device("meta"):  # no initialization: every tensor comes from the checkpoint
        dit = build(**kwargs)
    dit.load_state_dict(state, assign=True)
    return dit


def _validate(input_size, patch_size, in_channels, hidden_size, depth, class_dropout_prob,
              num_classes):
    for name, value in (("input_size", input_size), ("patch_size", patch_size),
                        ("in_channels", in_channels), ("hidden_size", hidden_size),
                        ("depth", depth), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if input_size % patch_size:
        raise ValueError(f"patch_size must divide input_size, got input_size={input_size}, "
                         f"patch_size={patch_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (the 2-D sin-cos table), "
                         f"got {hidden_size}")
    if not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
