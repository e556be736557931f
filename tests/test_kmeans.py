"""ops.kmeans and ops.replace_dead_codes_: against plain PyTorch, on data with a known answer."""
import pytest
import torch
import torch.nn.functional as F

from vqkernels import ops
from vqkernels.reference import ema as reference_ema
from vqkernels.reference import search as reference_search


def blobs(k, d, per_cluster, generator, spread=10.0, noise=0.05):
    """k far-apart centers (apart in distance and in angle) with per_cluster noisy points
    each; returns (z, labels)."""
    while True:
        centers = torch.randn(k, d, generator=generator) * spread
        unit = F.normalize(centers, dim=1)
        off_diagonal = ~torch.eye(k, dtype=torch.bool)
        apart = torch.cdist(centers, centers)[off_diagonal].min() > 2
        angled = d == 1 or (unit @ unit.T)[off_diagonal].max() < 0.95
        if k == 1 or (apart and angled):
            break
    labels = torch.arange(k).repeat_interleave(per_cluster)
    z = centers[labels] + noise * torch.randn(len(labels), d, generator=generator)
    return z, labels


def covering_seed(labels, k):
    """A seed whose k initial draws (randperm, as kmeans makes them) hit every cluster once."""
    for seed in range(10_000):
        first = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:k]
        if len(set(labels[first].tolist())) == k:
            return seed
    raise AssertionError("no covering seed")


