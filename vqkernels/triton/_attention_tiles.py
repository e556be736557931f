"""Device functions shared by the attention kernels: tile addressing, loads, stores and dots.

A head of width d is held as two column tiles, [0, D0) and [D0, D0 + D1),
both powers of two (vqkernels/triton/attention.py); D1 = 0 means one tile, and
the second of each pair is then 0.0 and never used.
"""
import triton
import triton.language as tl

from vqkernels.triton import _interpreter


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b in fp32: IEEE for fp32 tiles, tensor cores in the input dtype otherwise."""
    if _interpreter.INTERPRETED:
        # The interpreter's dot cannot multiply bf16 (stored as uint16); half
        # products are exact in fp32, so upcasting emulates the tensor cores.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _program(S, H, BLOCK: tl.constexpr):
    """(first row, batch, head) of this program; programs of one head are adjacent (L2 reuse)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(S, BLOCK)
    bh = pid // blocks
    return (pid % blocks) * BLOCK, tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)


@triton.jit
def _tile_ptrs(ptr, base, offs, stride, COL0: tl.constexpr, WIDTH: tl.constexpr,
               ALIGN: tl.constexpr):
    """Pointers to rows ``offs`` x columns [COL0, COL0 + WIDTH) past element ``base``.

    ALIGN (elements) divides base and stride: it lets the loads vectorize
    when d is not a multiple of 16 (d = 72).
    """
    rows = tl.multiple_of(base + tl.cast(offs, tl.int64) * stride, ALIGN)
    return ptr + rows[:, None] + (COL0 + tl.arange(0, WIDTH))[None, :]


@triton.jit
def _load_tile(ptr, base, offs, stride, n, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, MASK_ROWS: tl.constexpr):
    """(len(offs), WIDTH) tile, zero past row n (when MASK_ROWS) and past column HEAD_DIM."""
    ptrs = _tile_ptrs(ptr, base, offs, stride, COL0, WIDTH, ALIGN)
    col_ok = (COL0 + tl.arange(0, WIDTH)) < HEAD_DIM
    if MASK_ROWS:
        if COL0 + WIDTH > HEAD_DIM:
            return tl.load(ptrs, mask=(offs < n)[:, None] & col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=(offs < n)[:, None], other=0.0)
    else:
        if COL0 + WIDTH > HEAD_DIM:
            return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_tile(ptr, base, offs, stride, n, value, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    ptrs = _tile_ptrs(ptr, base, offs, stride, COL0, WIDTH, ALIGN)
    col_ok = (COL0 + tl.arange(0, WIDTH)) < HEAD_DIM
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(offs < n)[:, None] & col_ok[None, :])


@triton.jit
def _store_rows(ptr, base, offs, n, x0, x1, factor, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr):
    """Rows ``offs`` (below n) of a contiguous (.., HEAD_DIM) output: factor * (x0, x1)."""
    _store_tile(ptr, base, offs, HEAD_DIM, n, x0 * factor, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(ptr, base, offs, HEAD_DIM, n, x1 * factor, D0, D1, HEAD_DIM, ALIGN)


@triton.jit
def _reload(ptr, base, stride, n, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
            ALIGN: tl.constexpr, ROWS: tl.constexpr):
    """(x0, x1): the ``ROWS`` rows past ``base``, zero past row n.

    Loop bodies call it again for their loop-invariant fp32 dot operands (from
    L1): the FMA dot would hold them in registers replicated per thread and
    spill hundreds of bytes per thread; the held copy goes dead.
    """
    offs = tl.arange(0, ROWS)
    x0 = _load_tile(ptr, base, offs, stride, n, 0, D0, HEAD_DIM, ALIGN, True)
    x1 = 0.0
    if D1 > 0:
        x1 = _load_tile(ptr, base, offs, stride, n, D0, D1, HEAD_DIM, ALIGN, True)
    return x0, x1


@triton.jit
def _block_rows(ptr, b, h, start, sb, sh, ss, n, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                D1: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr):
    """(base, x0, x1): the offset of row ``start`` of head (b, h), and its ROWS rows (zero past n)."""
    base = b * sb + h * sh + tl.cast(start, tl.int64) * ss
    x0, x1 = _reload(ptr, base, ss, n, HEAD_DIM, D0, D1, ALIGN, ROWS)
    return base, x0, x1


@triton.jit
def _stream_products(a0, a1, a_ptr, a_base, sa_s, c0, c1, c_ptr, c_base, sc_s, n_ac,
                     x_ptr, x_base, sx_s, y_ptr, y_base, sy_s, start, offs, n,
                     HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                     ALIGN: tl.constexpr, ROWS: tl.constexpr, MASK: tl.constexpr):
    """(a x^T, c y^T, x0, x1, y0, y1) over the split head dim, for one tile of a backward loop.

    a and c are the program's own ``ROWS`` rows (reloaded here when fp32, see
    _reload); x and y are the streamed rows start + ``offs`` (zero past n when
    MASK), loaded here and returned for the caller's further products.
    """
    if a_ptr.dtype.element_ty == tl.float32:
        a0, a1 = _reload(a_ptr, a_base, sa_s, n_ac, HEAD_DIM, D0, D1, ALIGN, ROWS)
        c0, c1 = _reload(c_ptr, c_base, sc_s, n_ac, HEAD_DIM, D0, D1, ALIGN, ROWS)
    start64 = tl.cast(start, tl.int64)
    x_base += start64 * sx_s
    y_base += start64 * sy_s
    x0 = _load_tile(x_ptr, x_base, offs, sx_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    y0 = _load_tile(y_ptr, y_base, offs, sy_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    ax = _dot(a0, tl.trans(x0), tl.zeros((ROWS, offs.shape[0]), tl.float32))
    cy = _dot(c0, tl.trans(y0), tl.zeros((ROWS, offs.shape[0]), tl.float32))
    x1 = 0.0
    y1 = 0.0
    if D1 > 0:
        x1 = _load_tile(x_ptr, x_base, offs, sx_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        y1 = _load_tile(y_ptr, y_base, offs, sy_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        ax = _dot(a1, tl.trans(x1), ax)
        cy = _dot(c1, tl.trans(y1), cy)
    return ax, cy, x0, x1, y0, y1
