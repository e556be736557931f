"""Argument checks of the EMA ops (ops.ema): a ``ValueError`` / ``TypeError`` naming the
argument."""
from __future__ import annotations

import math

import torch

from vqkernels.ops._layout import has_overlap

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
STATE_DTYPE = torch.float32


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def validate_batch(z, indices):
    check_tensor("z", z)
    check_tensor("indices", indices)
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


def check_indices_on_cpu(indices, num_codes):
    """Out-of-range indices raise on CPU (a free host read); GPU kernels skip them (no sync)."""
    if indices.device.type != "cpu" or indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_codes:
        bad = low if low < 0 else high
        raise ValueError(f"indices must be in [0, {num_codes}) (the number of codes), found {bad}")


def _check_state(name, x, shape, device):
    check_tensor(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on cluster_size's device {device}, got {x.device}")
    if has_overlap(x):
        raise ValueError(f"{name} must not have elements sharing memory (it is updated in "
                         f"place), got strides {x.stride()} for shape {tuple(x.shape)}; "
                         "pass a .clone()")


def validate_update(cluster_size, embed_sum, codebook, z, indices, stats, decay, eps,
                     bias_correction, step):
    check_tensor("cluster_size", cluster_size)
    if cluster_size.dim() != 1 or cluster_size.shape[0] < 1:
        raise ValueError(f"cluster_size must be 1-D (K,) with K >= 1, got shape "
                         f"{tuple(cluster_size.shape)}")
    check_tensor("embed_sum", embed_sum)
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
        validate_batch(z, indices)
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


def validate_stages(cluster_sizes, embed_sums, codebooks, stats, decay, eps, bias_correction,
                     step) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each stage checked as ``ema_update_`` checks it (errors name the stage), all on one
    device and of one D."""
    columns = {"cluster_sizes": cluster_sizes, "embed_sums": embed_sums, "codebooks": codebooks,
               "stats": stats}
    for name, column in columns.items():
        if not isinstance(column, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple (one entry a stage), got "
                            f"{type(column).__name__}")
    if not cluster_sizes or len({len(column) for column in columns.values()}) != 1:
        raise ValueError("cluster_sizes, embed_sums, codebooks and stats must hold one entry a "
                         "stage, at least one, got " +
                         ", ".join(f"{len(c)} {name}" for name, c in columns.items()))
    states = list(zip(cluster_sizes, embed_sums, codebooks))
    for q, (state, stage_stats) in enumerate(zip(states, stats)):
        try:
            validate_update(*state, None, None, stage_stats, decay, eps, bias_correction, step)
        except (TypeError, ValueError) as error:
            raise type(error)(f"stage {q}: {error}") from None
        if state[0].device != states[0][0].device or state[1].shape[1] != states[0][1].shape[1]:
            raise ValueError(f"stage {q}: every stage must be on one device with one D, got "
                             f"{state[0].device} and D = {state[1].shape[1]} after "
                             f"{states[0][0].device} and D = {states[0][1].shape[1]}")
    return states


def _validate_stats(stats, k, d, device, z, indices):
    if z is not None or indices is not None:
        raise ValueError("pass either z and indices or stats=(counts, sums), not both")
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise TypeError("stats must be a pair (counts, sums)")
    for name, x, shape in (("stats counts", stats[0], (k,)), ("stats sums", stats[1], (k, d))):
        check_tensor(name, x)
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
