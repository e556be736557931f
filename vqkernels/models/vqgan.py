"""taming-transformers' VQGAN (``VQModel``) on vqkernels' attention and nearest-code search.

Same ``ddconfig``, module names and state dict as taming's, so its Lightning
checkpoints load (``load_taming_checkpoint``); ``ReferenceVQGAN`` is the
pure-PyTorch twin for parity tests.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from vqkernels.models._conv_blocks import Layout, ReferenceAttnBlock
from vqkernels.models._tokenizer import VQTokenizer, read_state_dict
from vqkernels.nn import ReferenceVectorQuantizer, VectorQuantizer

TAMING_LAYOUT = Layout(encoder_levels="down", decoder_levels="up", blocks="block",
                       mid=("block_1", "attn_1", "block_2"), decoder_indexed_by_resolution=True)

# taming's configs/imagenet_vqgan.yaml (vqgan_imagenet_f16_1024 and _16384), embed_dim 256
IMAGENET_F16_DDCONFIG = dict(double_z=False, z_channels=256, resolution=256, in_channels=3,
                             out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.0)
_REQUIRED_KEYS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels",
                  "resolution", "z_channels"}
_OPTIONAL_KEYS = {"double_z": False, "dropout": 0.0, "resamp_with_conv": True}


class VQGAN(VQTokenizer):
    """taming's ``VQModel(ddconfig, lossconfig, n_embed, embed_dim)`` without the loss.

    ``encoder.*`` / ``decoder.*`` (ResnetBlocks, single-head AttnBlocks at
    ``attn_resolutions``), ``quant_conv``, ``post_quant_conv`` and
    ``quantize`` (a ``vqkernels.VectorQuantizer``, beta 0.25). Attention runs
    on ``ops.attention`` and quantization on the fused search.
    """

    def __init__(self, ddconfig: Mapping, n_embed: int, embed_dim: int, *,
                 remap: str | None = None, sane_index_shape: bool = False,
                 precision: str | None = None, backend: str | None = None):
        config = _checked_ddconfig(ddconfig)
        attn_levels = {i for i in range(len(config["ch_mult"]))
                       if config["resolution"] // 2 ** i in config["attn_resolutions"]}
        super().__init__(TAMING_LAYOUT, in_channels=config["in_channels"],
                         out_channels=config["out_ch"], ch=config["ch"],
                         encoder_ch_mult=config["ch_mult"], decoder_ch_mult=config["ch_mult"],
                         num_res_blocks=config["num_res_blocks"], attn_levels=attn_levels,
                         z_channels=config["z_channels"], embed_dim=embed_dim,
                         dropout=config["dropout"], precision=precision, backend=backend)
        self.quantize = self._make_quantizer(n_embed, embed_dim, remap, sane_index_shape)

    @classmethod
    def imagenet_f16(cls, n_embed: int = 16384, **kwargs) -> VQGAN:
        """taming's ImageNet f16 VQGAN with 1024 or 16384 codes of 256 (16x16 tokens at 256^2)."""
        if n_embed not in (1024, 16384):
            raise ValueError(f"n_embed must be 1024 or 16384 for the ImageNet f16 models, "
                             f"got {n_embed!r}")
        return cls(IMAGENET_F16_DDCONFIG, n_embed, 256, **kwargs)

    def _make_quantizer(self, n_embed, embed_dim, remap, sane_index_shape) -> nn.Module:
        return VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap,
                               sane_index_shape=sane_index_shape, precision=self.precision,
                               backend=self.backend)

    def load_taming_checkpoint(self, path: str | os.PathLike, *,
                               weights_only: bool = True) -> VQGAN:
        """Loads a taming Lightning checkpoint's ``state_dict`` (or a bare state dict) strictly,
        without its ``loss.*`` entries (LPIPS, discriminator). ``weights_only=False`` unpickles
        whatever else the file holds: only for files you trust. Returns self."""
        state = read_state_dict(path, ("state_dict",), weights_only=weights_only)
        self.load_state_dict({key: value for key, value in state.items()
                              if not key.startswith("loss.")})
        return self


class ReferenceVQGAN(VQGAN):
    """The pure-PyTorch twin of :class:`VQGAN` (reference attention and quantizer), for parity."""

    attn_block = ReferenceAttnBlock
    memory_format = torch.contiguous_format  # NCHW, as the original
    fused_norm = False

    def __init__(self, ddconfig: Mapping, n_embed: int, embed_dim: int, *,
                 remap: str | None = None, sane_index_shape: bool = False):
        super().__init__(ddconfig, n_embed, embed_dim, remap=remap,
                         sane_index_shape=sane_index_shape)

    def _make_quantizer(self, n_embed, embed_dim, remap, sane_index_shape) -> nn.Module:
        return ReferenceVectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap,
                                        sane_index_shape=sane_index_shape)


def _checked_ddconfig(ddconfig: Mapping) -> dict:
    if not isinstance(ddconfig, Mapping):
        raise TypeError(f"ddconfig must be a mapping (taming's model.params.ddconfig), "
                        f"got {type(ddconfig).__name__}")
    missing = sorted(_REQUIRED_KEYS - set(ddconfig))
    unknown = sorted(set(ddconfig) - _REQUIRED_KEYS - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"ddconfig: missing keys {missing}, unknown keys {unknown}")
    config = {**_OPTIONAL_KEYS, **ddconfig}
    for key, needed in (("double_z", False), ("resamp_with_conv", True)):
        if bool(config[key]) != needed:
            raise ValueError(f"ddconfig[{key!r}] must be {needed} for a VQGAN, got {config[key]!r}")
    return config
