"""Non-causal scaled dot-product attention: launchers of the Triton kernels (FlashAttention-2
style; math in vqkernels/reference/attention.py::attention_lse).

Block shapes must be powers of two, so a head of width d is one tile of
BLOCK_D = the next power of two >= 16, the columns past d masked (d = 72 runs
128 columns). Splitting d into a power-of-two part and a remainder (72 = 64 + 16,
each product two chained dots) saves those FLOPs, but Triton 3.6 miscompiles it
on sm_90: wrong outputs and gradients and out-of-range shared-memory accesses
for every split width tried (d = 40 to 96, fp16 and bf16), while the padded tile
was correct, memcheck-clean and no slower (133 us against 144 us at
(64, 16, 256, 72) bf16; H200, 2026-12-04, benchmarks/results/2026-12-04-h200).
Exponentials are base 2 (the scale carries log2 e); lse is stored in natural
log. fp32 dots are IEEE; fp16 / bf16 dot operands stay in the input dtype (P
and dS too), accumulating in fp32. Inputs are read through their strides (DiT's
permuted views of a packed qkv tensor need no copy); the last stride must be 1.
"""
from __future__ import annotations

import math

import torch
import triton

from vqkernels.triton import _device
from vqkernels.triton._attention_backward import (_attention_delta_kernel, _attention_dkdv_kernel,
                                                  _attention_dq_kernel)
from vqkernels.triton._attention_forward import _attention_forward_kernel

_LOG2E = math.log2(math.e)


def _block_d(d: int) -> int:
    """The column tile of a head of width d: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


def _cfg(block_m, block_n, num_warps, num_stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _configs(dtype: torch.dtype, d: int) -> dict[str, dict]:
    """Launch config of each kernel (``forward``, ``delta``, ``dkdv``, ``dq``); width = BLOCK_D.

    Half dtypes: the forward is FlashAttention-2's 128 x 64 tile in 8 warps
    (two wgmma warpgroups) with a 3-stage K/V pipeline; the backward holds two
    (64, width) fp32 accumulators and two operand tiles per program, hence
    64 x 64 tiles. Past width 128 the streamed tile halves to fit shared memory
    and registers. fp32 dots run on the CUDA cores (IEEE), their operands held
    in registers replicated per thread: small tiles.
    """
    width = _block_d(d)
    if dtype == torch.float32:
        if width <= 64:
            fwd, dkdv, dq = _cfg(64, 32, 8, 3), _cfg(32, 32, 8, 2), _cfg(32, 32, 8, 2)
        elif width <= 128:
            fwd, dkdv, dq = _cfg(32, 32, 8, 2), _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2)
        else:
            fwd, dkdv, dq = _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2)
    elif width <= 128:
        warps = 4 if width <= 64 else 8
        fwd, dkdv, dq = _cfg(128, 64, 8, 3), _cfg(64, 64, warps, 2), _cfg(64, 64, warps, 2)
    else:
        fwd, dkdv, dq = _cfg(128, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(64, 32, 8, 2)
    delta = dict(BLOCK_M=max(16, 4096 // width), num_warps=4, num_stages=1)
    return dict(forward=fwd, delta=delta, dkdv=dkdv, dq=dq)


def _alignment(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 bytes (in elements) dividing every address and outer stride."""
    size = tensors[0].element_size()
    align = max(1, 16 // size)
    for t in tensors:
        for value in (t.data_ptr() // size, *t.stride()[:-1]):
            while value % align:
                align //= 2
    return align


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Sq, d) contiguous in q's dtype, lse (B, H, Sq) float32 contiguous.

    q (B, H, Sq, d), k and v (B, H, Sk >= 1, d): one dtype (fp16 / bf16 /
    fp32), last stride 1, other strides arbitrary; validated by vqkernels.ops.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = _configs(q.dtype, d)["forward"]
    grid = (b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)
    with _device.on_device(q):
        _attention_forward_kernel[grid](
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), h, sq, sk,
            scale * _LOG2E, HEAD_DIM=d, BLOCK_D=_block_d(d), ALIGN=_alignment(q, k, v, out),
            **cfg)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_q, grad_k, grad_v: contiguous, like q, k, v (same dtype).

    grad_out (B, H, Sq, d) with last stride 1; out and lse as returned by
    attention_forward for the same q, k, v and scale.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    grad_q = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((b, h, sk, d), dtype=k.dtype, device=k.device)
    grad_v = torch.empty((b, h, sk, d), dtype=v.dtype, device=v.device)
    if grad_q.numel() == 0:
        # No queries: the gradients of k and v are sums over nothing.
        return grad_q, grad_k.zero_(), grad_v.zero_()
    lse = lse.contiguous()
    cfgs = _configs(q.dtype, d)
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    inputs = (q, k, v, grad_out)
    align = _alignment(*inputs, out, grad_q)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    constants = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), ALIGN=align)
    with _device.on_device(q):
        cfg = cfgs["delta"]
        _attention_delta_kernel[(b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)](
            out, grad_out, delta, *_strides(out), *_strides(grad_out), h, sq, **constants, **cfg)
        cfg = cfgs["dkdv"]
        _attention_dkdv_kernel[(b * h * triton.cdiv(sk, cfg["BLOCK_N"]),)](
            *inputs, lse, delta, grad_k, grad_v, *strides, h, sq, sk, scale, scale * _LOG2E,
            **constants, **cfg)
        cfg = cfgs["dq"]
        _attention_dq_kernel[(b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)](
            *inputs, lse, delta, grad_q, *strides, h, sq, sk, scale, scale * _LOG2E,
            **constants, **cfg)
    return grad_q, grad_k, grad_v
