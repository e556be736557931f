"""The convolutional encoder and decoder of taming-transformers' VQGAN, shared by tokenizers.

ResnetBlocks (GroupNorm + swish in one ``ops.group_norm``), single-head AttnBlocks
on ``ops.attention``, strided-conv downsampling and nearest-2x upsampling, stacked
into an Encoder / Decoder whose module names a ``Layout`` chooses, so taming's
and LlamaGen's checkpoints load unchanged. The twins' norms (``fused=False``) are
PyTorch's GroupNorm and SiLU.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels import ops
from vqkernels.reference import attention as reference_attention

MakeAttn = Callable[[int], nn.Module]  # channels -> an AttnBlock (or its twin)
MakeNorm = Callable[[int, bool], nn.Module]  # (channels, silu) -> a GroupNormAct


@dataclass(frozen=True)
class Layout:
    """Module names of one checkpoint family (the blocks and math are the same)."""

    encoder_levels: str
    decoder_levels: str
    blocks: str
    mid: tuple[str, str, str]
    # taming stores decoder level i (resolution / 2**i) at index i and runs them last to
    # first; LlamaGen stores them in the order they run
    decoder_indexed_by_resolution: bool


class GroupNormAct(nn.GroupNorm):
    """taming's ``Normalize`` (GroupNorm of 32 groups, eps 1e-6), then SiLU when ``silu``:
    one ``ops.group_norm`` pass where ``fused``, else PyTorch's GroupNorm and SiLU."""

    def __init__(self, channels: int, *, silu: bool, fused: bool, backend: str | None = None):
        super().__init__(32, channels, eps=1e-6, affine=True)
        self.silu, self.fused, self.backend = silu, fused, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return ops.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps,
                                  silu=self.silu, backend=self.backend)
        h = super().forward(x)
        return F.silu(h) if self.silu else h


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(dropout(swish(norm2(conv1(swish(norm1(x)))))))``.

    The shortcut is a 1x1 ``nin_shortcut`` conv where the channels change; each
    ``swish(norm(.))`` is one module of ``make_norm``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float, make_norm: MakeNorm):
        super().__init__()
        self.norm1 = make_norm(in_channels, True)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = make_norm(out_channels, True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """``x + proj_out(softmax(q k^T / sqrt(C)) v)`` over the H*W positions, one head of C.

    q, k, v and proj_out are 1x1 convs (taming's parameters), applied as one
    linear map on the (B, H*W, C) tokens so that q, k and v reach
    ``ops.attention`` as (B, 1, H*W, C) views of a single projection.
    """

    fused_norm = True  # ops.group_norm; the twin's is PyTorch's

    def __init__(self, channels: int, *, backend: str | None = None):
        super().__init__()
        self.backend = backend
        self.norm = GroupNormAct(channels, silu=False, fused=self.fused_norm, backend=backend)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1)
                                                 for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv_weight = torch.cat([conv.weight for conv in (self.q, self.k, self.v)]).view(3 * c, c)
        qkv_bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, qkv_weight, qkv_bias).unsqueeze(1).chunk(3, dim=-1)
        out = self._attend(q, k, v).squeeze(1)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).view(b, c, h, w)

    def _attend(self, q, k, v):
        return ops.attention(q, k, v, backend=self.backend)


class ReferenceAttnBlock(AttnBlock):
    """The pure-PyTorch twin of :class:`AttnBlock` (explicit softmax), for parity."""

    fused_norm = False

    def _attend(self, q, k, v):
        return reference_attention.attention(q, k, v)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResnetBlocks, each followed by its AttnBlock where the level
    has them, then the resampling (if any) under ``resample_name``."""

    def __init__(self, blocks_name: str, blocks: list[nn.Module], attns: list[nn.Module],
                 resample_name: str, resample: nn.Module | None):
        super().__init__()
        self.blocks_name = blocks_name
        setattr(self, blocks_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attns)
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self.blocks_name)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


def _level(layout: Layout, in_channels: int, out_channels: int, num_blocks: int, dropout: float,
           with_attn: bool, make_attn: MakeAttn, make_norm: MakeNorm, resample_name: str,
           resample: type[nn.Module] | None) -> Level:
    blocks = [ResnetBlock(in_channels if j == 0 else out_channels, out_channels, dropout,
                          make_norm) for j in range(num_blocks)]
    attns = [make_attn(out_channels) for _ in blocks] if with_attn else []
    return Level(layout.blocks, blocks, attns, resample_name,
                 resample(out_channels) if resample is not None else None)


def _mid(layout: Layout, channels: int, dropout: float, make_attn: MakeAttn,
         make_norm: MakeNorm) -> nn.Sequential:
    block_1, attn_1, block_2 = layout.mid
    return nn.Sequential(OrderedDict([
        (block_1, ResnetBlock(channels, channels, dropout, make_norm)),
        (attn_1, make_attn(channels)),
        (block_2, ResnetBlock(channels, channels, dropout, make_norm))]))


class Encoder(nn.Module):
    """conv_in, per level ``num_res_blocks`` ResnetBlocks (+ AttnBlocks at ``attn_levels``)
    and a Downsample but on the last, mid (block, attn, block), norm_out, swish, conv_out."""

    def __init__(self, layout: Layout, *, in_channels: int, out_channels: int, ch: int,
                 ch_mult: Sequence[int], num_res_blocks: int, attn_levels: set[int],
                 dropout: float, make_attn: MakeAttn, make_norm: MakeNorm):
        super().__init__()
        self.conv_in = conv3x3(in_channels, ch)
        levels, channels = [], ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            levels.append(_level(layout, channels, ch * mult, num_res_blocks, dropout,
                                 i in attn_levels, make_attn, make_norm, "downsample",
                                 None if last else Downsample))
            channels = ch * mult
        self.levels_name = layout.encoder_levels
        setattr(self, self.levels_name, nn.ModuleList(levels))
        self.mid = _mid(layout, channels, dropout, make_attn, make_norm)
        self.norm_out = make_norm(channels, True)
        self.conv_out = conv3x3(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in getattr(self, self.levels_name):
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """The encoder's mirror: conv_in, mid, then from the lowest resolution up
    ``num_res_blocks + 1`` ResnetBlocks per level (+ AttnBlocks at ``attn_levels``)
    and an Upsample but on the full-resolution level, norm_out, swish, conv_out."""

    def __init__(self, layout: Layout, *, z_channels: int, out_channels: int, ch: int,
                 ch_mult: Sequence[int], num_res_blocks: int, attn_levels: set[int],
                 dropout: float, make_attn: MakeAttn, make_norm: MakeNorm):
        super().__init__()
        channels = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, channels)
        self.mid = _mid(layout, channels, dropout, make_attn, make_norm)
        run_order = []
        for i in reversed(range(len(ch_mult))):
            run_order.append(_level(layout, channels, ch * ch_mult[i], num_res_blocks + 1,
                                    dropout, i in attn_levels, make_attn, make_norm, "upsample",
                                    Upsample if i else None))
            channels = ch * ch_mult[i]
        self.levels_name = layout.decoder_levels
        self.reversed_storage = layout.decoder_indexed_by_resolution
        stored = run_order[::-1] if self.reversed_storage else run_order
        setattr(self, self.levels_name, nn.ModuleList(stored))
        self.norm_out = make_norm(channels, True)
        self.conv_out = conv3x3(channels, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self.levels_name)
        for level in (reversed(levels) if self.reversed_storage else levels):
            h = level(h)
        return self.conv_out(self.norm_out(h))
