"""What taming's and LlamaGen's VQModel share: encode, decode, tokens and checkpoints.

``encoder -> quant_conv -> quantize`` and ``post_quant_conv -> decoder``;
subclasses pick the module names (a ``Layout``), where attention goes and the
quantizer. The convolutions run channels-last (NHWC): oneDNN and cuDNN convolve
NHWC without converting activations to and from their blocked layouts at every
layer (a 128 px LlamaGen tokenize on 2 CPU cores: 1.1x the NCHW model), and
``ops.group_norm`` normalizes NHWC in place of layout (PyTorch's CUDA GroupNorm
copies it to NCHW). The reference twins keep the originals' NCHW, PyTorch's
GroupNorm and SiLU, ``ReferenceAttnBlock`` and a reference quantizer.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vqkernels.models._conv_blocks import AttnBlock, Decoder, Encoder, GroupNormAct, Layout


class VQTokenizer(nn.Module):
    """Builds encoder, decoder, quant_conv and post_quant_conv; subclasses add ``quantize``."""

    attn_block = AttnBlock
    memory_format = torch.channels_last  # of the conv weights and activations
    fused_norm = True  # GroupNorm (+ SiLU) by ops.group_norm; the twins' by PyTorch

    def __init__(self, layout: Layout, *, in_channels: int, out_channels: int, ch: int,
                 encoder_ch_mult: Sequence[int], decoder_ch_mult: Sequence[int],
                 num_res_blocks: int, attn_levels: set[int], z_channels: int, embed_dim: int,
                 dropout: float, precision: str | None, backend: str | None):
        super().__init__()
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise ValueError(f"encoder_ch_mult and decoder_ch_mult must have one length (the "
                             f"decoder undoes the encoder's downsampling), got "
                             f"{len(encoder_ch_mult)} and {len(decoder_ch_mult)}")
        self.precision, self.backend = precision, backend
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.downsample_factor = 2 ** (len(encoder_ch_mult) - 1)
        shared = dict(ch=ch, num_res_blocks=num_res_blocks, attn_levels=attn_levels,
                      dropout=dropout, make_attn=self._make_attn, make_norm=self._make_norm)
        self.encoder = Encoder(layout, in_channels=in_channels, out_channels=z_channels,
                               ch_mult=encoder_ch_mult, **shared)
        self.decoder = Decoder(layout, z_channels=z_channels, out_channels=out_channels,
                               ch_mult=decoder_ch_mult, **shared)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.to(memory_format=self.memory_format)  # the conv weights; load_state_dict keeps it

    def _make_attn(self, channels: int) -> nn.Module:
        return self.attn_block(channels, backend=self.backend)

    def _make_norm(self, channels: int, silu: bool) -> nn.Module:
        return GroupNormAct(channels, silu=silu, fused=self.fused_norm, backend=self.backend)

    def encode(self, x: torch.Tensor):
        """Images (B, C, H, W) -> the quantizer's ``(quant, emb_loss, info)``."""
        self._check_images(x)
        h = self.encoder(x.contiguous(memory_format=self.memory_format))
        return self.quantize(self.quant_conv(h))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, embed_dim, h, w) -> images."""
        if (not isinstance(quant, torch.Tensor) or quant.dim() != 4
                or quant.shape[1] != self.embed_dim):
            raise ValueError(f"quant must be (B, {self.embed_dim}, h, w), got {_describe(quant)}")
        h = self.post_quant_conv(quant.contiguous(memory_format=self.memory_format))
        return self.decoder(h).contiguous()  # images in the usual layout

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> code indices (B, H / f, W / f), f the downsampling factor."""
        quant, _, (_, _, indices) = self.encode(x)
        return indices.reshape(quant.shape[0], *quant.shape[2:])

    def decode_code(self, indices: torch.Tensor,
                    shape: Sequence[int] | None = None) -> torch.Tensor:
        """Code indices (B, h, w) -> images; or flat indices with ``shape`` = (B, C, h, w)
        of the latents, as LlamaGen's samplers pass them."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int64 or int32 tensor, got {_describe(indices)}")
        if shape is None and indices.dim() != 3:
            raise ValueError(f"indices must be (B, h, w) (or pass shape), got shape "
                             f"{tuple(indices.shape)}")
        b, h, w = indices.shape if shape is None else (shape[0], *shape[2:])
        quant = self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> ``(reconstruction, quantizer loss)``."""
        quant, emb_loss, _ = self.encode(x)
        return self.decode(quant), emb_loss

    def _check_images(self, x):
        f = self.downsample_factor
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4
                or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f
                or 0 in x.shape[2:]):
            raise ValueError(f"x must be float images (B, {self.in_channels}, H, W) with H and W "
                             f"positive multiples of {f}, got {_describe(x)}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}"
    return type(value).__name__


def read_state_dict(path: str | os.PathLike, wrappers: Sequence[str], *,
                    weights_only: bool) -> Mapping[str, torch.Tensor]:
    """The state dict under the first of ``wrappers`` found in the checkpoint at ``path``,
    or the checkpoint itself when it is a bare state dict."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    if isinstance(checkpoint, Mapping):
        for key in wrappers:
            if key in checkpoint:
                return checkpoint[key]
        if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
            return checkpoint
    keys = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f"{os.fspath(path)}: no state dict under any of {list(wrappers)} and not a "
                     f"state dict itself (found {keys})")
