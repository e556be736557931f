"""k-means codebook init and dead-code restart, built from the fused ops.

``nearest_code`` and ``code_counts_and_sums`` plus elementwise masks, so both
run on every backend those support and never sync with the host in one
process: the Lloyd loop has a fixed trip count, empty clusters use
``torch.where``, and dead codes meet their new rows through a slot map, not
boolean indexing (``replace_dead_codes_`` can be captured in a CUDA graph).
Under ``torch.distributed`` every rank gets what one process would on the
concatenation of all ranks' ``z``: rows are drawn by global index on rank 0,
each Lloyd step all-reduces one (K, 1 + D) ``[counts | sums]`` buffer, and
learning the ranks' batch sizes is the one host sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from vqkernels.ops._layout import has_overlap
from vqkernels.ops.ema import code_counts_and_sums
from vqkernels.ops.search import METRICS, nearest_code

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def kmeans(
    z: torch.Tensor,
    num_clusters: int,
    iters: int = 10,
    *,
    metric: str = "l2",
    generator: torch.Generator | None = None,
    progress: bool = False,
    backend: str | None = None,
    distributed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of ``z`` (N, D): ``iters`` steps from random data rows.

        init:  c = z[randperm(N)[:K]]   (N >= K)   or   z[randint(0, N, (K,))]   (N < K)
        step:  a[n] = nearest_code(z[n], c);  counts, sums = per-cluster count, sum of z
               c[k] = sums[k] / counts[k], kept as it was where counts[k] = 0

    ``metric="cosine"`` is spherical k-means (vector-quantize-pytorch's
    ``use_cosine_sim``): z's rows and the centers are l2-normalized, and so is
    each new mean. Draws use ``generator`` (on its device; the default
    generator of z's device if None). Returns ``centers`` (K, D) float32 and
    ``cluster_size`` (K,) float32, the counts of the last assignment (made
    with the centers before the last update, as vector-quantize-pytorch;
    ``iters=0`` returns the initial rows and their counts). ``progress`` shows
    a tqdm bar over the iterations. ``distributed`` (default: whether a
    multi-rank process group is initialized) makes every rank compute the
    k-means of the concatenated batch (module docstring); ``generator`` is then
    used on rank 0 only.
    """
    _validate_rows(z, "z")
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    sync = _sync(distributed)
    total, offset = _layout(z, sync)
    if total == 0:
        raise ValueError("z must have at least one row to draw the initial centers from")
    # One copy of a strided z here, not one per search and per statistics pass.
    z = z.contiguous()
    if metric == "cosine":
        z = F.normalize(z, dim=1)
    index = _draw(total, num_clusters, generator, z.device, sync, distinct_first=False)
    centers = _gather_rows(z, index, offset, sync).float()
    deterministic = torch.are_deterministic_algorithms_enabled()

    def assign(centers):
        indices, _ = nearest_code(z, centers.to(z.dtype), metric=metric, backend=backend)
        counts, sums = code_counts_and_sums(z, indices, num_clusters,
                                            deterministic=deterministic, backend=backend)
        return _all_reduce_stats(counts, sums, sync)

    counts = None
    for _ in tqdm(range(iters), desc="kmeans", disable=not progress, leave=False):
        counts, sums = assign(centers)
        means = sums / counts.clamp_min(1)[:, None]
        if metric == "cosine":
            means = F.normalize(means, dim=1)
        centers = torch.where((counts == 0)[:, None], centers, means)
    if counts is None:
        counts, _ = assign(centers)
    return centers, counts


def replace_dead_codes_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    threshold: float,
    *,
    reset_cluster_size: float | None = None,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Restart the codes whose EMA ``cluster_size`` is below ``threshold`` from rows of ``z``.

    vector-quantize-pytorch's ``expire_codes_``, with masks instead of host syncs::

        dead = cluster_size < threshold
        the dead codes get distinct random rows of z:
          N >= K: the j-th dead code (in index order) gets z[randperm(N)[j]]
          N <  K: a random subset of min(#dead, N) dead codes gets z[randperm(N)],
                  the other dead codes wait for a later batch
        for each restarted code k with row r:
          codebook[k] = r,  cluster_size[k] = reset,  embed_sum[k] = r * reset
        (reset = reset_cluster_size, default threshold)

    so a restarted code is immediately the mean its EMA state implies; every
    other code is untouched. With N >= K the draws are those of
    vector-quantize-pytorch (same generator state, same rows). codebook (K, D),
    cluster_size (K,) and embed_sum (K, D) are updated in place; z (N, D) is
    this step's batch (an empty batch restarts nothing). The random draws (from
    ``generator``, see ``kmeans``) do not depend on how many codes are dead, so
    neither does the cost, and nothing is read back to the host.
    ``distributed``: as ``kmeans``, the rows come from the concatenated batch,
    identically on every rank. Returns the (K,) bool mask of restarted codes.
    """
    _validate_state(codebook, cluster_size, embed_sum)
    _validate_rows(z, "z")
    if z.shape[1] != codebook.shape[1] or z.device != codebook.device:
        raise ValueError(f"z must be (N, {codebook.shape[1]}) on {codebook.device}, got "
                         f"{tuple(z.shape)} on {z.device}")
    for name, value in (("threshold", threshold), ("reset_cluster_size", reset_cluster_size)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    reset = threshold if reset_cluster_size is None else reset_cluster_size
    sync = _sync(distributed)
    total, offset = _layout(z, sync)
    num_codes = codebook.shape[0]
    with torch.no_grad():
        dead = cluster_size < threshold
        if total == 0:
            return torch.zeros_like(dead)
        index = _draw(total, num_codes, generator, z.device, sync, distinct_first=True)
        if total >= num_codes:
            restart, slot = dead, (torch.cumsum(dead, 0) - 1).clamp_min(0)
        else:  # rank the dead codes in a random order; the first `total` of them restart
            keys = _random_keys(num_codes, generator, z.device, sync)
            order = torch.argsort(torch.where(dead, keys, 2.0), stable=True)
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(num_codes,
                                                                           device=z.device))
            restart, slot = dead & (rank < total), rank.clamp_max(total - 1)
        new = _gather_rows(z, index, offset, sync).index_select(0, slot)
        codebook.copy_(torch.where(restart[:, None], new.to(codebook.dtype), codebook))
        cluster_size.masked_fill_(restart, reset)
        embed_sum.copy_(torch.where(restart[:, None], new.to(embed_sum.dtype) * reset, embed_sum))
    return restart


# --- sampling and the distributed plumbing ---------------------------------------------------

def in_multi_rank_group() -> bool:
    """Is a torch.distributed group of more than one rank initialized?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sync(distributed: bool | None) -> bool:
    if distributed is None:
        return in_multi_rank_group()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialized torch.distributed process group")
    return bool(distributed)


