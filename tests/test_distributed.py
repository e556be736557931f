"""Two gloo ranks on CPU end with the codebook one process gets on the concatenated batch.

The data are multiples of 1/4, so every sum is exact whatever the order of the
all-reduce: the ranks and the single process must agree to the last bit.
"""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkernels import ResidualVQ, VectorQuantize, ops

WORLD = 2
K, D = 11, 4
SPLIT = (23, 14)  # rows per rank: uneven on purpose
FEW = (3, 0)  # fewer rows than codes, and a rank with none
TIMEOUT_S = 120


def data(seed, steps):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-16, 17, (sum(SPLIT), D), generator=g).float() / 4
            for _ in range(steps)]


def share(z, rank, split=SPLIT):
    """Rank's rows of the global batch z; all of it when rank is None."""
    if rank is None:
        return z[:sum(split)]
    start = sum(split[:rank])
    return z[start:start + split[rank]]


def restart_state(seed):
    g = torch.Generator().manual_seed(seed)
    cluster_size = torch.rand(K, generator=g) * 4
    codebook = torch.randn(K, D, generator=g)
    return codebook, cluster_size, codebook * cluster_size[:, None]


def compute(seed, rank=None):
    """Every scenario, on rank's share (a worker) or on the whole batch (rank None)."""
    batches, out = data(seed, 4), {}
    out["kmeans"] = ops.kmeans(share(batches[0], rank), K, 5,
                               generator=torch.Generator().manual_seed(seed))
    for name, split in (("restart", SPLIT), ("restart few", FEW)):
        state = restart_state(seed)
        ops.replace_dead_codes_(*state, share(batches[1], rank, split), 2.0,
                                generator=torch.Generator().manual_seed(seed + 1))
        out[name] = state
    torch.manual_seed(seed)
    vq = VectorQuantize(D, K, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)
    for i, z in enumerate(batches):
        torch.manual_seed(seed + 10 + i)  # rank 0's generator makes the draws
        vq(share(z, rank).reshape(1, -1, D))
    out["module"] = dict(vq.state_dict())
    torch.manual_seed(seed)
    rvq = ResidualVQ(dim=D, num_quantizers=3, codebook_size=K, kmeans_init=True, kmeans_iters=3)
    for i, z in enumerate(batches[:3]):
        torch.manual_seed(seed + 20 + i)
        rvq(share(z, rank).reshape(1, -1, D))
    out["residual module"] = dict(rvq.state_dict())
    return out


def count_collectives_of_a_training_step(module):
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        module(torch.randn(2, 5, D))
    finally:
        dist.all_reduce = original
    return len(calls)


def _worker(rank, init_file, out_dir, seed):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = compute(seed, rank)
        torch.manual_seed(seed)
        results["all_reduce calls"] = count_collectives_of_a_training_step(VectorQuantize(D, K))
        results["residual all_reduce calls"] = count_collectives_of_a_training_step(
            ResidualVQ(dim=D, num_quantizers=3, codebook_size=K))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path, seed):
    context = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), seed),
                       nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} gloo workers did not finish in {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def flatten(results, prefix=""):
    if isinstance(results, dict):
        return {k: v for key, value in results.items()
                for k, v in flatten(value, f"{prefix}{key} ").items()}
    if isinstance(results, (tuple, list)):
        return {k: v for i, value in enumerate(results)
                for k, v in flatten(value, f"{prefix}{i} ").items()}
    return {prefix.strip(): results}


def test_ranks_agree_with_one_process_on_the_concatenated_batch(tmp_path):
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"seed {seed}")
    ranks = [flatten(r) for r in run_workers(tmp_path, seed)]
    single = flatten(compute(seed))
    for key in ("all_reduce calls", "residual all_reduce calls"):  # the stages' stats too
        assert ranks[0].pop(key) == ranks[1].pop(key) == 1, \
            f"{key}: one EMA training step must all-reduce exactly one buffer"
    assert ranks[0].keys() == single.keys()
    for key, expected in single.items():
        for rank, results in enumerate(ranks):
            assert torch.equal(results[key], ranks[0][key]), f"{key}: rank {rank} != rank 0"
            torch.testing.assert_close(results[key], expected, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{key}: rank {rank} vs one process: {m}")
    codebook, cluster_size, _ = restart_state(seed)
    dead = int((cluster_size < 2).sum())
    for name, restarted in (("restart", dead), ("restart few", min(dead, sum(FEW)))):
        changed = (single[f"{name} 0"] != codebook).any(1).sum()
        assert changed == restarted, f"{name}: {changed} codes restarted, expected {restarted}"
