"""EMA codebook update (VQ-VAE-EMA, Sonnet) and its per-code statistics, the public ops.

``code_counts_and_sums`` makes one pass over z; ``ema_update_`` adds a small
per-code finalize and writes the state and the codebook in place. They are
separate so that a caller can all-reduce the statistics across processes and
pass them as ``ema_update_(..., stats=(counts, sums))``. Backends: C++ CPU,
CUDA, Triton (on a GPU both do one atomic pass over z and a two-launch
finalize) and the reference; ``DISPATCH`` says which ``auto`` prefers.
Out-of-range indices raise on a CPU and are skipped on a GPU, where checking
them would cost a host sync (``code_counts_and_sums``).
"""
from __future__ import annotations

import math

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._layout import has_overlap
from vqkernels.reference import ema as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
STATE_DTYPE = torch.float32


# --- backends ------------------------------------------------------------------------------

def _run_reference_stats(z, indices, num_codes, deterministic):
    """Counts and sums by bincount / index_add; out-of-range rows go to a dropped extra code."""
    if not torch.compiler.is_compiling():
        _check_indices_on_cpu(indices, num_codes)
    valid = (indices >= 0) & (indices < num_codes)
    safe = torch.where(valid, indices, num_codes).long()
    if deterministic and z.device.type != "cpu":  # index_add_ on a GPU adds in any order
        order = torch.argsort(safe, stable=True)
        lengths = torch.bincount(safe, minlength=num_codes + 1)
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        sums = torch.segment_reduce(z.to(acc).index_select(0, order), "sum", lengths=lengths,
                                    axis=0, unsafe=True)
        return lengths[:num_codes].float(), sums[:num_codes].float()
    counts, sums = reference.code_counts_and_sums(z, safe, num_codes + 1)
    return counts[:num_codes].float(), sums[:num_codes].float()


def _run_reference_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                          bias_correction, step, deterministic):
    if stats is None:
        stats = _run_reference_stats(z, indices, cluster_size.shape[0], deterministic)
    reference.ema_update_from_stats_(cluster_size, embed_sum, codebook, *stats, decay, eps,
                                     bias_correction, step)


def _run_triton_stats(z, indices, num_codes, deterministic):
    return torch.ops.vqkernels.code_counts_and_sums_triton(z, indices, num_codes, deterministic)


def _run_triton_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                       bias_correction, step, deterministic):
    if stats is None:
        torch.ops.vqkernels.ema_update_triton(cluster_size, embed_sum, codebook, z, indices, decay,
                                              eps, bias_correction, step, deterministic)
    else:
        torch.ops.vqkernels.ema_update_from_stats_triton(cluster_size, embed_sum, codebook, *stats,
                                                         decay, eps, bias_correction, step)


def _run_compiled_stats(z, indices, num_codes, deterministic):
    return torch.ops.vqkernels.code_counts_and_sums(z, indices, num_codes, deterministic)


def _run_compiled_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                         bias_correction, step, deterministic):
    if stats is None:
        torch.ops.vqkernels.ema_update(cluster_size, embed_sum, codebook, z, indices, decay, eps,
                                       bias_correction, step, deterministic)
    else:
        torch.ops.vqkernels.ema_update_from_stats(cluster_size, embed_sum, codebook, *stats,
                                                  decay, eps, bias_correction, step)


def _compiled_limit(*, device, codebook_dtype=None, **_):
    """A stale build of vqkernels._C (loaded, but from before these ops) cannot run them."""
    reasons = []
    if _ext._C is not None and not hasattr(torch.ops.vqkernels, "ema_update"):
        reasons.append("vqkernels._C has no EMA ops (rebuild the extension)")
    if device.type == "cuda" and codebook_dtype not in (None,) + GPU_DTYPES:
        reasons.append(f"codebook dtype {codebook_dtype} is not one of {list(GPU_DTYPES)}")
    return reasons


def _codebook_limit(*, codebook_dtype=None, **_):
    if codebook_dtype is not None and codebook_dtype not in GPU_DTYPES:
        return [f"codebook dtype {codebook_dtype} is not one of {list(GPU_DTYPES)}"]
    return []