def _layout(z: torch.Tensor, sync: bool) -> tuple[int, int]:
    """(rows in the concatenated batch, index of this rank's first row in it)."""
    if not sync:
        return z.shape[0], 0
    size = torch.tensor([z.shape[0]], dtype=torch.int64, device=z.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = torch.cat(sizes).tolist()  # the one host sync, distributed only
    return sum(sizes), sum(sizes[:dist.get_rank()])


def _draw(total: int, num: int, generator, device, sync: bool, *, distinct_first: bool):
    """Row indices in [0, total), the same on every rank: randperm(total)[:num] if
    total >= num; else all of randperm(total) (``distinct_first``) or num randint draws."""
    if sync and dist.get_rank() != 0:
        count = total if distinct_first else num
        index = torch.empty(min(count, num), dtype=torch.int64, device=device)
    else:
        where = generator.device if generator is not None else device
        if total >= num or distinct_first:
            index = torch.randperm(total, generator=generator, device=where)[:num]
        else:
            index = torch.randint(0, total, (num,), generator=generator, device=where)
        index = index.to(device)
    return _broadcast(index, sync)


def _random_keys(num: int, generator, device, sync: bool) -> torch.Tensor:
    """``num`` uniform [0, 1) keys, the same on every rank."""
    if sync and dist.get_rank() != 0:
        return _broadcast(torch.empty(num, device=device), sync)
    where = generator.device if generator is not None else device
    return _broadcast(torch.rand(num, generator=generator, device=where).to(device), sync)


def _broadcast(x: torch.Tensor, sync: bool) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (the draws are made there, with its generator)."""
    if sync:
        dist.broadcast(x, src=0)
    return x


def _gather_rows(z: torch.Tensor, index: torch.Tensor, offset: int, sync: bool) -> torch.Tensor:
    """Rows ``index`` of the concatenated batch; each rank contributes the rows it holds."""
    if not sync:
        return z.index_select(0, index)
    local = index - offset
    mine = (local >= 0) & (local < z.shape[0])
    if z.shape[0] == 0:
        rows = z.new_zeros(index.shape[0], z.shape[1])
    else:
        rows = z.index_select(0, local.clamp(0, z.shape[0] - 1))
    rows = torch.where(mine[:, None], rows, torch.zeros_like(rows))  # x + 0 + ... + 0 = x
    dist.all_reduce(rows)
    return rows


def _all_reduce_stats(counts: torch.Tensor, sums: torch.Tensor, sync: bool):
    """One collective for both: the flat (K, 1 + D) buffer [counts | sums]."""
    if not sync:
        return counts, sums
    flat = torch.cat([counts[:, None], sums], dim=1)
    dist.all_reduce(flat)
    return flat[:, 0], flat[:, 1:]


# --- validation ------------------------------------------------------------------------------

def _validate_rows(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (N, D) with D >= 1, got shape {tuple(x.shape)}")


def _validate_state(codebook, cluster_size, embed_sum) -> None:
    _validate_rows(codebook, "codebook")
    k, d = codebook.shape
    if not isinstance(cluster_size, torch.Tensor) or cluster_size.shape != (k,):
        raise ValueError(f"cluster_size must be a ({k},) tensor, got "
                         f"{tuple(getattr(cluster_size, 'shape', ()))}")
    if not isinstance(embed_sum, torch.Tensor) or embed_sum.shape != (k, d):
        raise ValueError(f"embed_sum must be a ({k}, {d}) tensor, got "
                         f"{tuple(getattr(embed_sum, 'shape', ()))}")
    for name, x in (("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != codebook.device:
            raise ValueError(f"{name} must be on the codebook's device {codebook.device}, "
                             f"got {x.device}")
    for name, x in (("codebook", codebook), ("cluster_size", cluster_size),
                    ("embed_sum", embed_sum)):
        if has_overlap(x):
            raise ValueError(f"{name} must not have elements sharing memory (it is updated in "
                             f"place), got strides {x.stride()} for shape {tuple(x.shape)}")
