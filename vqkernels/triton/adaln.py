"""adaLN-Zero glue of a DiT block, Triton kernels (math in vqkernels/reference/adaln.py).

A row is one token (b, t) of x (B, T, D), read through its strides (unit along
D); shift, scale and gate rows through (stride_b, stride_t), stride_t = 0 when
they are per sample. A row of up to ``MAX_TILE`` columns stays in registers, so
each input is read once; wider rows loop over column tiles and read again from
cache. Gradients summed over T go to float32 partials (B, chunks, D), one per
program, that torch reduces in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _interpreter

MAX_TILE = 8192
ROWS_PER_PROGRAM = 64  # the most rows one program sums a per-sample gradient over


@triton.jit
def _offset(b, t, stride_b, stride_t):
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _residual_tile(x_ptr, x_off, gate_ptr, gate_off, y_ptr, y_off, cols, mask,
                   HAS_RESIDUAL: tl.constexpr):
    """x at ``cols`` of one row, or x + gate * y rounded to x's dtype; as float32."""
    x = tl.load(x_ptr + x_off + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        gate = tl.load(gate_ptr + gate_off + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_off + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + gate * y).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _modulate_tile(v, mean, rstd, cols, mask, shift_ptr, shift_off, scale_ptr, scale_off,
                   h_ptr, x_new_ptr, out_off, HAS_RESIDUAL: tl.constexpr):
    """Store h = (v - mean) * rstd * (1 + scale) + shift, and v as x_new when HAS_RESIDUAL."""
    shift = tl.load(shift_ptr + shift_off + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + scale_off + cols, mask=mask, other=0.0).to(tl.float32)
    h = (v - mean) * rstd * (1.0 + scale) + shift
    tl.store(h_ptr + out_off + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_RESIDUAL:
        tl.store(x_new_ptr + out_off + cols, v.to(x_new_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_forward_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, x_new_ptr, mean_ptr, rstd_ptr,
    x_sb, x_st, y_sb, y_st, gate_sb, gate_st, shift_sb, shift_st, scale_sb, scale_st,
    T, D, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """One row: v = x (+ gate * y), mean = mean_D v, rstd = 1 / sqrt(mean_D (v - mean)^2 + eps),
    h = (v - mean) * rstd * (1 + scale) + shift.

    Bytes: reads x (and gate, y), writes h (and x_new) and 8 bytes of statistics;
    ~8 FLOPs per element. rstd uses rsqrt.approx (~2 ulp).
    """
    row = tl.program_id(0)
    b, t = row // T, row % T
    x_off, y_off = _offset(b, t, x_sb, x_st), _offset(b, t, y_sb, y_st)
    gate_off = _offset(b, t, gate_sb, gate_st)
    shift_off, scale_off = _offset(b, t, shift_sb, shift_st), _offset(b, t, scale_sb, scale_st)
    out_off = row.to(tl.int64) * D
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        v = _residual_tile(x_ptr, x_off, gate_ptr, gate_off, y_ptr, y_off, cols, mask, HAS_RESIDUAL)
        mean = tl.sum(v, 0) / D
        centered = tl.where(mask, v - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(centered * centered, 0) / D + eps)
        _modulate_tile(v, mean, rstd, cols, mask, shift_ptr, shift_off, scale_ptr, scale_off,
                       h_ptr, x_new_ptr, out_off, HAS_RESIDUAL)
    else:
        total = tl.zeros([BLOCK_D], tl.float32)
        for c0 in _interpreter.runtime_range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            total += _residual_tile(x_ptr, x_off, gate_ptr, gate_off, y_ptr, y_off, cols,
                                    cols < D, HAS_RESIDUAL)
        mean = tl.sum(total, 0) / D
        squares = tl.zeros([BLOCK_D], tl.float32)
        for c0 in _interpreter.runtime_range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            v = _residual_tile(x_ptr, x_off, gate_ptr, gate_off, y_ptr, y_off, cols, cols < D,
                               HAS_RESIDUAL)
            centered = tl.where(cols < D, v - mean, 0.0)
            squares += centered * centered
        rstd = tl.math.rsqrt(tl.sum(squares, 0) / D + eps)
        for c0 in _interpreter.runtime_range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            v = _residual_tile(x_ptr, x_off, gate_ptr, gate_off, y_ptr, y_off, cols, cols < D,
                               HAS_RESIDUAL)
            _modulate_tile(v, mean, rstd, cols, cols < D, shift_ptr, shift_off, scale_ptr,
                           scale_off, h_ptr, x_new_ptr, out_off, HAS_RESIDUAL)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _grad_tile(grad_h_ptr, gh_off, x_ptr, x_off, scale_ptr, scale_off, mean, rstd, cols, mask):
    """(g, xhat, gs = g * (1 + scale)) at ``cols`` of one row, float32; zeros where masked."""
    g = tl.load(grad_h_ptr + gh_off + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + x_off + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + scale_off + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    return g, xhat, g * (1.0 + scale)


@triton.jit
def _store_input_grad(gs, xhat, mean_gs, mean_gs_xhat, rstd, cols, mask, grad_x_ptr, out_off,
                      grad_x_new_ptr, gxn_off, HAS_GRAD_X_NEW: tl.constexpr):
    dx = (gs - mean_gs - xhat * mean_gs_xhat) * rstd
    if HAS_GRAD_X_NEW:
        dx += tl.load(grad_x_new_ptr + gxn_off + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + out_off + cols, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_backward_kernel(
    grad_h_ptr, grad_x_new_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr,
    grad_x_ptr, shift_partial_ptr, scale_partial_ptr,
    gh_sb, gh_st, gxn_sb, gxn_st, x_sb, x_st, scale_sb, scale_st, T, D, chunks,
    ROWS: tl.constexpr, HAS_GRAD_X_NEW: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """ROWS rows of sample b, with g = dL/dh, gs = g (1 + scale), xhat = (x - mean) rstd:

        dx = rstd (gs - mean_D gs - xhat mean_D(gs xhat)) (+ dL/dx_new)
        shift_partial[b, chunk] = sum_rows g,  scale_partial[b, chunk] = sum_rows g xhat

    Bytes: reads grad_h, x (and grad_x_new), writes dx, plus 8 bytes per
    column and program of partials. Wide rows (not ONE_TILE) take ROWS = 1.
    """
    pid = tl.program_id(0)
    b, chunk = pid // chunks, pid % chunks
    partial_off = pid.to(tl.int64) * D
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_D)
        shift_sum = tl.zeros([BLOCK_D], tl.float32)
        scale_sum = tl.zeros([BLOCK_D], tl.float32)
        for i in range(ROWS):
            t = chunk * ROWS + i
            valid = t < T
            mask = (cols < D) & valid
            row = b.to(tl.int64) * T + t
            mean = tl.load(mean_ptr + row, mask=valid, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=valid, other=0.0)
            g, xhat, gs = _grad_tile(grad_h_ptr, _offset(b, t, gh_sb, gh_st), x_ptr,
                                     _offset(b, t, x_sb, x_st), scale_ptr,
                                     _offset(b, t, scale_sb, scale_st), mean, rstd, cols, mask)
            _store_input_grad(gs, xhat, tl.sum(gs, 0) / D, tl.sum(gs * xhat, 0) / D, rstd, cols,
                              mask, grad_x_ptr, row * D, grad_x_new_ptr,
                              _offset(b, t, gxn_sb, gxn_st), HAS_GRAD_X_NEW)
            shift_sum += g
            scale_sum += g * xhat
        tl.store(shift_partial_ptr + partial_off + cols, shift_sum, mask=cols < D)
        tl.store(scale_partial_ptr + partial_off + cols, scale_sum, mask=cols < D)
    else:
        t = chunk
        row = b.to(tl.int64) * T + t
        mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
        gh_off, x_off = _offset(b, t, gh_sb, gh_st), _offset(b, t, x_sb, x_st)
        scale_off, gxn_off = _offset(b, t, scale_sb, scale_st), _offset(b, t, gxn_sb, gxn_st)
        gs_total = tl.zeros([BLOCK_D], tl.float32)
        gs_xhat_total = tl.zeros([BLOCK_D], tl.float32)
        for c0 in _interpreter.runtime_range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            g, xhat, gs = _grad_tile(grad_h_ptr, gh_off, x_ptr, x_off, scale_ptr, scale_off,
                                     mean, rstd, cols, cols < D)
            gs_total += gs
            gs_xhat_total += gs * xhat
        mean_gs, mean_gs_xhat = tl.sum(gs_total, 0) / D, tl.sum(gs_xhat_total, 0) / D
        for c0 in _interpreter.runtime_range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            g, xhat, gs = _grad_tile(grad_h_ptr, gh_off, x_ptr, x_off, scale_ptr, scale_off,
                                     mean, rstd, cols, mask)
            _store_input_grad(gs, xhat, mean_gs, mean_gs_xhat, rstd, cols, mask, grad_x_ptr,
                              row * D, grad_x_new_ptr, gxn_off, HAS_GRAD_X_NEW)
            tl.store(shift_partial_ptr + partial_off + cols, g, mask=mask)
            tl.store(scale_partial_ptr + partial_off + cols, g * xhat, mask=mask)


@triton.jit
def _gated_residual_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, x_sb, x_st, gate_sb, gate_st,
                           y_sb, y_st, T, D, BLOCK_D: tl.constexpr):
    """out[b, t, cols] = x + gate * y (float32 math). Reads x, y, gate; writes out."""
    row = tl.program_id(0)
    b, t = row // T, row % T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    v = _residual_tile(x_ptr, _offset(b, t, x_sb, x_st), gate_ptr, _offset(b, t, gate_sb, gate_st),
                       y_ptr, _offset(b, t, y_sb, y_st), cols, cols < D, True)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, v.to(out_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _gated_residual_backward_kernel(
    grad_ptr, gate_ptr, y_ptr, grad_y_ptr, gate_partial_ptr,
    grad_sb, grad_st, gate_sb, gate_st, y_sb, y_st, T, D, chunks,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ROWS rows of sample b: dy = gate * g; gate_partial[b, chunk] = sum_rows g * y."""
    pid = tl.program_id(0)
    b, chunk = pid // chunks, pid % chunks
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    gate_sum = tl.zeros([BLOCK_D], tl.float32)
    for i in range(ROWS):
        t = chunk * ROWS + i
        mask = (cols < D) & (t < T)
        g = tl.load(grad_ptr + _offset(b, t, grad_sb, grad_st) + cols, mask=mask, other=0.0)
        gate = tl.load(gate_ptr + _offset(b, t, gate_sb, gate_st) + cols, mask=mask, other=0.0)
        y = tl.load(y_ptr + _offset(b, t, y_sb, y_st) + cols, mask=mask, other=0.0)
        g = g.to(tl.float32)
        dy = gate.to(tl.float32) * g
        tl.store(grad_y_ptr + (b.to(tl.int64) * T + t) * D + cols,
                 dy.to(grad_y_ptr.dtype.element_ty), mask=mask)
        gate_sum += g * y.to(tl.float32)
    tl.store(gate_partial_ptr + pid.to(tl.int64) * D + cols, gate_sum, mask=cols < D)


# --- launchers: validated tensors in (vqkernels/ops/adaln.py), contiguous outputs ----------

def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(stride_b, stride_t) of a (B, T, D) tensor, or of a (B, D) one broadcast over T."""
    return t.stride(0), (t.stride(1) if t.dim() == 3 else 0)


def _row_tile(d: int) -> tuple[int, bool]:
    """(BLOCK_D, whether one tile holds the whole row)."""
    block = triton.next_power_of_2(d)
    return (block, True) if block <= MAX_TILE else (MAX_TILE, False)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def _rows_per_program(param: torch.Tensor, b: int, t: int, one_tile: bool,
                      rows: int | None) -> int:
    """Rows a program sums over: 1 for per-token gradients or wide rows; else enough
    programs (~1024) to fill the GPU with the fewest partials."""
    if param.dim() == 3 or not one_tile:
        return 1
    if rows is None:
        rows = min(ROWS_PER_PROGRAM, triton.next_power_of_2(max(1, b * t // 1024)))
    return rows


def _param_grad(partial: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The (B, chunks, D) partials as param's gradient: summed over chunks when per sample."""
    return (partial if param.dim() == 3 else partial.sum(1)).to(param.dtype)


def adaln_forward(x, shift, scale, gate, y, eps):
    """(h, x_new or an empty (0,) tensor, mean, rstd) of vqkernels::adaln_forward."""
    b, t, d = x.shape
    residual = gate is not None
    h = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    x_new = torch.empty_like(h) if residual else x.new_empty((0,))
    mean, rstd = (torch.empty((b, t), dtype=torch.float32, device=x.device) for _ in range(2))
    if b * t == 0:
        return h, x_new, mean, rstd
    gate, y = (gate, y) if residual else (x, x)
    block, one_tile = _row_tile(d)
    with _device.on_device(x):
        _adaln_forward_kernel[(b * t,)](
            x, y, gate, shift, scale, h, x_new if residual else h, mean, rstd,
            *_strides(x), *_strides(y), *_strides(gate), *_strides(shift), *_strides(scale),
            t, d, eps, HAS_RESIDUAL=residual, BLOCK_D=block, ONE_TILE=one_tile,
            num_warps=_warps(block))
    return h, x_new, mean, rstd


def adaln_backward(grad_h, grad_x_new, x, scale, mean, rstd, rows_per_program=None):
    """(grad_x, grad_shift, grad_scale) of vqkernels::adaln_backward."""
    b, t, d = x.shape
    block, one_tile = _row_tile(d)
    rows = _rows_per_program(scale, b, t, one_tile, rows_per_program)
    chunks = triton.cdiv(t, rows)
    grad_x = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    shift_partial, scale_partial = (torch.empty((b, chunks, d), dtype=torch.float32,
                                                device=x.device) for _ in range(2))
    if b * chunks > 0:
        has_grad_x_new = grad_x_new is not None
        grad_x_new = grad_x_new if has_grad_x_new else grad_h
        with _device.on_device(x):
            _adaln_backward_kernel[(b * chunks,)](
                grad_h, grad_x_new, x, scale, mean, rstd, grad_x, shift_partial, scale_partial,
                *_strides(grad_h), *_strides(grad_x_new), *_strides(x), *_strides(scale),
                t, d, chunks, ROWS=rows, HAS_GRAD_X_NEW=has_grad_x_new, BLOCK_D=block,
                ONE_TILE=one_tile, num_warps=_warps(block))
    return grad_x, _param_grad(shift_partial, scale), _param_grad(scale_partial, scale)


def gated_residual_forward(x, gate, y):
    """x + gate * y of vqkernels::gated_residual_forward."""
    b, t, d = x.shape
    out = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    if b * t == 0:
        return out
    block = min(triton.next_power_of_2(d), 1024)
    with _device.on_device(x):
        _gated_residual_kernel[(b * t, triton.cdiv(d, block))](
            x, gate, y, out, *_strides(x), *_strides(gate), *_strides(y), t, d, BLOCK_D=block)
    return out


def gated_residual_backward(grad, gate, y, rows_per_program=None):
    """(grad_gate, grad_y) of vqkernels::gated_residual_backward."""
    b, t, d = y.shape
    rows = _rows_per_program(gate, b, t, True, rows_per_program)
    chunks = triton.cdiv(t, rows)
    grad_y = torch.empty((b, t, d), dtype=y.dtype, device=y.device)
    gate_partial = torch.empty((b, chunks, d), dtype=torch.float32, device=y.device)
    if b * chunks > 0:
        block = min(triton.next_power_of_2(d), 1024)
        with _device.on_device(y):
            _gated_residual_backward_kernel[(b * chunks, triton.cdiv(d, block))](
                grad, gate, y, grad_y, gate_partial, *_strides(grad), *_strides(gate),
                *_strides(y), t, d, chunks, ROWS=rows, BLOCK_D=block)
    return _param_grad(gate_partial, gate), grad_y