STATS_DISPATCH = OpDispatch(
    op="code_counts_and_sums",
    backends={
        "reference": Backend("reference", _run_reference_stats),
        "cpu": Backend("cpu", _run_compiled_stats, DTYPES, _compiled_limit),
        "cuda": Backend("cuda", _run_compiled_stats, GPU_DTYPES, _compiled_limit),
        "triton": Backend("triton", _run_triton_stats, GPU_DTYPES),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)

# auto on CUDA (both dispatches): each GPU backend makes one atomic pass over z; CUDA
# goes first, as measured on an H200 (EMA update at N=65536 K=1024 D=256 bf16: CUDA 97 us,
# Triton 222 us; benchmarks/results/2026-12-04-h200-bench.json).
DISPATCH = OpDispatch(
    op="ema_update_",
    backends={
        "reference": Backend("reference", _run_reference_update),
        "cpu": Backend("cpu", _run_compiled_update, DTYPES, _compiled_limit),
        "cuda": Backend("cuda", _run_compiled_update, GPU_DTYPES, _compiled_limit),
        "triton": Backend("triton", _run_triton_update, GPU_DTYPES, _codebook_limit),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)


# --- public API ----------------------------------------------------------------------------

def code_counts_and_sums(
    z: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    deterministic: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code assignment counts and sums of the assigned rows, in one pass over z.

        counts[k]  = #{n : indices[n] = k}                      float32 (K,)
        sums[k, :] = sum_{n : indices[n] = k} z[n, :]           float32 (K, D)

    ``z`` (N, D) float32 / float16 / bfloat16 (float64 on CPU), accumulated in
    float32; ``indices`` (N,) int64 or int32 in [0, num_codes).
    ``deterministic``: see ``ema_update_``.

    Out-of-range indices: on a CPU tensor they raise ValueError before anything
    is written (the C++ kernel checks while counting; the reference and the
    Triton interpreter check in Python, a host read that is free on a CPU, and
    skipped while torch.compile traces the reference). On a GPU nothing is
    checked on the host (no sync): every kernel skips such rows, which then
    count for no code.
    """
    _check_int("num_codes", num_codes, minimum=1)
    _validate_batch(z, indices)
    run = STATS_DISPATCH.select(backend, z.device, z.dtype).run
    return run(z.contiguous(), indices.contiguous(), num_codes, bool(deterministic))


def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    z: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    *,
    decay: float,
    eps: float = 1e-5,
    bias_correction: bool = False,
    step: int | None = None,
    deterministic: bool = False,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> None:
    """One EMA codebook step, in place on ``cluster_size``, ``embed_sum`` and ``codebook``.

    With ``counts, sums = code_counts_and_sums(z, indices, K)`` (or ``stats``)::

        cluster_size = decay * cluster_size + (1 - decay) * counts      (stored)
        embed_sum    = decay * embed_sum    + (1 - decay) * sums        (stored)
        c = 1 / (1 - decay**step) if bias_correction else 1             (Sonnet zero-debias)
        n, e = c * cluster_size, c * embed_sum                          (not stored)
        total = sum_k n[k]
        smoothed[k] = (n[k] + eps) / (total + K * eps) * total          (Laplace)
        codebook[k] = e[k] / smoothed[k]   (kept as is where smoothed[k] == 0)

    State: ``cluster_size`` (K,) and ``embed_sum`` (K, D) float32, in any
    layout whose elements do not share memory (a non-contiguous buffer is
    updated through one contiguous copy, written back; an expanded one raises
    ValueError). ``codebook`` (K, D) float32 or z's dtype, receives the result rounded to
    its dtype. ``z`` (N, D) float32 / float16 / bfloat16 (float64 on CPU) and
    ``indices`` (N,) int64 / int32 (out-of-range rows as in ``code_counts_and_sums``:
    on a CPU the error comes before any state is written); or, instead of both,
    ``stats=(counts (K,), sums (K, D))`` float32 (e.g. all-reduced across
    processes). ``0 <= decay <= 1``; with ``bias_correction``, ``step >= 1`` and
    ``decay < 1``.
    Runs without autograd (``codebook`` may be a Parameter). Returns None.

    ``deterministic=True``: bitwise the same result on every run, CPU thread
    count and GPU grid. Its cost: none on CPU, where every path already sums
    each code's rows in row order (so the C++ result never depends on the
    thread count). On a GPU the atomics are replaced by a stable sort of the
    indices (torch's radix sort, ~16 N bytes more) and a segmented sum: CUDA
    sums each (code, column) sequentially in row order, bitwise equal to the
    C++ CPU kernel, and slower than atomics when a few codes hold most rows;
    Triton reduces BLOCK_J-row tiles with a fixed tree.
    """
    _validate_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                     bias_correction, step)
    if stats is None:
        device, dtype = z.device, z.dtype
        z, indices = z.contiguous(), indices.contiguous()
    else:
        device, dtype = cluster_size.device, STATE_DTYPE
        stats = (stats[0].contiguous(), stats[1].contiguous())
    run = DISPATCH.select(backend, device, dtype, codebook_dtype=codebook.dtype).run
    state = (cluster_size, embed_sum, codebook)
    with torch.no_grad():
        dense = tuple(x.contiguous() for x in state)  # the kernels write contiguous buffers
        run(*dense, z, indices, stats, float(decay), float(eps),
            bool(bias_correction), int(step) if bias_correction else 1, bool(deterministic))
        for x, y in zip(state, dense):
            if y is not x:
                x.copy_(y)


# --- validation ----------------------------------------------------------------------------

def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _validate_batch(z, indices):
    _check_tensor("z", z)
    _check_tensor("indices", indices)
    if z.dim() != 2 or z.shape[1] < 1:
        raise ValueError(f"z must be 2-D (N, D) with D >= 1, got shape {tuple(z.shape)}")
    if z.dtype not in DTYPES:
        raise TypeError(f"z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != z.shape[0]:
        raise ValueError(f"indices must be 1-D of length N = {z.shape[0]} (z's rows), got shape "
                         f"{tuple(indices.shape)}")
    if indices.device != z.device:
        raise ValueError(f"indices must be on z's device {z.device}, got {indices.device}")


def _check_indices_on_cpu(indices, num_codes):
    """Out-of-range indices raise on CPU (a free host read); GPU kernels skip them (no sync)."""
    if indices.device.type != "cpu" or indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_codes:
        bad = low if low < 0 else high
        raise ValueError(f"indices must be in [0, {num_codes}) (the number of codes), found {bad}")


def _check_state(name, x, shape, device):
    _check_tensor(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on cluster_size's device {device}, got {x.device}")
    if has_overlap(x):
        raise ValueError(f"{name} must not have elements sharing memory (it is updated in "
                         f"place), got strides {x.stride()} for shape {tuple(x.shape)}; "
                         "pass a .clone()")


def _validate_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                     bias_correction, step):
    _check_tensor("cluster_size", cluster_size)
    if cluster_size.dim() != 1 or cluster_size.shape[0] < 1:
        raise ValueError(f"cluster_size must be 1-D (K,) with K >= 1, got shape "
                         f"{tuple(cluster_size.shape)}")
    _check_tensor("embed_sum", embed_sum)
    if embed_sum.dim() != 2:
        raise ValueError(f"embed_sum must be 2-D (K, D), got shape {tuple(embed_sum.shape)}")
    k, d = cluster_size.shape[0], embed_sum.shape[1]
    device = cluster_size.device
    for name, x, shape in (("cluster_size", cluster_size, (k,)), ("embed_sum", embed_sum, (k, d)),
                           ("codebook", codebook, (k, d))):
        _check_state(name, x, shape, device)
    for name, x in (("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if x.dtype != STATE_DTYPE:
            raise TypeError(f"{name} must be float32 (the EMA state), got {x.dtype}")
    if codebook.dtype not in DTYPES:
        raise TypeError(f"codebook must be float32, float16, bfloat16 or float64, got "
                        f"{codebook.dtype}")
    if stats is None:
        if z is None or indices is None:
            raise ValueError("pass z and indices, or stats=(counts, sums)")
        _validate_batch(z, indices)
        if z.shape[1] != d:
            raise ValueError(f"z must have D = {d} columns (embed_sum's), got shape "
                             f"{tuple(z.shape)}")
        if z.device != device:
            raise ValueError(f"z must be on cluster_size's device {device}, got {z.device}")
        if codebook.dtype not in (STATE_DTYPE, z.dtype):
            raise TypeError(f"codebook must be float32 or z's dtype {z.dtype}, got {codebook.dtype}")
    else:
        _validate_stats(stats, k, d, device, z, indices)
    _validate_scalars(decay, eps, bias_correction, step)


def _validate_stats(stats, k, d, device, z, indices):
    if z is not None or indices is not None:
        raise ValueError("pass either z and indices or stats=(counts, sums), not both")
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise TypeError("stats must be a pair (counts, sums)")
    for name, x, shape in (("stats counts", stats[0], (k,)), ("stats sums", stats[1], (k, d))):
        _check_tensor(name, x)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.dtype != STATE_DTYPE:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} must be on cluster_size's device {device}, got {x.device}")


def _validate_scalars(decay, eps, bias_correction, step):
    for name, value in (("decay", decay), ("eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(bias_correction, bool):
        raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__}")
    if bias_correction:
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"step must be an int >= 1 when bias_correction is set, got {step!r}")
        if decay == 1.0:
            raise ValueError("decay must be < 1 when bias_correction is set (1 - decay**step "
                             "would be 0)")


# --- torch.library registration ------------------------------------------------------------

_MUTATED = ("cluster_size", "embed_sum", "codebook")


def _fake_stats(z, indices, num_codes, deterministic):
    return (z.new_empty(num_codes, dtype=torch.float32),
            z.new_empty((num_codes, z.shape[1]), dtype=torch.float32))


def _fake_update(*args):
    return None


@torch.library.custom_op("vqkernels::code_counts_and_sums_triton", mutates_args=())
def _code_counts_and_sums_triton(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from vqkernels.triton import ema as triton_ema  # imports triton on first use

    _check_indices_on_cpu(indices, num_codes)  # the interpreter; GPU kernels skip them
    return triton_ema.code_counts_and_sums(z, indices, num_codes, deterministic)


@torch.library.custom_op("vqkernels::ema_update_triton", mutates_args=_MUTATED)
def _ema_update_triton(cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                       codebook: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
                       decay: float, eps: float, bias_correction: bool, step: int,
                       deterministic: bool) -> None:
    from vqkernels.triton import ema as triton_ema

    _check_indices_on_cpu(indices, cluster_size.shape[0])
    triton_ema.ema_update(cluster_size, embed_sum, codebook, z, indices, decay, eps,
                          bias_correction, step, deterministic)


@torch.library.custom_op("vqkernels::ema_update_from_stats_triton", mutates_args=_MUTATED)
def _ema_update_from_stats_triton(cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                                  codebook: torch.Tensor, counts: torch.Tensor,
                                  sums: torch.Tensor, decay: float, eps: float,
                                  bias_correction: bool, step: int) -> None:
    from vqkernels.triton import ema as triton_ema

    triton_ema.ema_update_from_stats(cluster_size, embed_sum, codebook, counts, sums, decay, eps,
                                     bias_correction, step)


torch.library.register_fake("vqkernels::code_counts_and_sums_triton", _fake_stats)
torch.library.register_fake("vqkernels::ema_update_triton", _fake_update)
torch.library.register_fake("vqkernels::ema_update_from_stats_triton", _fake_update)
if _ext._C is not None and hasattr(torch.ops.vqkernels, "ema_update"):
    torch.library.register_fake("vqkernels::code_counts_and_sums", _fake_stats)
    torch.library.register_fake("vqkernels::ema_update", _fake_update)
    torch.library.register_fake("vqkernels::ema_update_from_stats", _fake_update)