def plain_kmeans(z, k, iters, metric, seed):
    """Lloyd's algorithm written the direct way (reference search, bincount statistics)."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(z, dim=1) if metric == "cosine" else z
    n = z.shape[0]
    pick = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(0, n, (k,), generator=g)
    centers, counts = z[pick], None
    for _ in range(iters):
        indices, _ = reference_search.nearest_code(z, centers, metric)
        counts, sums = reference_ema.code_counts_and_sums(z, indices, k)
        means = sums / counts.clamp_min(1)[:, None]
        means = F.normalize(means, dim=1) if metric == "cosine" else means
        centers = torch.where((counts == 0)[:, None], centers, means)
    return centers, counts


@pytest.mark.parametrize("metric,k,d", [("l2", 5, 3), ("l2", 7, 1), ("l2", 3, 16),
                                        ("cosine", 4, 5)])
def test_recovers_well_separated_clusters(metric, k, d, generator):
    per_cluster = 13
    z, labels = blobs(k, d, per_cluster, generator)
    seed = covering_seed(labels, k)
    centers, sizes = ops.kmeans(z, k, 6, metric=metric,
                                generator=torch.Generator().manual_seed(seed))
    assert centers.shape == (k, d) and centers.dtype == torch.float32
    assert sizes.shape == (k,) and sizes.dtype == torch.float32
    points = F.normalize(z, dim=1) if metric == "cosine" else z
    means = torch.stack([points[labels == c].mean(0) for c in range(k)])
    means = F.normalize(means, dim=1) if metric == "cosine" else means
    found, _ = reference_search.nearest_code(centers, means, metric)
    assert sorted(found.tolist()) == list(range(k)), f"centers {centers} vs truth {means}"
    torch.testing.assert_close(centers, means[found], rtol=1e-5, atol=1e-5)
    assert sizes.tolist() == [float(per_cluster)] * k


# Cosine with N < K is left out: duplicated initial rows make exact and 1-ulp ties, which
# the l2-on-unit-vectors search of ops and the 1 - cos of the reference may break apart.
@pytest.mark.parametrize("metric,n,k,d,iters", [
    ("l2", 50, 7, 3, 4), ("l2", 23, 29, 5, 3), ("l2", 1, 4, 2, 2), ("l2", 40, 1, 6, 2),
    ("l2", 31, 6, 4, 0), ("cosine", 50, 7, 3, 4), ("cosine", 37, 37, 5, 3),
    ("cosine", 40, 1, 6, 2), ("cosine", 31, 6, 4, 0)])
def test_matches_plain_lloyd(metric, n, k, d, iters, generator):
    z = torch.randn(n, d, generator=generator)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    centers, sizes = ops.kmeans(z, k, iters, metric=metric, backend="reference",
                                generator=torch.Generator().manual_seed(seed))
    expected, counts = plain_kmeans(z, k, max(iters, 0), metric, seed)
    if counts is None:  # iters=0: the initial rows, and the counts of their assignment
        indices, _ = reference_search.nearest_code(z, expected, metric)
        counts, _ = reference_ema.code_counts_and_sums(z, indices, k)
    torch.testing.assert_close(centers, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(sizes, counts)


def test_empty_clusters_keep_their_center(generator):
    rows = torch.randn(3, 4, generator=generator)
    z = rows[[0, 1, 2, 2, 1]]  # N = 5 < K = 8: drawn with replacement, so duplicates
    centers, sizes = ops.kmeans(z, 8, 3, generator=torch.Generator().manual_seed(1))
    assert sizes.sum() == 5 and (sizes == 0).sum() >= 5
    for center in centers:  # every center, empty or not, is still one of the rows
        assert (center == rows).all(1).any(), f"{center} moved off the data"


def test_same_generator_same_result(generator):
    z = torch.randn(64, 5, generator=generator)
    first = ops.kmeans(z, 9, 5, generator=torch.Generator().manual_seed(7))
    again = ops.kmeans(z, 9, 5, generator=torch.Generator().manual_seed(7), progress=True)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_give_float32(dtype, generator):
    z, _ = blobs(3, 4, 9, generator)
    centers, sizes = ops.kmeans(z.to(dtype), 3, 3, generator=torch.Generator().manual_seed(0))
    assert centers.dtype == sizes.dtype == torch.float32 and sizes.sum() == 27


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(4, 3), 0), {}, ValueError, "num_clusters"),
    ((torch.randn(4, 3), 2.0), {}, ValueError, "num_clusters"),
    ((torch.randn(4, 3), 2, -1), {}, ValueError, "iters"),
    ((torch.randn(4, 3), 2), {"metric": "dot"}, ValueError, "metric"),
    ((torch.randn(4), 2), {}, ValueError, "z must be 2-D"),
    ((torch.zeros(4, 3, dtype=torch.int64), 2), {}, TypeError, "z must be float"),
    ((torch.randn(0, 3), 2), {}, ValueError, "at least one row"),
    (([[1.0]], 2), {}, TypeError, "z must be a torch.Tensor"),
])
def test_kmeans_validation(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.kmeans(*args, **kwargs)


# --- dead-code restarts ----------------------------------------------------------------------

def ema_state(k, d, generator, threshold):
    codebook = torch.randn(k, d, generator=generator)
    cluster_size = torch.rand(k, generator=generator) * 2 * threshold  # about half dead
    cluster_size[0], cluster_size[-1] = threshold / 2, threshold  # one dead, one just alive
    embed_sum = codebook * cluster_size[:, None]
    return codebook, cluster_size, embed_sum


@pytest.mark.parametrize("k,d,n", [(11, 4, 30), (11, 4, 11), (9, 1, 40)])
def test_restart_revives_every_dead_code_and_nothing_else(k, d, n, generator):
    threshold = 1.5
    state = ema_state(k, d, generator, threshold)
    before = [t.clone() for t in state]
    z = torch.randn(n, d, generator=generator)
    dead = before[1] < threshold
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    restarted = ops.replace_dead_codes_(*state, z, threshold,
                                        generator=torch.Generator().manual_seed(seed))
    codebook, cluster_size, embed_sum = state
    assert torch.equal(restarted, dead)
    assert not (cluster_size < threshold).any()
    for new, old in zip(state, before):
        assert torch.equal(new[~dead], old[~dead]), "a live code changed"
    # vector-quantize-pytorch's draws: the j-th dead code gets z[randperm(N)[j]]
    rows = z[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:int(dead.sum())]]
    assert torch.equal(codebook[dead], rows)
    assert torch.equal(cluster_size[dead], torch.full_like(cluster_size[dead], threshold))
    torch.testing.assert_close(embed_sum[dead], rows * threshold)


def test_restart_with_fewer_rows_than_dead_codes(generator):
    k, d, n, threshold = 13, 3, 4, 2.0
    codebook, cluster_size, embed_sum = ema_state(k, d, generator, threshold)
    cluster_size[:10] = 0.5  # at least 10 dead codes, only 4 rows
    before = [t.clone() for t in (codebook, cluster_size, embed_sum)]
    dead = cluster_size < threshold
    z = torch.randn(n, d, generator=generator)
    restarted = ops.replace_dead_codes_(codebook, cluster_size, embed_sum, z, threshold,
                                        reset_cluster_size=3.0, generator=generator)
    assert int(restarted.sum()) == n and not (restarted & ~dead).any()
    new_rows = codebook[restarted]
    assert sorted(map(tuple, new_rows.tolist())) == sorted(map(tuple, z.tolist())), \
        "the restarted codes must take the batch's rows, each once"
    assert (cluster_size[restarted] == 3.0).all()
    torch.testing.assert_close(embed_sum[restarted], new_rows * 3.0)
    for new, old in zip((codebook, cluster_size, embed_sum), before):
        assert torch.equal(new[~restarted], old[~restarted])


def test_restart_on_an_empty_batch_changes_nothing(generator):
    state = ema_state(5, 2, generator, 1.0)
    before = [t.clone() for t in state]
    restarted = ops.replace_dead_codes_(*state, torch.empty(0, 2), 1.0)
    assert not restarted.any()
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(threshold=-1.0), ValueError, "threshold"),
    (dict(reset_cluster_size=-2.0), ValueError, "reset_cluster_size"),
    (dict(z=torch.randn(4, 3)), ValueError, "z must be"),
    (dict(cluster_size=torch.zeros(6)), ValueError, "cluster_size"),
    (dict(embed_sum=torch.zeros(5, 3)), ValueError, "embed_sum"),
])
def test_restart_validation(kwargs, error, match):
    args = dict(codebook=torch.randn(5, 2), cluster_size=torch.zeros(5),
                embed_sum=torch.zeros(5, 2), z=torch.randn(4, 2), threshold=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.replace_dead_codes_(args.pop("codebook"), args.pop("cluster_size"),
                                args.pop("embed_sum"), args.pop("z"), **args)


@pytest.mark.cuda
def test_restart_is_sync_free_and_graph_capturable():
    k, d, n = 64, 8, 200
    codebook, cluster_size = torch.randn(k, d, device="cuda"), torch.rand(k, device="cuda") * 2
    embed_sum, z = codebook * cluster_size[:, None], torch.randn(n, d, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.replace_dead_codes_(codebook, cluster_size, embed_sum, z, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cluster_size.uniform_(0, 2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.replace_dead_codes_(codebook, cluster_size, embed_sum, z, 1.0)
    cluster_size.uniform_(0, 2)
    graph.replay()
    torch.cuda.synchronize()
    assert not (cluster_size < 1.0).any()
