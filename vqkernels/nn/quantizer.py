"""taming-transformers' VectorQuantizer2 on the fused search, and its pure-PyTorch twin."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vqkernels import ops
from vqkernels.reference import search as reference_search


class _TamingQuantizerBase(nn.Module):
    """Constructor, remapping and reshaping of taming's ``VectorQuantizer2``.

    Subclasses supply ``_quantize(z_flat) -> (z_q, loss, indices)`` on (N, D).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: str | None = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False,
                 legacy: bool = True, *, metric: str = "l2", channel_last: bool = False,
                 compute_perplexity: bool = False):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.metric, self.channel_last = metric, channel_last
        self.compute_perplexity = compute_perplexity
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> positions in ``used``; unknown codes -> ``unknown_index``."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        match = inds[:, :, None] == self.used.to(inds)[None, None, :]
        new = match.long().argmax(-1)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            new = torch.where(unknown, torch.randint_like(new, 0, self.re_embed), new)
        else:
            new = new.masked_fill(unknown, self.unknown_index)
        return new.reshape(shape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` -> codebook indices (the "extra" token maps to used[0])."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        if self.re_embed > self.used.shape[0]:
            inds = inds.masked_fill(inds >= self.used.shape[0], 0)
        return self.used.to(inds)[inds].reshape(shape)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False,
                return_logits: bool = False):
        """(B, C, H, W) -> ``(z_q, loss, (perplexity, min_encodings, indices))`` as taming.

        ``perplexity`` is computed (on device) only with ``compute_perplexity``;
        ``min_encodings`` (an N x K one-hot) is never built and is always None.
        """
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits are only for API "
                             "compatibility with taming (temp=None, False, False)")
        if z.dim() != 4:
            raise ValueError(f"z must be 4-D ({'B, H, W, C' if self.channel_last else 'B, C, H, W'}),"
                             f" got shape {tuple(z.shape)}")
        z_bhwc = z if self.channel_last else z.permute(0, 2, 3, 1)
        if z_bhwc.shape[-1] != self.e_dim:
            raise ValueError(f"z has {z_bhwc.shape[-1]} channels, the codebook has e_dim={self.e_dim}")
        z_q, loss, indices = self._quantize(z_bhwc.reshape(-1, self.e_dim))
        perplexity = code_usage(indices, self.n_e)["perplexity"] if self.compute_perplexity else None
        z_q = z_q.view(z_bhwc.shape)
        if not self.channel_last:
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_bhwc.shape[:3])
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes of ``indices`` (unit-norm with ``metric="cosine"``, as forward returns them);
        with ``shape`` (B, H, W, C) returned as (B, C, H, W)."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        codes = self.embedding.weight
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=1)
        z_q = F.embedding(indices, codes)
        if shape is not None:
            z_q = z_q.view(shape)
            if not self.channel_last:
                z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q

    def code_usage(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Counts, perplexity and dead-code count of ``indices``, on device."""
        return code_usage(indices, self.n_e)


def code_usage(indices: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """counts[k] = #{n: indices[n] = k}; perplexity = exp(-sum p log p); dead = #{k: counts = 0}.

    No host sync (no bincount, whose size depends on the data).
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(num_codes, dtype=torch.float32, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
    return {"counts": counts, "perplexity": perplexity, "dead": (counts == 0).sum()}


class VectorQuantizer(_TamingQuantizerBase):
    """Drop-in for taming-transformers' ``VectorQuantizer2`` on vqkernels' fused search.

    Same constructor, forward contract and state_dict (``embedding.weight``, and
    ``used`` with ``remap``), so existing VQGAN checkpoints load. Extras:
    ``metric="cosine"``, ``precision``, ``backend``, ``channel_last`` input,
    ``compute_perplexity`` and ``code_usage``.
    """

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, unknown_index="random",
                 sane_index_shape=False, legacy=True, *, metric="l2",
                 precision: str | None = None, backend: str | None = None,
                 channel_last=False, compute_perplexity=False):
        super().__init__(n_e, e_dim, beta, remap, unknown_index, sane_index_shape, legacy,
                         metric=metric, channel_last=channel_last,
                         compute_perplexity=compute_perplexity)
        self.precision, self.backend = precision, backend

    def _quantize(self, z_flat):
        return ops.vector_quantize(z_flat, self.embedding.weight, beta=self.beta,
                                   legacy=self.legacy, metric=self.metric,
                                   precision=self.precision, backend=self.backend)


class ReferenceVectorQuantizer(_TamingQuantizerBase):
    """The pure-PyTorch twin of ``VectorQuantizer`` (reference ops only), for parity tests."""

    def _quantize(self, z_flat):
        return reference_search.vector_quantize(z_flat, self.embedding.weight, self.beta,
                                                self.legacy, self.metric)
