"""Device functions shared by the attention kernels: tile addressing, loads, stores and dots.

A head of width d is one column tile of BLOCK_D = the next power of two >= 16
(vqkernels/triton/attention.py); columns from HEAD_DIM on are masked: loaded as
zero, never stored.
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
def _tile_ptrs(ptr, base, offs, stride, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to rows ``offs`` x columns [0, BLOCK_D) past element ``base``.

    ALIGN (elements) divides base and stride: it lets the loads vectorize
    when d is not a multiple of 16 (d = 72).
    """
    rows = tl.multiple_of(base + tl.cast(offs, tl.int64) * stride, ALIGN)
    return ptr + rows[:, None] + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _load_tile(ptr, base, offs, stride, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               ALIGN: tl.constexpr, MASK_ROWS: tl.constexpr):
    """(len(offs), BLOCK_D) tile, zero past row n (when MASK_ROWS) and past column HEAD_DIM."""
    ptrs = _tile_ptrs(ptr, base, offs, stride, BLOCK_D, ALIGN)
    col_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    if MASK_ROWS:
        if BLOCK_D > HEAD_DIM:
            return tl.load(ptrs, mask=(offs < n)[:, None] & col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=(offs < n)[:, None], other=0.0)
    else:
        if BLOCK_D > HEAD_DIM:
            return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_rows(ptr, base, offs, n, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                ALIGN: tl.constexpr):
    """Rows ``offs`` (below n) of a contiguous (.., HEAD_DIM) output: x, cast to its dtype."""
    ptrs = _tile_ptrs(ptr, base, offs, HEAD_DIM, BLOCK_D, ALIGN)
    col_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=(offs < n)[:, None] & col_ok[None, :])


@triton.jit
def _reload(ptr, base, stride, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            ALIGN: tl.constexpr, ROWS: tl.constexpr):
    """The ``ROWS`` rows past ``base``, zero past row n.

    Loop bodies call it again for their loop-invariant fp32 dot operands (from
    L1): the FMA dot would hold them in registers replicated per thread and
    spill hundreds of bytes per thread; the held copy goes dead.
    """
    return _load_tile(ptr, base, tl.arange(0, ROWS), stride, n, HEAD_DIM, BLOCK_D, ALIGN, True)


@triton.jit
def _block_rows(ptr, b, h, start, sb, sh, ss, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                ALIGN: tl.constexpr, ROWS: tl.constexpr):
    """(base, x): the offset of row ``start`` of head (b, h), and its ROWS rows (zero past n)."""
    base = b * sb + h * sh + tl.cast(start, tl.int64) * ss
    return base, _reload(ptr, base, ss, n, HEAD_DIM, BLOCK_D, ALIGN, ROWS)


@triton.jit
def _stream_products(a, a_ptr, a_base, sa_s, c, c_ptr, c_base, sc_s, n_ac,
                     x_ptr, x_base, sx_s, y_ptr, y_base, sy_s, start, offs, n,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                     ROWS: tl.constexpr, MASK: tl.constexpr):
    """(a x^T, c y^T, x, y) for one tile of a backward loop.

    a and c are the program's own ``ROWS`` rows (reloaded here when fp32, see
    _reload); x and y are the streamed rows start + ``offs`` (zero past n when
    MASK), loaded here and returned for the caller's further products.
    """
    if a_ptr.dtype.element_ty == tl.float32:
        a = _reload(a_ptr, a_base, sa_s, n_ac, HEAD_DIM, BLOCK_D, ALIGN, ROWS)
        c = _reload(c_ptr, c_base, sc_s, n_ac, HEAD_DIM, BLOCK_D, ALIGN, ROWS)
    start64 = tl.cast(start, tl.int64)
    x = _load_tile(x_ptr, x_base + start64 * sx_s, offs, sx_s, n, HEAD_DIM, BLOCK_D, ALIGN, MASK)
    y = _load_tile(y_ptr, y_base + start64 * sy_s, offs, sy_s, n, HEAD_DIM, BLOCK_D, ALIGN, MASK)
    ax = _dot(a, tl.trans(x), tl.zeros((ROWS, offs.shape[0]), tl.float32))
    cy = _dot(c, tl.trans(y), tl.zeros((ROWS, offs.shape[0]), tl.float32))
    return ax, cy, x, y
