"""Reference scaled dot-product attention (non-causal, no mask).

Pure PyTorch, device-agnostic: the specification the fast backends are
tested against. Deliberately written out instead of calling
F.scaled_dot_product_attention, so it is an independent spec.
"""

from __future__ import annotations

import torch


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the log-sum-exp of its logits.

    For q (B, H, Sq, d), k (B, H, Sk, d), v (B, H, Sk, dv)::

        s = scale * q @ k^T                       (B, H, Sq, Sk), scale = d**-0.5 by default
        m = max_j s[..., j]
        lse = m + log(sum_j exp(s[..., j] - m))   = log(sum_j exp(s[..., j]))
        out = exp(s - lse) @ v                    = softmax(s) @ v

    Computed in float64 if an input is float64, else float32, with the
    softmax max-subtracted so large logits stay finite. Returns ``out``
    (B, H, Sq, dv) in q's dtype and ``lse`` (B, H, Sq) in the compute dtype
    (what FlashAttention saves for its backward). Sq = 0 gives empty outputs;
    Sk must be >= 1.
    """
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    row_max = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    out = (weights / denom) @ v.to(dtype)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out.to(q.dtype), lse


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v, non-causal; see :func:`attention_lse`.

    q (B, H, Sq, d), k (B, H, Sk, d), v (B, H, Sk, dv) -> (B, H, Sq, dv) in
    q's dtype; scale defaults to d**-0.5; float32 math (float64 for float64).
    """
    return attention_lse(q, k, v, scale)[0]
