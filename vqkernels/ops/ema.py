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

import contextlib
import re
from collections.abc import Sequence

import torch

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops._ema_checks import (DTYPES, STATE_DTYPE, check_indices_on_cpu, check_int,
                                       validate_batch, validate_stages, validate_update)
from vqkernels.reference import ema as reference

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_STAGES = 64  # csrc/cuda/kernels.h's kMaxEmaStages (a test holds them equal)


# --- backends ------------------------------------------------------------------------------

def _run_reference_stats(z, indices, num_codes, deterministic):
    """Counts and sums by bincount / index_add; out-of-range rows go to a dropped extra code."""
    if not torch.compiler.is_compiling():
        check_indices_on_cpu(indices, num_codes)
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


@contextlib.contextmanager
def _index_errors_as_value_errors():
    """The C++ CPU kernels check the indices while counting, before any write; torch's stable
    ABI carries their error as a RuntimeError, and a bad argument is a ValueError here."""
    try:
        yield
    except RuntimeError as error:
        bad_index = re.search(r"indices must be in \[0, \d+\).*", str(error))
        if bad_index is None:
            raise
        raise ValueError(bad_index.group(0)) from None


def _run_compiled_stats(z, indices, num_codes, deterministic):
    with _index_errors_as_value_errors():
        return torch.ops.vqkernels.code_counts_and_sums(z, indices, num_codes, deterministic)


def _run_compiled_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                         bias_correction, step, deterministic):
    if stats is None:
        with _index_errors_as_value_errors():
            torch.ops.vqkernels.ema_update(cluster_size, embed_sum, codebook, z, indices, decay,
                                           eps, bias_correction, step, deterministic)
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
    check_int("num_codes", num_codes, minimum=1)
    validate_batch(z, indices)
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
    validate_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                    bias_correction, step)
    _update((cluster_size, embed_sum, codebook), z, indices, stats, decay, eps, bias_correction,
            step, deterministic, backend)


def _update(state, z, indices, stats, decay, eps, bias_correction, step, deterministic, backend):
    """``ema_update_`` of validated arguments."""
    if stats is None:
        device, dtype = z.device, z.dtype
        z, indices = z.contiguous(), indices.contiguous()
    else:
        device, dtype = state[0].device, STATE_DTYPE
        stats = (stats[0].contiguous(), stats[1].contiguous())
    run = DISPATCH.select(backend, device, dtype, codebook_dtype=state[2].dtype).run
    with torch.no_grad():
        dense = tuple(x.contiguous() for x in state)  # the kernels write contiguous buffers
        run(*dense, z, indices, stats, float(decay), float(eps),
            bool(bias_correction), int(step) if bias_correction else 1, bool(deterministic))
        for x, y in zip(state, dense):
            if y is not x:
                x.copy_(y)


def _stage_by_stage(backend):
    """The update of every (validated) stage as ``ema_update_`` of each on ``backend``."""
    def run(states, stats, options):
        for state, stage_stats in zip(states, stats):
            _update(state, None, None, stage_stats, options["decay"], options["eps"],
                    options["bias_correction"], options["step"], False, backend)
    return run


def _run_cuda_stages(states, stats, options):
    """One launch pair for up to CUDA_MAX_STAGES contiguous stages of one codebook dtype."""
    if (len(states) > CUDA_MAX_STAGES or len({state[2].dtype for state in states}) != 1
            or not all(x.is_contiguous() for state in states for x in state)):
        return _stage_by_stage("cuda")(states, stats, options)
    step = options["step"] if options["bias_correction"] else 1
    with torch.no_grad():
        torch.ops.vqkernels.ema_update_from_stats_stages(
            *(list(column) for column in zip(*states)),
            [counts.contiguous() for counts, _ in stats], [sums.contiguous() for _, sums in stats],
            float(options["decay"]), float(options["eps"]), bool(options["bias_correction"]),
            int(step))


# Its own dispatch: on CUDA ``auto`` takes the launch pair of every stage once a GPU run has
# verified it (vqkernels._verified, op "ema_update_stages_"), until then Triton's updates.
STAGES_DISPATCH = OpDispatch(
    op="ema_update_stages_",
    backends={
        "reference": Backend("reference", _stage_by_stage("reference")),
        "cpu": Backend("cpu", _stage_by_stage("cpu"), DTYPES, _compiled_limit),
        "cuda": Backend("cuda", _run_cuda_stages, GPU_DTYPES, _compiled_limit),
        "triton": Backend("triton", _stage_by_stage("triton"), GPU_DTYPES, _codebook_limit),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
)


def ema_update_stages_(
    cluster_sizes: Sequence[torch.Tensor],
    embed_sums: Sequence[torch.Tensor],
    codebooks: Sequence[torch.Tensor],
    stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    decay: float,
    eps: float = 1e-5,
    bias_correction: bool = False,
    step: int | None = None,
    backend: str | None = None,
) -> None:
    """``ema_update_(cluster_sizes[q], embed_sums[q], codebooks[q], stats=stats[q], ...)`` for
    every stage q of a residual quantizer, in one call. The CUDA backend updates every
    stage's cluster sizes in one launch and every codebook in a second (up to 64 stages,
    one D and one codebook dtype; more go stage by stage); the other backends update the
    stages one by one. Each stage as ``ema_update_`` takes it (stages may differ in K);
    returns None.
    """
    states = validate_stages(cluster_sizes, embed_sums, codebooks, stats, decay, eps,
                             bias_correction, step)
    chosen = STAGES_DISPATCH.select(backend, states[0][0].device, STATE_DTYPE,
                                    codebook_dtype=states[0][2].dtype)
    chosen.run(states, list(stats), dict(decay=decay, eps=eps, bias_correction=bias_correction,
                                         step=step))


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

    check_indices_on_cpu(indices, num_codes)  # the interpreter; GPU kernels skip them
    return triton_ema.code_counts_and_sums(z, indices, num_codes, deterministic)


@torch.library.custom_op("vqkernels::ema_update_triton", mutates_args=_MUTATED)
def _ema_update_triton(cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                       codebook: torch.Tensor, z: torch.Tensor, indices: torch.Tensor,
                       decay: float, eps: float, bias_correction: bool, step: int,
                       deterministic: bool) -> None:
    from vqkernels.triton import ema as triton_ema

    check_indices_on_cpu(indices, cluster_size.shape[0])
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
if _ext._C is not None and hasattr(torch.ops.vqkernels, "ema_update_from_stats_stages"):
    torch.library.register_fake("vqkernels::ema_update_from_stats_stages", _fake_update)
