"""LlamaGen's image tokenizer (``tokenizer_image/vq_model.py``, VQ-16) on vqkernels' kernels.

taming's blocks under LlamaGen's names (``conv_blocks.{i}.res.{j}``, ``mid.{0,1,2}``,
attention on the lowest resolution only) and its l2-normalized codebook, looked
up with the cosine search; its checkpoints (``"ema"``, ``"model"`` or
``"state_dict"``) load. ``ReferenceLlamaGenVQ`` is the pure-PyTorch twin.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.models._conv_blocks import Layout, ReferenceAttnBlock
from vqkernels.models._tokenizer import VQTokenizer, read_state_dict
from vqkernels.nn import ReferenceVectorQuantizer, VectorQuantizer

LLAMAGEN_LAYOUT = Layout(encoder_levels="conv_blocks", decoder_levels="conv_blocks", blocks="res",
                         mid=("0", "1", "2"), decoder_indexed_by_resolution=False)
USAGE_WINDOW = 65536  # the length of LlamaGen's codebook_used buffer


class _LlamaGenCodebook:
    """LlamaGen's quantizer on a taming one: its loss (commitment weighted by beta, as
    taming's ``legacy=False``), unit-norm codes with ``l2_norm`` (cosine search) and,
    with ``show_usage``, the persistent ``codebook_used`` buffer of the last 65536
    indices seen in training."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, *, l2_norm: bool = True,
                 show_usage: bool = True, **kwargs):
        super().__init__(n_e, e_dim, beta, legacy=False, metric="cosine" if l2_norm else "l2",
                         **kwargs)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))

    def forward(self, z: torch.Tensor):
        z_q, loss, info = super().forward(z)
        if self.training and hasattr(self, "codebook_used"):
            self._remember(info[2])
        return z_q, loss, info

    @torch.no_grad()
    def _remember(self, indices: torch.Tensor):
        latest = indices.reshape(-1)[-USAGE_WINDOW:].to(self.codebook_used.dtype)
        self.codebook_used.copy_(torch.cat([self.codebook_used[len(latest):], latest]))


class LlamaGenQuantizer(_LlamaGenCodebook, VectorQuantizer):
    """LlamaGen's ``VectorQuantizer`` on the fused search (``precision``, ``backend``)."""


class ReferenceLlamaGenQuantizer(_LlamaGenCodebook, ReferenceVectorQuantizer):
    """The pure-PyTorch twin of :class:`LlamaGenQuantizer`."""


class LlamaGenVQ(VQTokenizer):
    """LlamaGen's ``VQModel(ModelArgs(...))``; the defaults are its VQ-16 tokenizer.

    ``encode`` returns ``(quant, loss, (None, None, indices))`` with the codebook
    and commitment terms summed into one loss (LlamaGen returns them apart, and
    only in training; its entropy term is not supported).
    """

    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, *,
                 encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4), z_channels: int = 256,
                 ch: int = 128, num_res_blocks: int = 2, dropout_p: float = 0.0,
                 commit_loss_beta: float = 0.25, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, precision: str | None = None,
                 backend: str | None = None):
        super().__init__(LLAMAGEN_LAYOUT, in_channels=3, out_channels=3, ch=ch,
                         encoder_ch_mult=encoder_ch_mult, decoder_ch_mult=decoder_ch_mult,
                         num_res_blocks=num_res_blocks, attn_levels={len(encoder_ch_mult) - 1},
                         z_channels=z_channels, embed_dim=codebook_embed_dim, dropout=dropout_p,
                         precision=precision, backend=backend)
        self.quantize = self._make_quantizer(codebook_size, codebook_embed_dim, commit_loss_beta,
                                             l2_norm=codebook_l2_norm,
                                             show_usage=codebook_show_usage)

    @classmethod
    def vq_16(cls, **kwargs) -> LlamaGenVQ:
        """LlamaGen's ``VQ_16``: 16384 unit codes of 8, f16, ch 128 x (1, 1, 2, 2, 4)."""
        return cls(16384, 8, encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4),
                   z_channels=256, ch=128, num_res_blocks=2, dropout_p=0.0, **kwargs)

    def _make_quantizer(self, *args, **kwargs) -> nn.Module:
        return LlamaGenQuantizer(*args, precision=self.precision, backend=self.backend, **kwargs)

    def load_checkpoint(self, path: str | os.PathLike, *, key: str | None = None,
                        weights_only: bool = True) -> LlamaGenVQ:
        """Loads a LlamaGen checkpoint strictly: the weights under ``key``, else under the
        first of "ema", "model", "state_dict" found (LlamaGen's own order), else a bare
        state dict. ``weights_only=False`` for training checkpoints that pickle their
        argparse args: only for files you trust. Returns self."""
        wrappers = (key,) if key is not None else ("ema", "model", "state_dict")
        self.load_state_dict(read_state_dict(path, wrappers, weights_only=weights_only))
        return self


class ReferenceLlamaGenVQ(LlamaGenVQ):
    """The pure-PyTorch twin of :class:`LlamaGenVQ` (reference attention and quantizer)."""

    attn_block = ReferenceAttnBlock
    memory_format = torch.contiguous_format  # NCHW, as the original
    fused_norm = False

    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, **kwargs):
        super().__init__(codebook_size, codebook_embed_dim, **kwargs)

    def _make_quantizer(self, *args, **kwargs) -> nn.Module:
        return ReferenceLlamaGenQuantizer(*args, **kwargs)
